"""Every GPU path against the CPU (``pytest -m gpu``; ``make gpu-check`` runs these, then
prints throughput). Each check runs on every CUDA device torch sees (marked ``gpu``, skipped
without one) and, small, as a self-test with two "cpu" devices storing float16, so the
comparisons themselves are exercised where there is no GPU.

- exact k-NN: RootSIFT-like descriptors (squared L2) and normalised 256-d ones (inner
  product) streamed in blocks on the devices against faiss-cpu: the same candidates (an id
  only one side returns is a tie within float16 rounding) and distances within that rounding;
- global descriptors on the devices (fp16 autocast, one replica each): cosine >= 0.999;
- detector boxes on the devices: the same box kept per query (IoU >= 0.9, conf within 0.02);
- the demo end to end with GPUs on and off (GPU only): the same pairs, scores within 0.01.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from common.devices import cuda_devices
from common.parallel import resolve_n_jobs
from common.torch_knn import IP, L2
from tests import gpu_compare as gc

K = 10
MIN_COSINE = 0.999


class Side:
    """The devices a check runs on, with its sizes."""

    def __init__(self, name: str):
        self.name = name
        self.gpu = name == "gpu"
        self.devices = cuda_devices() if self.gpu else ["cpu", "cpu"]
        self.cpu_dtype = "float32" if self.gpu else "float16"
        self.refs = int(os.environ.get("GPU_CHECK_REFS", 4_000_000)) if self.gpu else 6_000
        self.queries = 2_000 if self.gpu else 60
        self.block_rows = 1 << 20 if self.gpu else 2_000
        self.limit = None if self.gpu else 8  # demo images
        # several batches per device on the small side
        self.conf = load_config(overrides=[] if self.gpu else ["preprocess.batch=2",
                                                               "global_fea.batch_size=4"])


SIDES = [pytest.param("gpu", marks=pytest.mark.gpu), "cpu"]


@pytest.fixture(params=SIDES)
def side(request) -> Side:
    return Side(request.param)


@pytest.mark.parametrize("metric", [L2, IP])
def test_exact_search_on_the_devices_matches_the_cpu(side: Side, metric: str) -> None:
    rng = np.random.default_rng(0)
    if metric == L2:
        vectors = gc.sift_like(side.refs, rng)
        queries = gc.near_queries(vectors, side.queries, rng, 6.0, True)
    else:
        vectors = gc.unit_vectors(max(1, side.refs // 4), rng)
        queries = gc.near_queries(vectors, side.queries, rng, 0.02, False)
    reference = gc.exact(queries, vectors, K, metric, None, side.block_rows)
    tested = gc.exact(queries, vectors, K, metric, side.devices, side.block_rows,
                      side.cpu_dtype)
    result = gc.compare_knn(queries, vectors, reference, tested, metric)
    assert result["ok"], result
    assert result["top1"] >= 0.5, result  # the planted copies come first on both sides


def test_global_descriptors_on_the_devices_match_the_cpu(side: Side) -> None:
    import torch

    from global_fea import extract, weights

    section = side.conf["global_fea"]
    _, paths = gc.demo_paths(side.limit)
    base = weights.build(section)
    torch.set_num_threads(resolve_n_jobs(-1))
    reference = gc.describe([copy.deepcopy(base)], paths, section, ["cpu"], 0)
    replicas = [copy.deepcopy(base).to(d) for d in side.devices]
    workers = extract.loader_workers(section, [torch.device(d) for d in side.devices], -1)
    tested = gc.describe(replicas, paths, section, side.devices, workers)
    for ref, test in zip(reference, tested, strict=True):  # the image, then its mirror
        assert gc.min_cosine(ref, test) >= MIN_COSINE


def test_detector_boxes_on_the_devices_match_the_cpu(side: Side, tmp_path: Path) -> None:
    from preprocess.detect import Detector

    pconf = side.conf["preprocess"]
    queries, _ = gc.demo_paths(side.limit)
    cpu = Detector({**pconf, "device": "cpu"}, resolve_n_jobs(-1), tmp_path)
    smalls = [cpu.small(p) for p in queries]
    images, sizes = [s for s, _ in smalls], [z for _, z in smalls]
    reference = cpu.detect(images, sizes)
    devices = Detector({**pconf, "device": ",".join(side.devices)}, resolve_n_jobs(-1),
                       tmp_path)
    differ, boxed = gc.compare_boxes(reference, devices.detect(images, sizes), sizes, pconf)
    assert boxed > 0 and differ == 0, f"{differ} of {boxed} kept boxes differ"


@pytest.mark.gpu
@pytest.mark.slow
def test_the_demo_end_to_end_on_gpus_matches_the_cpu(tmp_path: Path) -> None:
    common = ["local_search.index=Flat"]  # exact local search on both sides
    cpu = gc.run_demo([*common, "local_search.gpu=false", "global_search.gpu=false",
                       "global_fea.device=cpu", "preprocess.device=cpu"], tmp_path / "cpu")
    gpu = gc.run_demo([*common, "local_search.gpu=true", "global_search.gpu=true",
                       "global_fea.device=auto", "preprocess.device=auto"], tmp_path / "gpu")
    ok, detail = gc.compare_submissions(cpu, gpu)
    assert ok, detail
