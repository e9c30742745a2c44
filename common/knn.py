"""Exact k-NN, streamed over blocks of the database into result heaps, on CPU or GPUs.

Memory is set by the block size, not by the size of the database: each block goes into a flat
index and its hits are merged into ``faiss.ResultHeap``s, query batch by query batch. Both
branches use it: local descriptors with squared L2 distances, global descriptors with inner
products (cosine similarity of L2-normalised vectors).

Where it runs is a ``Backend``, chosen from a section's ``gpu`` setting by ``select_backend``:

- ``faiss-cpu``: one ``faiss.IndexFlat`` per block (the default without GPUs);
- ``faiss-gpu``: float16 ``GpuIndexFlat`` cells spread over every GPU faiss sees (first
  choice when faiss-gpu is installed and sees GPUs);
- ``torch``: ``common.torch_knn.TorchFlatIndex`` on every CUDA device torch sees, float16
  (the GPU path where faiss-gpu is not installed; also runs on "cpu" devices, for tests).

``gpu: auto`` takes the first of faiss-gpu, torch CUDA, faiss-cpu that is usable; ``true``
requires a GPU backend (a one-line ``UserError`` otherwise); ``false`` is always faiss-cpu.
Every backend returns the same neighbours (the GPU ones up to float16 rounding of the
vectors), missing neighbours (id -1) and ties included (for exact duplicates straddling the
k-th inner product, see ``common.torch_knn``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from common import UserError
from common.devices import cuda_devices, faiss_gpus

if TYPE_CHECKING:
    from common.torch_knn import TorchFlatIndex

log = logging.getLogger(__name__)

L2, IP = "l2", "ip"
QUERY_BATCH = 65536  # query vectors per search call: bounds faiss' result buffers
GPU_CELL_ROWS = 1 << 22  # vectors per GPU flat index (1 GiB of 128-d float16): adds stay cheap
FAISS_CPU, FAISS_GPU, TORCH = "faiss-cpu", "faiss-gpu", "torch"


@dataclass(frozen=True)
class Backend:
    """Where exact search runs: ``kind`` (faiss-cpu, faiss-gpu or torch), the devices (faiss
    GPU numbers, or torch device names) and, for torch, the storage dtype on CUDA and on CPU
    (float32; float16 only to mimic a GPU's rounding in tests)."""

    kind: str = FAISS_CPU
    devices: tuple[str, ...] = ()
    dtype: str = "float16"
    cpu_dtype: str = "float32"

    @property
    def gpu(self) -> bool:
        """Whether it runs on GPUs."""
        return self.n_gpus > 0

    @property
    def n_gpus(self) -> int:
        if self.kind == FAISS_GPU:
            return len(self.devices)
        return sum(d.startswith("cuda") for d in self.devices) if self.kind == TORCH else 0

    @property
    def label(self) -> str:
        """What the log says: ``faiss-cpu``, ``faiss-gpu x8``, ``torch cuda x8 fp16``."""
        if self.kind == FAISS_CPU:
            return FAISS_CPU
        if self.kind == FAISS_GPU:
            return f"{FAISS_GPU} x{len(self.devices)}"
        from common.torch_knn import SHORT, storage_dtype

        kind = "cuda" if self.gpu else "cpu"
        dtype = storage_dtype(self.devices[0], self.dtype, self.cpu_dtype)
        return f"torch {kind} x{len(self.devices)} {SHORT[dtype]}"

    def bytes_per_vector(self, dim: int) -> int:
        """Device memory per stored vector (float16 and, for torch, its norm and id)."""
        if self.kind == FAISS_GPU:
            return 2 * dim
        if self.kind == TORCH:
            from common.torch_knn import storage_dtype

            item = storage_dtype(self.devices[0], self.dtype, self.cpu_dtype).itemsize
            return item * dim + 4 + 8
        return 4 * dim

    def index(self, dim: int, metric: str = L2) -> FlatIndex | TorchFlatIndex:
        """An empty flat index of this backend (``FlatIndex`` or ``TorchFlatIndex``)."""
        if self.kind == TORCH:
            from common.torch_knn import TorchFlatIndex

            return TorchFlatIndex(dim, self.devices, metric, self.dtype,
                                  cpu_dtype=self.cpu_dtype)
        return FlatIndex(dim, self.kind == FAISS_GPU, metric)


CPU = Backend()


def torch_backend(devices: Sequence[str], dtype: str = "float16",
                  cpu_dtype: str = "float32") -> Backend:
    """The torch backend on ``devices`` (e.g. every ``cuda:N``; ``["cpu", "cpu"]`` in tests)."""
    return Backend(TORCH, tuple(devices), dtype, cpu_dtype)


def auto_backend() -> Backend:
    """faiss-gpu on every GPU it sees, else torch on every CUDA device, else faiss-cpu."""
    n = faiss_gpus()
    if n:
        return Backend(FAISS_GPU, tuple(str(i) for i in range(n)))
    devices = cuda_devices()
    return torch_backend(devices) if devices else CPU


def backend_of(gpu: bool | Backend) -> Backend:
    """A backend from what callers pass: a ``Backend``, or ``True`` (the best GPU backend
    there is, faiss-cpu without GPUs) / ``False`` (faiss-cpu)."""
    if isinstance(gpu, Backend):
        return gpu
    return auto_backend() if gpu else CPU


_ANNOUNCED: set[tuple[str, str]] = set()
_ANNOUNCE_LOCK = threading.Lock()


def announce(what: str, backend: Backend) -> None:
    """Log which backend runs ``what`` (info the first time in a process, debug after)."""
    with _ANNOUNCE_LOCK:
        first = (what, backend.label) not in _ANNOUNCED
        _ANNOUNCED.add((what, backend.label))
    log.log(logging.INFO if first else logging.DEBUG, "%s: exact search on %s", what,
            backend.label)


def select_backend(section: dict[str, Any], name: str) -> Backend:
    """The backend a section's ``gpu`` setting asks for (``name`` names the section)."""
    setting = section["gpu"]
    if not (setting == "auto" or isinstance(setting, bool)):
        raise UserError(f"{name}.gpu must be auto, true or false, not {setting!r}")
    backend = auto_backend() if setting else CPU
    if setting is True and not backend.gpu:
        raise UserError(f"{name}.gpu is true but no GPU is usable: faiss sees no GPU (faiss-gpu "
                        "not installed?) and torch sees no CUDA device")
    announce(name, backend)
    return backend


def use_gpu(section: dict[str, Any], name: str) -> bool:
    """``gpu: auto`` uses GPUs whenever faiss-gpu or torch sees one; ``true`` requires one."""
    return select_backend(section, name).gpu


class FlatIndex:
    """Exact k-NN with Faiss (squared L2 or inner product) over descriptors added block by
    block, with their int64 ids.

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

    def add(self, index: FlatIndex | TorchFlatIndex) -> None:
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
    queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
    gpu: bool | Backend, metric: str = L2, query_batch: int = QUERY_BATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``queries`` over ``(vectors, ids)`` blocks, merged in result heaps, on
    ``gpu`` (a ``Backend``, or a bool: ``backend_of``).

    Returns ``(distances, ids)``: squared L2 distances ascending, or inner products
    descending for ``metric="ip"``; missing neighbours have id -1.
    """
    backend = backend_of(gpu)
    announce(f"exact {metric} search", backend)
    queries = np.ascontiguousarray(queries, np.float32)
    heaps = QueryHeaps(queries, k, query_batch, metric)
    index = backend.index(queries.shape[1], metric)
    for vectors, ids in blocks:
        index.add(vectors, ids)
        heaps.add(index.finish())
        index.reset()
    return heaps.result()
