"""Exact k-NN with Faiss, streamed over blocks of the database into result heaps.

Memory is set by the block size, not by the size of the database: each block goes into a
``FlatIndex`` (on CPU one flat index; with GPUs float16 cells spread over all of them) and
its hits are merged into ``faiss.ResultHeap``s, query batch by query batch. Both branches use
it: local descriptors with squared L2 distances, global descriptors with inner products
(cosine similarity of L2-normalised vectors).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np

from common import UserError
from common.devices import faiss_gpus

L2, IP = "l2", "ip"
QUERY_BATCH = 65536  # query vectors per search call: bounds faiss' result buffers
GPU_CELL_ROWS = 1 << 22  # vectors per GPU flat index (1 GiB of 128-d float16): adds stay cheap


def use_gpu(section: dict[str, Any], name: str) -> bool:
    """``gpu: auto`` uses GPUs whenever faiss sees one; ``true`` requires one."""
    n = faiss_gpus()
    if section["gpu"] is True and n == 0:
        raise UserError(f"{name}.gpu is true but faiss sees no GPU (faiss-gpu installed?)")
    return bool(section["gpu"]) and n > 0


class FlatIndex:
    """Exact L2 k-NN over descriptors added block by block, with their int64 ids.

    On CPU one ``IndexFlatL2``. With ``gpu``, float16 ``GpuIndexFlatL2`` cells of at most
    ``GPU_CELL_ROWS`` descriptors spread evenly over every visible GPU (faiss' multi-GPU
    sharding, with bounded cells so that adding never reallocates a whole GPU's data); each
    GPU is searched by its own thread and the results merged.
    """

    def __init__(self, dim: int, gpu: bool = False, metric: str = L2):
        self.dim, self.metric = dim, metric
        self.n_devices = faiss_gpus() if gpu else 0
        self.resources = [faiss.StandardGpuResources() for _ in range(self.n_devices)]
        self.cells: list[list[tuple[faiss.Index, list[np.ndarray]]]] = [
            [] for _ in range(max(1, self.n_devices))]
        self.ntotal = 0

    def _new_cell(self, device: int) -> faiss.Index:
        if not self.n_devices:
            return faiss.IndexFlatIP(self.dim) if self.metric == IP else faiss.IndexFlatL2(self.dim)
        config = faiss.GpuIndexFlatConfig()
        config.device = device
        config.useFloat16 = True
        gpu_flat = faiss.GpuIndexFlatIP if self.metric == IP else faiss.GpuIndexFlatL2
        return gpu_flat(self.resources[device], self.dim, config)

    def _rows(self, device: int) -> int:
        return sum(cell.ntotal for cell, _ in self.cells[device])

    def add(self, desc: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors (float32, n x dim) with their ids, to the least-filled device."""
        start = 0
        while start < len(desc):
            device = min(range(len(self.cells)), key=self._rows)
            cells = self.cells[device]
            if not cells or (self.n_devices and cells[-1][0].ntotal >= GPU_CELL_ROWS):
                cells.append((self._new_cell(device), []))
            cell, cell_ids = cells[-1]
            room = GPU_CELL_ROWS - cell.ntotal if self.n_devices else len(desc)
            stop = min(len(desc), start + room)
            cell.add(np.ascontiguousarray(desc[start:stop], np.float32))
            cell_ids.append(np.asarray(ids[start:stop], np.int64))
            self.ntotal += stop - start
            start = stop

    def reset(self) -> None:
        """Drop every cell, freeing its memory (host or GPU)."""
        for cells in self.cells:
            cells.clear()
        self.ntotal = 0

    def finish(self) -> FlatIndex:
        """Join each cell's id arrays once (searching works without it, just slower)."""
        for cells in self.cells:
            for _, cell_ids in cells:
                if len(cell_ids) > 1:
                    cell_ids[:] = [np.concatenate(cell_ids)]
        return self

    def _search_device(self, device: int, queries: np.ndarray, k: int):
        heap = faiss.ResultHeap(len(queries), k, keep_max=self.metric == IP)
        for cell, cell_ids in self.cells[device]:
            if cell.ntotal == 0:
                continue
            ids = cell_ids[0] if len(cell_ids) == 1 else np.concatenate(cell_ids)
            dist, idx = cell.search(queries, min(k, cell.ntotal))
            heap.add_result(dist, np.where(idx >= 0, ids[np.maximum(idx, 0)], -1))
        heap.finalize()
        return heap.D, heap.I

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest (distance or similarity, id) of each query; missing neighbours are -1."""
        queries = np.ascontiguousarray(queries, np.float32)
        devices = range(len(self.cells))
        if len(self.cells) == 1:
            return self._search_device(0, queries, k)
        with ThreadPoolExecutor(len(self.cells)) as pool:  # one thread per GPU
            parts = list(pool.map(lambda d: self._search_device(d, queries, k), devices))
        heap = faiss.ResultHeap(len(queries), k, keep_max=self.metric == IP)
        for dist, idx in parts:
            heap.add_result(dist, idx)
        heap.finalize()
        return heap.D, heap.I


class QueryHeaps:
    """k-NN results of a query set over several reference blocks, searched in query batches."""

    def __init__(self, queries: np.ndarray, k: int, batch: int = QUERY_BATCH,
                 metric: str = L2):
        self.queries, self.k = np.ascontiguousarray(queries, np.float32), k
        self.batches = [(s, min(s + batch, len(queries)))
                        for s in range(0, len(queries), max(1, batch))]
        self.heaps = [faiss.ResultHeap(stop - start, k, keep_max=metric == IP)
                      for start, stop in self.batches]

    def add(self, index: FlatIndex) -> None:
        """Merge the k-NN of every query batch in ``index`` (one reference block)."""
        if index.ntotal == 0:
            return
        for (start, stop), heap in zip(self.batches, self.heaps, strict=True):
            heap.add_result(*index.search(self.queries[start:stop], self.k))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        for heap in self.heaps:
            heap.finalize()
        if not self.heaps:
            return np.zeros((0, self.k), np.float32), np.zeros((0, self.k), np.int64)
        return (np.concatenate([h.D for h in self.heaps]),
                np.concatenate([h.I for h in self.heaps]))


def exact_search(
    queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, gpu: bool,
    metric: str = L2, query_batch: int = QUERY_BATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``queries`` over ``(vectors, ids)`` blocks, merged in result heaps.

    Returns ``(distances, ids)``: squared L2 distances ascending, or inner products
    descending for ``metric="ip"``; missing neighbours have id -1.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    heaps = QueryHeaps(queries, k, query_batch, metric)
    index = FlatIndex(queries.shape[1], gpu, metric)
    for vectors, ids in blocks:
        index.add(vectors, ids)
        heaps.add(index.finish())
        index.reset()
    return heaps.result()
