"""GPU check: every GPU path against the CPU, then throughput and peak GPU memory.

    python -m bench.gpu_check [--refs 4000000] [--skip-demo] [--work work/gpu_check]
    python -m bench.gpu_check --cpu-selftest   # the same comparisons, CPU on both sides

Checks, one row each in the summary table (exit status 1 when one fails):

- ``knn-l2``: exact search of a synthetic block of ``--refs`` RootSIFT-like 128-d descriptors
  (streamed in blocks, torch float16 on every GPU) against faiss-cpu float32 (torch float32
  on the CPU where faiss is missing): the same candidates (every id only one side returns is a
  tie within float16 rounding of the other side's k-th distance, checked against the exact
  float64 distance) and every distance within float16 rounding (2^-9 of ||q||² + max ||r||²);
- ``knn-ip``: the same with inner products of L2-normalised 256-d descriptors (global search);
- ``global``: the demo images described on the GPUs (float16 autocast, one replica per GPU)
  and on the CPU: cosine >= 0.999 for every image, mirrored views included;
- ``detect``: detector boxes on the GPUs against the CPU for the demo queries: the same box
  kept per query (IoU >= 0.9, confidence within 0.02) or none on both sides;
- ``demo``: the pipeline end to end on the demo data with GPUs on and off (exact local search
  on both sides): the same pairs, scores within 0.01 (``run_demo``);

then throughput rows (query descriptors/s searched against the whole block held on the GPUs,
images/s described and detected on all GPUs) with each check's peak GPU memory
(``torch.cuda.max_memory_allocated``, the largest over the GPUs). Without a CUDA device torch
can see, it says so in one line and exits 0. ``--cpu-selftest`` runs the comparisons with the
CPU as "GPU" side (two "cpu" devices, float16 rounding of the stored vectors), on a small
block, so the checking code itself is exercised where there is no GPU.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import REPO_ROOT, load_config
from common.io import read_csv
from common.parallel import resolve_n_jobs
from common.torch_knn import IP, L2, TorchFlatIndex

DATA = REPO_ROOT / "data"
K = 10
TOLERANCE = 2.0**-9  # of ||q||² + max ||r||²: float16 rounding of the vectors, with room
MIN_COSINE = 0.999
BOX_IOU, BOX_CONF = 0.9, 0.02
SCORE_TOLERANCE = 0.01


@dataclass
class Row:
    """One line of the summary: ``ok`` None for a figure or a skipped check."""

    check: str
    ok: bool | None
    detail: str
    figure: str = ""
    peak_gib: float | None = None


# ---------------------------------------------------------------- devices and memory


def gpu_devices() -> list[str]:
    """Every CUDA device torch sees."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if (
        torch.cuda.is_available()) else []


def reset_peak(devices: Sequence[str]) -> None:
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(d)


def peak_gib(devices: Sequence[str]) -> float | None:
    """The largest ``max_memory_allocated`` over the CUDA ``devices`` (None on CPU)."""
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        return None
    return max(torch.cuda.max_memory_allocated(d) for d in cuda) / 2**30


def synchronize(devices: Sequence[str]) -> None:
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


# ---------------------------------------------------------------- exact search


def sift_like(n: int, rng: np.random.Generator, dim: int = 128) -> np.ndarray:
    """Non-negative integer descriptors of L2 norm ≈ 512 (the pipeline's quantised
    RootSIFT), float32, made in chunks."""
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 1 << 20):
        x = rng.random((min(n, s + (1 << 20)) - s, dim), dtype=np.float32) ** 3
        x *= 512 / np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + len(x)] = np.clip(np.round(x), 0, 255)
    return out


