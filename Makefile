# Copy-detection pipeline. `make demo` installs everything and runs the pipeline on the bundled
# demo data; `make test` installs everything and runs the test suite.
#   make all QUERY=path/to/queries REF=path/to/references WORK=work   -> $(WORK)/submission.csv
#   make eval GT=path/to/gt.csv                                        -> micro-AP, recall@P90
# Every stage skips what already exists, so re-running a target resumes it. The stage order lives
# in one place, the pipeline package (pipeline/__init__.py); `copydet --help` lists the stages.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
QUERY ?= data/queryimages
REF ?= data/referenceimages
GT ?= data/gt.csv
EDITS ?=
WORK ?= work
CONFIG ?=
OPTS ?=
TRAIN_PHOTOS ?= ../shared/trainset/photos
SUBMISSION ?= $(WORK)/submission.csv
COPYDET := $(VENV)/bin/copydet
SETTINGS = $(if $(CONFIG),--config $(CONFIG)) $(OPTS)
ARGS = --work $(WORK) $(SETTINGS)

.PHONY: install demo all eval report test test-fast lint gpu-check bench-pipeline bench bench-global bench-detect bench-scale capacity \
	train-index calibrate hard-sets same-setting frame-set lookalike-groups train-split more-split train-verifier train-global global-assets calibrate-fusion \
	train-detector clean dedupe dedupe-set dedupe-bench dedupe-scale calibrate-dedupe frame-levels

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-ml.txt requirements-nodeps.txt requirements-dev.txt \
		pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-ml.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(MAKE) all eval report QUERY=data/queryimages REF=data/referenceimages GT=data/gt.csv \
		EDITS=data/edits.csv

# The whole pipeline (every branch of merge.branches, then the fusion); each stage alone is
# `$(COPYDET) <stage>` (README: Stages and commands).
all: install
	$(COPYDET) run --queries $(QUERY) --references $(REF) --out $(SUBMISSION) $(ARGS)

# Deduplicate one folder: $(WORK)/dedupe/<folder>-<hash>/ gets pairs.csv, groups.csv,
# duplicates.json, keep.txt, remove.txt (README: Deduplicate a folder). Nothing is moved.
IMAGES ?= data/referenceimages
dedupe: install
	$(COPYDET) dedupe --images $(IMAGES) $(ARGS)

# The deduplication benchmark (copy groups, real look-alikes, singletons from more_photos,
# nothing fitted on them), then our command and the peers installed under .peers/ on it.
dedupe-set: more-split
	$(PY) -m data.make_dedupe --photos $(WORK)/moresplit/calib --out $(WORK)/dedupe-bench --force

dedupe-bench: dedupe-set
	nice -n 10 $(PY) -m bench.bench_dedupe --bench $(WORK)/dedupe-bench --work $(WORK)/bench-dedupe

# The time of `copydet dedupe` on N images against `copydet run` on them split 1:4 (the
# training photos, then edited copies of them up to N; docs/results.md#deduplication).
N ?= 20000
dedupe-scale: install
	$(PY) -m bench.bench_dedupe_scale --n $(N) --work $(WORK)/dedupe-scale

eval: install
	$(PY) -m evaluation.isc_metric --predictions $(SUBMISSION) --gt $(GT) \
		--plot $(WORK)/pr_curve.png --json $(WORK)/metrics.json

# One HTML page per run: $(WORK)/report/index.html (opens from file://, no server); metrics
# only with GT=… given (`make demo` gives the demo's).
report: install
	$(COPYDET) report --work $(WORK) $(if $(filter command line,$(origin GT)),--gt $(GT)) \
		$(if $(EDITS),--edits $(EDITS))

# The full suite (what CI runs); test-fast leaves out the slow end-to-end runs.
test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: bench-global
	$(PY) -m bench.bench_local

# Search time and memory against the number of references (1x-100x the devset, hours on one
# core; needs `make all` on the devset and `make train-index`), then the capacity plan.
bench-scale: install
	nice -n 10 $(PY) -m bench.bench_scale --work $(WORK)

capacity: install
	$(PY) -m bench.capacity_plan --work $(WORK)

# The whole default pipeline against its floor (bare SIFT, bare forward, bare Faiss search of
# the same images, measured in the same run); devset by default, or QUERY/REF when given.
bench-pipeline: install
	$(PY) -m bench.bench_pipeline $(if $(filter command line,$(origin QUERY)),--queries $(QUERY)) \
		$(if $(filter command line,$(origin REF)),--references $(REF)) $(OPTS)

