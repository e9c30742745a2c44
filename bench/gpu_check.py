"""GPU check: every GPU path against the CPU, then throughput and peak GPU memory.

    python -m bench.gpu_check [--refs 4000000] [--skip-demo]     # make gpu-check

First the correctness tests ``pytest -m gpu tests/test_gpu.py`` (exact search, global
descriptors, detector boxes, the demo end to end: GPUs against the CPU); then one row per
throughput figure: query descriptors/s searched against a block of ``--refs`` synthetic
descriptors held on the GPUs (squared L2, 128-d; inner product, 256-d), images/s described
and detected on all GPUs, each with its peak GPU memory (``torch.cuda.max_memory_allocated``,
the largest over the GPUs). Without a CUDA device torch can see, it says so in one line and
exits 0; the exit status is 1 when a correctness test fails.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import REPO_ROOT, load_config
from common.devices import cuda_devices
from common.parallel import resolve_n_jobs
from common.torch_knn import IP, L2, TorchFlatIndex

K = 10


@dataclass
class Row:
    """One throughput figure."""

    check: str
    detail: str
    figure: str
    peak_gib: float | None


def peak_gib(devices: Sequence[str]) -> float:
    """The largest ``max_memory_allocated`` over ``devices`` since the last reset, in GiB."""
    return max(torch.cuda.max_memory_allocated(d) for d in devices) / 2**30


def timed(devices: Sequence[str], work: Callable[[], object]) -> float:
    """Seconds ``work()`` takes on ``devices``, with their peak memory reset before."""
    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)
    start = time.perf_counter()
    work()
    for d in devices:
        torch.cuda.synchronize(d)
    return time.perf_counter() - start


def knn_throughput(name: str, metric: str, dim: int, n_refs: int, n_queries: int,
                   devices: Sequence[str]) -> Row:
    """Query descriptors/s against ``n_refs`` random vectors held on ``devices``."""
    rng = np.random.default_rng(0)
    index = TorchFlatIndex(dim, devices, metric)
    upload = timed(devices, lambda: [index.add(rng.random((s, dim), dtype=np.float32),
                                               np.arange(i, i + s, dtype=np.int64))
                                     for i, s in ((i, min(1 << 20, n_refs - i))
                                                  for i in range(0, n_refs, 1 << 20))])
    queries = rng.random((n_queries, dim), dtype=np.float32)
    index.search(queries[:1024], K)  # warm-up
    seconds = timed(devices, lambda: index.search(queries, K))
    return Row(name, f"{n_queries:,} q x {n_refs:,} refs on {len(devices)} GPU(s); upload "
                     f"{n_refs * dim * 4 / 2**30 / upload:.1f} GiB/s",
               f"{n_queries / seconds:,.0f} q desc/s", peak_gib(devices))


def demo_images(folder: str, count: int) -> list[str]:
    """``count`` paths cycling over a demo folder."""
    paths = sorted(str(p) for p in (REPO_ROOT / "data" / folder).glob("*.jpg"))
    return list(itertools.islice(itertools.cycle(paths), count))


def global_throughput(conf: dict, devices: Sequence[str], count: int) -> Row:
    from global_fea import extract, weights

    section = conf["global_fea"]
    base = weights.build(section)
    targets = [torch.device(d) for d in devices]
    replicas = [copy.deepcopy(base).to(d) for d in targets]
    workers = extract.loader_workers(section, targets, -1)
    paths = demo_images("referenceimages", count)
    seconds = timed(devices, lambda: list(extract.describe_batches(
        replicas, paths, section, False, targets, workers)))
    return Row("global", f"{count} images at {section['image_size']} px, {workers} decoding "
                         f"workers", f"{count / seconds:,.1f} images/s", peak_gib(devices))


def detect_throughput(conf: dict, devices: Sequence[str], count: int, work: Path) -> Row:
    from preprocess.detect import Detector

    pconf = conf["preprocess"]
    detector = Detector({**pconf, "device": ",".join(devices)}, resolve_n_jobs(-1), work)
    smalls = [detector.small(p) for p in demo_images("queryimages", count)]
    seconds = timed(devices, lambda: detector.detect([s for s, _ in smalls],
                                                     [z for _, z in smalls]))
    return Row("detect", f"{count} decoded queries at {pconf['imgsz']} px, batch "
                         f"{pconf['batch']}", f"{count / seconds:,.1f} images/s",
               peak_gib(devices))


def table(rows: Sequence[Row]) -> str:
    head = ("throughput", "detail", "figure", "peak GPU mem")
    body = [(r.check, r.detail, r.figure, "-" if r.peak_gib is None else f"{r.peak_gib:.2f} GiB")
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in [head, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def correctness(refs: int, skip_demo: bool) -> int:
    """Run the GPU-against-CPU tests; return pytest's exit status."""
    marks = "gpu and not slow" if skip_demo else "gpu"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", marks,
                           "tests/test_gpu.py"], cwd=REPO_ROOT,
                          env={**os.environ, "GPU_CHECK_REFS": str(refs)}).returncode


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--refs", type=int, default=4_000_000,
                        help="synthetic 128-d references (default 4,000,000)")
    parser.add_argument("--throughput-queries", type=int, default=65_536)
    parser.add_argument("--images", type=int, default=2_048,
                        help="images timed per torch stage")
    parser.add_argument("--skip-demo", action="store_true", help="leave out the end-to-end run")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "work" / "gpu_check")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    devices = cuda_devices()
    if not devices:
        print("no GPU: torch sees no CUDA device, nothing to check here")
        return 0
    names = ", ".join(torch.cuda.get_device_name(d) for d in devices)
    print(f"devices: {', '.join(devices)} ({names}); torch {torch.__version__}", flush=True)
    status = correctness(args.refs, args.skip_demo)
    conf = load_config()
    rows = [knn_throughput("knn-l2", L2, 128, args.refs, args.throughput_queries, devices),
            knn_throughput("knn-ip", IP, 256, args.refs // 4, args.throughput_queries, devices),
            global_throughput(conf, devices, args.images),
            detect_throughput(conf, devices, args.images, args.work / "ultralytics")]
    print(table(rows))
    print("every correctness test passed" if status == 0 else
          f"correctness tests failed (pytest exit status {status})")
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