def unit_vectors(n: int, rng: np.random.Generator, dim: int = 256) -> np.ndarray:
    """L2-normalised Gaussian vectors, float32 (whitened global descriptors)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near_queries(refs: np.ndarray, n: int, rng: np.random.Generator, noise: float,
                 integer: bool) -> np.ndarray:
    """Half edited copies of references (a clear nearest neighbour), half fresh ones."""
    rows = rng.choice(len(refs), n // 2, replace=False)
    copies = refs[rows] + rng.normal(0, noise, (len(rows), refs.shape[1])).astype(np.float32)
    fresh = refs[rng.choice(len(refs), n - len(rows), replace=False)][:, rng.permutation(
        refs.shape[1])]  # permuted coordinates: same statistics, no planted neighbour
    q = np.concatenate([copies, fresh]).astype(np.float32)
    if integer:
        return np.clip(np.round(q), 0, 255)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def blocks_of(vectors: np.ndarray, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(vectors[s:s + rows], np.arange(s, min(len(vectors), s + rows), dtype=np.int64))
            for s in range(0, len(vectors), rows)]


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def exact(queries: np.ndarray, vectors: np.ndarray, k: int, metric: str,
          devices: Sequence[str] | None, block_rows: int,
          cpu_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``queries`` in ``vectors`` (ids = rows): with ``devices`` None the
    CPU path (faiss-cpu), else torch on ``devices``, streamed in blocks as the pipeline does
    (``common.knn.exact_search``); without faiss, ``TorchFlatIndex`` alone (CPU: float32)."""
    if have_faiss():
        from common import knn

        backend = knn.CPU if devices is None else knn.torch_backend(devices, cpu_dtype=cpu_dtype)
        return knn.exact_search(queries, blocks_of(vectors, block_rows), k, backend, metric)
    index = TorchFlatIndex(vectors.shape[1], devices or ["cpu"], metric,
                           cpu_dtype=cpu_dtype if devices else "float32")
    for block, ids in blocks_of(vectors, block_rows):
        index.add(block, ids)
    return index.search(queries, k)


def compare_knn(queries: np.ndarray, vectors: np.ndarray, reference: tuple[np.ndarray,
                np.ndarray], tested: tuple[np.ndarray, np.ndarray], metric: str,
                tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Agreement of a tested k-NN result with the reference one (ids = rows of ``vectors``).

    ``ok`` when missing neighbours (-1) sit at the same places, every distance is within
    ``tolerance`` x (||q||² + max ||r||²) of the reference one at the same rank, and every id
    only the tested side returns is no worse than the reference's k-th neighbour by more than
    that (exact float64 distance): a tie within rounding, not a wrong candidate.
    """
    ref_d, ref_i = reference
    test_d, test_i = tested
    q64 = queries.astype(np.float64)
    r_max = float(max((np.einsum("ij,ij->i", b, b).max() for b, _ in blocks_of(vectors, 1 << 20)),
                      default=0.0))
    tol = tolerance * ((q64**2).sum(1) + r_max)
    valid = ref_i >= 0
    same_missing = bool((valid == (test_i >= 0)).all())
    err = np.where(valid & (test_i >= 0), np.abs(test_d.astype(np.float64) - ref_d), 0.0)
    worst = float((err / tol[:, None]).max()) if err.size else 0.0
    shared, unexplained = 0, 0
    for row in range(len(ref_i)):
        ref_ids = set(ref_i[row][valid[row]].tolist())
        extra = [t for t in test_i[row].tolist() if t >= 0 and t not in ref_ids]
        shared += len(ref_ids) - len(extra)
        if not extra:
            continue
        x = vectors[np.asarray(extra)].astype(np.float64)
        last = ref_d[row][valid[row]][-1]
        if metric == IP:
            unexplained += int((x @ q64[row] < last - tol[row]).sum())
        else:
            unexplained += int((((x - q64[row]) ** 2).sum(1) > last + tol[row]).sum())
    total = int(valid.sum())
    top1 = float((ref_i[:, 0] == test_i[:, 0]).mean()) if len(ref_i) else 1.0
    return {"ok": same_missing and worst <= 1.0 and unexplained == 0,
            "agreement": shared / total if total else 1.0, "top1": top1,
            "worst": worst, "unexplained": unexplained, "same_missing": same_missing}


def check_knn(name: str, metric: str, vectors: np.ndarray, queries: np.ndarray,
              devices: Sequence[str], block_rows: int, cpu_dtype: str,
              throughput_queries: int) -> list[Row]:
    """The agreement row and the throughput row of one metric."""
    start = time.perf_counter()
    reference = exact(queries, vectors, K, metric, None, block_rows)
    cpu_s = time.perf_counter() - start
    reset_peak(devices)
    tested = exact(queries, vectors, K, metric, devices, block_rows, cpu_dtype)
    result = compare_knn(queries, vectors, reference, tested, metric)
    rows = [Row(name, result["ok"],
                f"{len(queries):,} q x {len(vectors):,} refs: ids {result['agreement']:.2%}, "
                f"top-1 {result['top1']:.2%}, max dist error {result['worst']:.2f} x tol, "
                f"{result['unexplained']} unexplained", f"CPU {len(queries) / cpu_s:,.0f} q/s",
                peak_gib(devices))]
    reset_peak(devices)
    index = TorchFlatIndex(vectors.shape[1], devices, metric, cpu_dtype=cpu_dtype)
    start = time.perf_counter()
    for block, ids in blocks_of(vectors, block_rows):
        index.add(block, ids)
    synchronize(devices)
    upload_s = time.perf_counter() - start
    rng = np.random.default_rng(1)
    q = vectors[rng.choice(len(vectors), throughput_queries, replace=False)]
    index.search(q[:min(len(q), 1024)], K)  # warm-up
    start = time.perf_counter()
    index.search(q, K)
    seconds = time.perf_counter() - start
    rows.append(Row(f"{name} throughput", None,
                    f"{len(q):,} q x {index.ntotal:,} refs held on {len(devices)} device(s); "
                    f"upload {vectors.nbytes / 2**30 / upload_s:.1f} GiB/s",
                    f"{len(q) / seconds:,.0f} q desc/s ({len(q) * index.ntotal / seconds:.3g} "
                    "pairs/s)", peak_gib(devices)))
    del index
    return rows


# ---------------------------------------------------------------- torch stages


def demo_paths(limit: int | None = None) -> tuple[list[str], list[str]]:
    """(query paths, all demo paths) of the bundled demo set."""
    queries = sorted(str(p) for p in (DATA / "queryimages").glob("*.jpg"))
    refs = sorted(str(p) for p in (DATA / "referenceimages").glob("*.jpg"))
    if limit:
        queries, refs = queries[:limit], refs[:limit]
    return queries, queries + refs


def describe(models: list, paths: Sequence[str], section: dict, devices: Sequence[str],
             mirror: bool, workers: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Descriptors (and mirrored ones) of ``paths`` through the stage's own batching."""
    from global_fea import extract

    parts = list(extract.describe_batches(models, paths, section, mirror,
                                          [torch.device(d) for d in devices], workers))
    desc = np.concatenate([d for d, _, _ in parts])
    flipped = np.concatenate([f for _, f, _ in parts]) if mirror else None
    return desc, flipped


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-12)).min()) if len(a) else 1.0