# GPU paths against the CPU (pytest -m gpu), then throughput and peak GPU memory (says so and
# exits 0 without a GPU).
gpu-check: install
	$(PY) -m bench.gpu_check

bench-global: install
	$(PY) -m bench.bench_global

bench-detect: install
	$(PY) -m bench.bench_detect --images $(QUERY)

# Models and indexes shipped in the repository, rebuilt from training photos (never references).
train-index: install
	$(COPYDET) train-index --images $(TRAIN_PHOTOS) $(ARGS)

calibrate: install
	$(COPYDET) calibrate --photos $(TRAIN_PHOTOS) $(ARGS)

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
	$(COPYDET) global-assets --images $(WORK)/trainsplit/fit $(ARGS)

# Harder benchmarks of our own, from the calib photos (nothing is fitted on them): look-alikes
# (other photos of a reference's setting) and small pasted copies under overlays. Measure with
# `make all eval QUERY=$(WORK)/lookalike/queryimages REF=$(WORK)/lookalike/referenceimages
# GT=$(WORK)/lookalike/gt.csv` (docs/results.md).
hard-sets: train-split
	$(PY) -m data.make_lookalike --photos $(WORK)/trainsplit/calib --out $(WORK)/lookalike \
		--made 60 --refs 150 --positives 150 --distractors 60 --seed 11 --force
	$(PY) -m data.make_benchmark --photos $(WORK)/trainsplit/calib --out $(WORK)/smallcopy \
		--refs 250 --positives 200 --distractors 100 --seed 10 --chain small_copy --force

# more_photos split by id: fit/ (the pair verifier trains on it), calib/ (only measures: every
# photo of data/more_photos_groups.csv and about half of the others).
MORE_PHOTOS ?= ../shared/trainset/more_photos
more-split: install
	$(PY) -m data.split --photos $(MORE_PHOTOS) --out $(WORK)/moresplit --calib-fraction 0.5 \
		--hold-out data/more_photos_groups.csv

# Real photos of one setting, whole groups held out: the groups never fitted on, among edited
# copies and distractors from photos nothing was fitted on (docs/results.md).
same-setting: more-split
	$(PY) -m data.same_setting --photos $(TRAIN_PHOTOS) $(WORK)/moresplit/calib \
		--fitted $(TRAIN_PHOTOS) --out $(WORK)/samesetting --force

# Framed queries (screenshot, meme, pad) against references that are pages and posters made
# from photos nothing was fitted on (docs/results.md).
frame-set: more-split
	$(PY) -m data.make_frames --photos $(WORK)/moresplit/calib --out $(WORK)/frames --force

# The pair verifier (match_score/assets/pair_net.safetensors + .json, and
# docs/pair_net_curve.png) from the fit photos and more_photos' fit part; measured also on the
# same-setting and frame sets, which it never trains on.
train-verifier: same-setting frame-set
	$(COPYDET) train-verifier --photos $(TRAIN_PHOTOS) --more-photos $(WORK)/moresplit/fit \
		--measure $(WORK)/samesetting $(WORK)/frames $(ARGS)

# What tells a frame from a photo around a detected box: prints the figures and thresholds of
# FLAT_SHARE and PATCH_SHARE in match_score/frames.py (set there by hand from its output).
frame-levels: more-split
	$(PY) -m calibration.frames --photos $(TRAIN_PHOTOS) $(WORK)/moresplit/fit

# The real look-alike groups (data/lookalike_groups.csv): the pipeline on the training photos
# against themselves, pairs of different photos scoring >= 0.5, less data/same_photo.csv.
lookalike-groups: install
	$(COPYDET) run --queries $(TRAIN_PHOTOS) --references $(TRAIN_PHOTOS) --work $(WORK)/selftrain \
		$(SETTINGS)
	$(PY) -m data.mine_lookalikes --work $(WORK)/selftrain --photos $(TRAIN_PHOTOS) \
		--out data/lookalike_groups.csv

# The fusion of `copydet dedupe` (dedupe.fusion_model), fitted on one folder of calib photos.
calibrate-dedupe: install
	$(COPYDET) calibrate-dedupe --photos $(TRAIN_PHOTOS) $(ARGS)

calibrate-fusion: install
	$(COPYDET) calibrate-fusion --photos $(TRAIN_PHOTOS) $(ARGS)

# The overlay detector: a synthetic set of pastes made from the fit part of the training photos
# (the calib part stays unseen for the fusion's calibration), then YOLO from scratch in two
# stages, as recorded in preprocess/assets/overlay_yolo.json (CPU: about 25 min on 2 cores; on a
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
