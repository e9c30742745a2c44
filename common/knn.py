"""Exact k-NN with Faiss, streamed over blocks of the database into a result heap.

Memory is set by the block size, not by the size of the database: each block goes through a
flat index (on all GPUs in float16 when faiss sees any) and its hits are merged into a
``faiss.ResultHeap``. Both branches use it: local descriptors with squared L2 distances,
global descriptors with inner products (cosine similarity of L2-normalised vectors).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import faiss
import numpy as np

from common import UserError

L2, IP = "l2", "ip"


def use_gpu(section: dict[str, Any], name: str) -> bool:
    """``gpu: auto`` uses GPUs whenever faiss sees one; ``true`` requires one."""
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if section["gpu"] is True and n == 0:
        raise UserError(f"{name}.gpu is true but faiss sees no GPU (faiss-gpu installed?)")
    return bool(section["gpu"]) and n > 0


def flat_index(dim: int, gpu: bool, metric: str = L2) -> faiss.Index:
    """An exact index; on GPUs it is sharded over all of them and stores float16."""
    index = faiss.IndexFlatIP(dim) if metric == IP else faiss.IndexFlatL2(dim)
    if not gpu:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = True
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


def exact_search(
    queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, gpu: bool,
    metric: str = L2,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``queries`` over ``(vectors, ids)`` blocks, merged in a result heap.

    Returns ``(distances, ids)``: squared L2 distances ascending, or inner products
    descending for ``metric="ip"``; missing neighbours have id -1.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    keep_max = metric == IP
    heap = faiss.ResultHeap(len(queries), k, keep_max=keep_max)
    empty = -np.inf if keep_max else np.inf
    index = flat_index(queries.shape[1], gpu, metric)
    for vectors, ids in blocks:
        if not len(vectors):
            continue
        index.reset()
        index.add(np.ascontiguousarray(vectors, np.float32))
        dist, idx = index.search(queries, min(k, len(vectors)))
        if dist.shape[1] < k:  # a block smaller than k: pad with empty results
            pad = k - dist.shape[1]
            dist = np.hstack([dist, np.full((len(dist), pad), empty, np.float32)])
            idx = np.hstack([idx, np.full((len(idx), pad), -1, np.int64)])
        heap.add_result(np.ascontiguousarray(dist, np.float32),
                        np.ascontiguousarray(np.where(idx >= 0, ids[idx], -1), np.int64))
    heap.finalize()
    return heap.D, heap.I