def check_global(conf: dict, devices: Sequence[str], paths: Sequence[str],
                 throughput_images: int) -> list[Row]:
    """Global descriptors on ``devices`` against the CPU, then images/s on ``devices``."""
    from global_fea import extract, weights

    section = conf["global_fea"]
    base = weights.build(section)
    torch.set_num_threads(resolve_n_jobs(-1))
    reference = describe([copy.deepcopy(base)], paths, section, ["cpu"], True, 0)
    reset_peak(devices)
    replicas = [copy.deepcopy(base).to(d) for d in devices]
    workers = extract.loader_workers(section, [torch.device(d) for d in devices], -1)
    tested = describe(replicas, paths, section, devices, True, workers)
    cosine = min(min_cosine(reference[0], tested[0]), min_cosine(reference[1], tested[1]))
    rows = [Row("global", cosine >= MIN_COSINE,
                f"{len(paths)} demo images (+ mirrored) on {len(devices)} device(s): min cosine "
                f"{cosine:.5f} (>= {MIN_COSINE})", "", peak_gib(devices))]
    many = list(itertools.islice(itertools.cycle(paths), throughput_images))
    reset_peak(devices)
    start = time.perf_counter()
    describe(replicas, many, section, devices, False, workers)
    seconds = time.perf_counter() - start
    rows.append(Row("global throughput", None,
                    f"{len(many)} images at {section['image_size']} px, {workers} decoding "
                    f"workers, {len(devices)} device(s)", f"{len(many) / seconds:,.1f} images/s",
                    peak_gib(devices)))
    return rows


def box_iou(a: Any, b: Any) -> float:
    ix = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    iy = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = ix * iy
    union = a.width * a.height + b.width * b.height - inter
    return inter / union if union > 0 else 0.0


def compare_boxes(reference: list, tested: list, sizes: list, pconf: dict) -> tuple[int, int]:
    """(queries whose kept box differs, queries with a kept box on either side)."""
    from preprocess.detect import select_box

    differ, boxed = 0, 0
    for ref_boxes, test_boxes, size in zip(reference, tested, sizes, strict=True):
        a, b = select_box(ref_boxes, size, pconf), select_box(test_boxes, size, pconf)
        if a is None and b is None:
            continue
        boxed += 1
        if a is None or b is None:  # only acceptable at the confidence floor
            kept = a or b
            differ += kept.conf > pconf["min_conf"] + BOX_CONF
        elif box_iou(a, b) < BOX_IOU or abs(a.conf - b.conf) > BOX_CONF:
            differ += 1
    return differ, boxed


