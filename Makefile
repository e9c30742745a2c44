# Copy-detection pipeline. `make demo` installs everything and runs the pipeline on the bundled
# demo data; `make test` installs everything and runs the test suite.
#   make all QUERY=path/to/queries REF=path/to/references WORK=work   -> $(WORK)/submission.csv
#   make eval GT=path/to/gt.csv                                        -> micro-AP, recall@P90
# Every stage skips what already exists, so re-running a target resumes it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
QUERY ?= data/queryimages
REF ?= data/referenceimages
GT ?= data/gt.csv
WORK ?= work
CONFIG ?=
OPTS ?=
TRAIN_PHOTOS ?= ../shared/trainset/photos
SUBMISSION ?= $(WORK)/submission.csv
ARGS = --work $(WORK) $(if $(CONFIG),--config $(CONFIG)) $(OPTS)
SETS = --queries $(QUERY) --references $(REF)

.PHONY: install demo all extract extract-references extract-queries search verify detect \
	crop-local global-extract global-search merge eval test lint bench bench-global \
	bench-detect bench-scale capacity train-index calibrate train-split train-global \
	global-assets calibrate-fusion train-detector clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-ml.txt requirements-nodeps.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-ml.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

demo: install
	$(MAKE) all eval QUERY=data/queryimages REF=data/referenceimages GT=data/gt.csv

all: merge

extract: extract-references extract-queries

extract-references: install
	$(PY) -m local_fea.extract --images $(REF) $(ARGS)

extract-queries: install
	$(PY) -m local_fea.extract --images $(QUERY) --mirror $(ARGS)

search: extract
	$(PY) -m local_fea.search $(SETS) $(ARGS)

verify: search
	$(PY) -m match_score.verify $(SETS) $(ARGS)

global-extract: install
	$(PY) -m global_fea.extract $(SETS) $(ARGS)

global-search: global-extract
	$(PY) -m global_fea.search $(SETS) $(ARGS)

# Overlay crops: the detector finds a pasted copy, the local branch runs again on the crops.
detect: install
	$(PY) -m preprocess.detect --images $(QUERY) $(ARGS)

crop-local: detect extract-references
	$(PY) -m preprocess.crop_local $(SETS) $(ARGS)

merge: verify global-search crop-local
	$(PY) -m merge.fuse $(SETS) --out $(SUBMISSION) $(ARGS)

eval: install
	$(PY) -m evaluation.isc_metric --predictions $(SUBMISSION) --gt $(GT) \
		--plot $(WORK)/pr_curve.png --json $(WORK)/metrics.json

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: bench-global
	$(PY) -m bench.bench_local

# Search time and memory against the number of references (1x-100x the devset, hours on one
# core; needs `make extract` on the devset and `make train-index`), then the capacity plan.
bench-scale: install
	nice -n 10 $(PY) -m bench.bench_scale --work $(WORK)

capacity: install
	$(PY) -m bench.capacity_plan --work $(WORK)

bench-global: install
	$(PY) -m bench.bench_global

bench-detect: install
	$(PY) -m bench.bench_detect --images $(QUERY)

# Models and indexes shipped in the repository, rebuilt from training photos (never references).
train-index: install
	$(PY) -m local_fea.train_index --images $(TRAIN_PHOTOS) $(ARGS)

calibrate: install
	$(PY) -m match_score.calibrate --photos $(TRAIN_PHOTOS) $(ARGS)

# The training photos split by id: fit/ (descriptor, whitening, bank), calib/ (fusion).
train-split: install
	$(PY) -m data.split --photos $(TRAIN_PHOTOS) --out $(WORK)/trainsplit

# SSCD-style fine-tuning of the global descriptor (CPU: small; GPU: --device cuda --workers 8).
# Use the result with -o global_fea.weights=$(WORK)/train-global/descriptor.safetensors.
TRAIN_GLOBAL_ARGS ?= --steps 600 --batch 24 --image-size 160 --threads 2 --workers 1
train-global: train-split
	$(PY) -m global_fea.train --photos $(WORK)/trainsplit/fit --out $(WORK)/train-global \
		$(TRAIN_GLOBAL_ARGS)

global-assets: train-split
	$(PY) -m global_fea.whiten --images $(WORK)/trainsplit/fit $(ARGS)

calibrate-fusion: install
	$(PY) -m merge.calibrate --photos $(TRAIN_PHOTOS) $(ARGS)

# The overlay detector: a synthetic set of pastes made from the fit part of the training photos
# (the calib part stays unseen for the fusion's calibration), then YOLO from scratch in two
# stages, as recorded in preprocess/assets/overlay_yolo.json (CPU: about 2 h on 2 cores; on a
# GPU add DETECTOR_OPTS="--device 0 --amp").
SYNTH ?= $(WORK)/overlay_synth
DETECTOR_OPTS ?=
train-detector: train-split
	$(PY) -m preprocess.synth --photos $(WORK)/trainsplit/fit --out $(SYNTH) \
		--train 2000 --val 200 --test 400 --seed 0
	$(PY) -m preprocess.train --data $(SYNTH) --out $(WORK)/detector_stage1.safetensors \
		--work $(WORK)/detector_train --epochs 12 --imgsz 192 --batch 16 --threads 2 $(DETECTOR_OPTS)
	$(PY) -m preprocess.train --data $(SYNTH) --out preprocess/assets/overlay_yolo.safetensors \
		--work $(WORK)/detector_train2 --init $(WORK)/detector_stage1.safetensors --epochs 20 \
		--warmup 0.5 --imgsz 192 --batch 16 --threads 2 $(DETECTOR_OPTS)

clean:
	rm -rf $(WORK)
