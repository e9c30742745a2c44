"""What the GPU-against-CPU checks compare (``tests/test_gpu.py``): synthetic descriptors,
exact k-NN on either side, and the agreement of two results within float16 rounding."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import REPO_ROOT
from common.io import read_csv
from common.torch_knn import IP, TorchFlatIndex

DATA = REPO_ROOT / "data"
TOLERANCE = 2.0**-9  # of ||q||² + max ||r||²: float16 rounding of the vectors, with room
BOX_IOU, BOX_CONF = 0.9, 0.02
SCORE_TOLERANCE = 0.01


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


def exact(queries: np.ndarray, vectors: np.ndarray, k: int, metric: str,
          devices: Sequence[str] | None, block_rows: int,
          cpu_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``queries`` in ``vectors`` (ids = rows): with ``devices`` None the
    CPU path (faiss-cpu), else torch on ``devices``, streamed in blocks as the pipeline does
    (``common.knn.exact_search``); without faiss, ``TorchFlatIndex`` alone (CPU: float32)."""
    try:
        from common import knn
    except ImportError:  # no faiss (the GPU machine may lack it)
        index = TorchFlatIndex(vectors.shape[1], devices or ["cpu"], metric,
                               cpu_dtype=cpu_dtype if devices else "float32")
        for block, ids in blocks_of(vectors, block_rows):
            index.add(block, ids)
        return index.search(queries, k)
    backend = knn.CPU if devices is None else knn.torch_backend(devices, cpu_dtype=cpu_dtype)
    return knn.exact_search(queries, blocks_of(vectors, block_rows), k, backend, metric)


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


def demo_paths(limit: int | None = None) -> tuple[list[str], list[str]]:
    """(query paths, all demo paths) of the bundled demo set."""
    queries = sorted(str(p) for p in (DATA / "queryimages").glob("*.jpg"))
    refs = sorted(str(p) for p in (DATA / "referenceimages").glob("*.jpg"))
    if limit:
        queries, refs = queries[:limit], refs[:limit]
    return queries, queries + refs


def describe(models: list, paths: Sequence[str], section: dict, devices: Sequence[str],
             workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors and mirrored descriptors of ``paths`` through the stage's own batching."""
    from global_fea import extract

    parts = list(extract.describe_batches(models, paths, section, True,
                                          [torch.device(d) for d in devices], workers))
    return np.concatenate([d for d, _, _ in parts]), np.concatenate([f for _, f, _ in parts])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-12)).min()) if len(a) else 1.0


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


def run_demo(overrides: Sequence[str], work: Path) -> dict[tuple[str, str], float]:
    """The pipeline on the demo data with ``overrides`` (``key=value``) into ``work``: the
    scores of its submission."""
    out = work / "submission.csv"
    cmd = [sys.executable, "-m", "copydet", "run", "--queries", "data/queryimages",
           "--references", "data/referenceimages", "--work", str(work), "--out", str(out)]
    cmd += [arg for item in overrides for arg in ("-o", item)]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True)
    return {(r["query_id"], r["reference_id"]): float(r["score"]) for r in read_csv(out)}


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