def check_detect(conf: dict, devices: Sequence[str], paths: Sequence[str],
                 throughput_images: int, config_dir: Path | None = None) -> list[Row]:
    """Detector boxes on ``devices`` against the CPU, then images/s on ``devices``."""
    try:
        from preprocess.detect import Detector
    except ImportError as err:
        return [Row("detect", None, f"skipped: {err}")]
    pconf = conf["preprocess"]
    threads = resolve_n_jobs(-1)
    try:
        cpu = Detector({**pconf, "device": "cpu"}, threads, config_dir)
    except ImportError as err:  # ultralytics missing: carry its wheel
        return [Row("detect", None, f"skipped: {err}")]
    smalls = [cpu.small(p) for p in paths]
    images, sizes = [s for s, _ in smalls], [z for _, z in smalls]
    reference = cpu.detect(images, sizes)
    reset_peak(devices)
    gpu = Detector({**pconf, "device": ",".join(devices)}, threads, config_dir)
    tested = gpu.detect(images, sizes)
    differ, boxed = compare_boxes(reference, tested, sizes, pconf)
    rows = [Row("detect", differ == 0,
                f"{len(paths)} demo queries on {len(devices)} device(s): {differ} of {boxed} "
                f"kept boxes differ (IoU < {BOX_IOU} or conf off by > {BOX_CONF})", "",
                peak_gib(devices))]
    many = list(itertools.islice(itertools.cycle(range(len(images))), throughput_images))
    reset_peak(devices)
    start = time.perf_counter()
    gpu.detect([images[i] for i in many], [sizes[i] for i in many])
    seconds = time.perf_counter() - start
    rows.append(Row("detect throughput", None,
                    f"{len(many)} decoded queries at {pconf['imgsz']} px, batch "
                    f"{pconf['batch']}, {len(devices)} device(s)",
                    f"{len(many) / seconds:,.1f} images/s", peak_gib(devices)))
    return rows


# ---------------------------------------------------------------- end to end


def run_demo(conf: Sequence[str], work: Path) -> Path:
    """Run the whole pipeline on the demo data with the overrides ``conf`` (``key=value``)
    into ``work``; return its submission CSV. The one place that knows the command."""
    out = work / "submission.csv"
    cmd = [sys.executable, "-m", "pipeline", "run", "--queries", "data/queryimages",
           "--references", "data/referenceimages", "--work", str(work), "--out", str(out)]
    cmd += [arg for item in conf for arg in ("-o", item)]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    return out


def read_scores(path: Path) -> dict[tuple[str, str], float]:
    return {(r["query_id"], r["reference_id"]): float(r["score"]) for r in read_csv(path)}


def compare_submissions(reference: dict[tuple[str, str], float],
                        tested: dict[tuple[str, str], float]) -> tuple[bool, str]:
    """Same pairs, scores within ``SCORE_TOLERANCE`` (a pair on one side only must score
    under it)."""
    shared = reference.keys() & tested.keys()
    delta = max((abs(reference[p] - tested[p]) for p in shared), default=0.0)
    alone = [reference.get(p, tested.get(p, 0.0)) for p in reference.keys() ^ tested.keys()]
    worst_alone = max(alone, default=0.0)
    ok = delta <= SCORE_TOLERANCE and worst_alone <= SCORE_TOLERANCE
    return ok, (f"{len(shared)} pairs on both sides, {len(alone)} on one side only (best "
                f"score {worst_alone:.4f}); max score difference {delta:.4f} "
                f"(<= {SCORE_TOLERANCE})")


def check_demo(work: Path) -> list[Row]:
    common = ["local_search.index=Flat"]  # exact local search on both sides
    cpu_conf = [*common, "local_search.gpu=false", "global_search.gpu=false",
                "global_fea.device=cpu", "preprocess.device=cpu"]
    gpu_conf = [*common, "local_search.gpu=true", "global_search.gpu=true",
                "global_fea.device=auto", "preprocess.device=auto"]
    timings = {}
    try:
        for name, overrides in (("cpu", cpu_conf), ("gpu", gpu_conf)):
            start = time.perf_counter()
            path = run_demo(overrides, work / name)
            timings[name] = (path, time.perf_counter() - start)
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        return [Row("demo", False, f"the pipeline failed: {err}")]
    ok, detail = compare_submissions(read_scores(timings["cpu"][0]),
                                     read_scores(timings["gpu"][0]))
    return [Row("demo", ok, detail, f"CPU {timings['cpu'][1]:.0f} s, GPU "
                                    f"{timings['gpu'][1]:.0f} s (whole pipeline)")]


# ---------------------------------------------------------------- driver


def table(rows: Sequence[Row]) -> str:
    head = ("check", "result", "detail", "figure", "peak GPU mem")
    body = [(r.check, {True: "ok", False: "FAIL", None: "-"}[r.ok], r.detail, r.figure,
             "-" if r.peak_gib is None else f"{r.peak_gib:.2f} GiB") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in [head, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def timed_check(rows: list[Row], name: str, fn: Callable[[], list[Row]]) -> None:
    """Run one check; an exception is a failed row, not a crash of the whole script."""
    start = time.perf_counter()
    try:
        rows += fn()
    except Exception as err:  # reported in the table
        rows.append(Row(name, False, f"{type(err).__name__}: {err}"))
    print(f"[{time.perf_counter() - start:6.1f} s] {name} done", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-selftest", action="store_true",
                        help="compare CPU with CPU (two 'cpu' devices, float16 storage)")
    parser.add_argument("--refs", type=int, help="synthetic 128-d references "
                        "(default 4,000,000; 20,000 with --cpu-selftest)")
    parser.add_argument("--queries", type=int, help="queries checked against the CPU "
                        "(default 2,000; 200 with --cpu-selftest)")
    parser.add_argument("--throughput-queries", type=int, help="queries timed (default "
                        "65,536; 500 with --cpu-selftest)")
    parser.add_argument("--images", type=int, help="images timed per torch stage (default "
                        "2,048; 16 with --cpu-selftest)")
    parser.add_argument("--skip-demo", action="store_true", help="leave out the end-to-end run")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "work" / "gpu_check")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_selftest:
        devices, cpu_dtype = ["cpu", "cpu"], "float16"
        n_refs, n_q, n_tq, n_img = args.refs or 20_000, args.queries or 200, \
            args.throughput_queries or 500, args.images or 16
        limit, block_rows = 8, 6_000
    else:
        devices, cpu_dtype = gpu_devices(), "float32"
        if not devices:
            print("no GPU: torch sees no CUDA device, nothing to check here "
                  "(python -m bench.gpu_check --cpu-selftest runs the comparisons on the CPU)")
            return 0
        n_refs, n_q, n_tq, n_img = args.refs or 4_000_000, args.queries or 2_000, \
            args.throughput_queries or 65_536, args.images or 2_048
        limit, block_rows = None, 1 << 20
    names = ", ".join(torch.cuda.get_device_name(d) for d in devices if d.startswith("cuda"))
    print(f"devices: {', '.join(devices)}{f' ({names})' if names else ''}; torch "
          f"{torch.__version__}; faiss {'yes' if have_faiss() else 'no (torch CPU reference)'}",
          flush=True)
    conf = load_config(overrides=["preprocess.batch=2", "global_fea.batch_size=4"]
                       if args.cpu_selftest else [])  # several batches per device
    rows: list[Row] = []
    rng = np.random.default_rng(0)
    sift = sift_like(n_refs, rng)
    sift_q = near_queries(sift, n_q, rng, 6.0, True)
    timed_check(rows, "knn-l2", functools.partial(
        check_knn, "knn-l2", L2, sift, sift_q, devices, block_rows, cpu_dtype, n_tq))
    del sift, sift_q
    unit = unit_vectors(max(1, n_refs // 4), rng)
    unit_q = near_queries(unit, n_q, rng, 0.02, False)
    timed_check(rows, "knn-ip", functools.partial(
        check_knn, "knn-ip", IP, unit, unit_q, devices, block_rows, cpu_dtype, n_tq))
    del unit, unit_q
    queries, everything = demo_paths(limit)
    timed_check(rows, "global", functools.partial(check_global, conf, devices, everything,
                                                  n_img))
    timed_check(rows, "detect", functools.partial(check_detect, conf, devices, queries, n_img,
                                                  args.work / "ultralytics"))
    if args.cpu_selftest or args.skip_demo:
        rows.append(Row("demo", None, "skipped (--cpu-selftest or --skip-demo)"))
    else:
        for side in ("cpu", "gpu"):
            shutil.rmtree(args.work / side, ignore_errors=True)
        timed_check(rows, "demo", functools.partial(check_demo, args.work))
    print(table(rows))
    failed = [r.check for r in rows if r.ok is False]
    print(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed
          else "every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
