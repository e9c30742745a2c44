"""Exact k-NN with torch: float16 (or bfloat16) matrix products on every GPU, float32 on CPU.

``TorchFlatIndex`` has the interface of ``common.knn.FlatIndex`` (``add`` / ``search`` /
``reset`` / ``finish`` / ``ntotal``), so the streamed exact search of ``common.knn`` and
``local_fea.index`` runs on it unchanged:

- ``add`` copies a block of vectors host → device, in segments spread over the devices
  (least-filled first, a large block split evenly), stored scaled by a power of two (so no
  product overflows float16 and nothing is rounded but the storage itself) with their squared
  norms (float32) and int64 ids on the device;
- ``search`` runs one thread per device: query tiles × reference tiles, squared L2 as
  ``||q||² + ||r||² − 2 q·r`` (float32 products of the float16 vectors where torch offers
  them: ``torch.mm(..., out_dtype=float32)`` on CUDA) or inner products, top-k on the device,
  each tile's k best merged into a running k best on the device; the devices' results are
  then merged on the host. A tile costs one matrix product and, for L2, one elementwise pass
  (the tile is ranked by ``||r||² − 2 q·r``; ``||q||²`` is added to the k best only, which
  are then clamped at 0 as Faiss does), so the search is bound by the GPU's matrix products
  and memory bandwidth, not by bookkeeping.

Ties: among equal values the smaller ids are kept (exactly, also at the k-th place: a tile
whose k-th candidate ties with the last one ``topk`` returned is re-ranked in full), and the
kept ones are listed as Faiss lists them: by increasing id for L2, by decreasing id for inner
products. For L2 with ids increasing in the order vectors are added (both callers) this is
Faiss' own result, ties straddling the k-th place included. For inner products Faiss' heap
keeps, of several exactly equal similarities straddling the k-th place, a subset that depends
on the order in which better vectors arrived; only there (exact duplicates of a vector) can
the two differ, by which duplicate fills the last places. Missing neighbours (fewer vectors
than k) have id -1 and the distance Faiss gives them (±FLT_MAX). With ``devices=["cpu"]``
(or several "cpu" entries, to exercise the per-device merge) the same code runs on the CPU
in float32: the tests compare it with Faiss' exact search there.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

L2, IP = "l2", "ip"
FLT_MAX = float(np.finfo(np.float32).max)  # Faiss' distance of a missing neighbour
ID_MAX = torch.iinfo(torch.int64).max
SEGMENT_ROWS = 1 << 20  # vectors per stored segment (256 MiB of 128-d float16)
MIN_SPLIT_ROWS = 4096  # a block is split over the devices into parts of at least this
UPLOAD_ROWS = 1 << 18  # rows per host -> device copy (bounds the float32 staging tensor)
QUERY_TILE = 8192  # queries per distance tile
REF_TILE = 32768  # references per distance tile: 8192 x 32768 float32 = 1 GiB
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def storage_dtype(device: str | torch.device, dtype: str = "float16",
                  cpu_dtype: str = "float32") -> torch.dtype:
    """The dtype vectors are stored and multiplied in: ``dtype`` on CUDA, ``cpu_dtype``
    (float32; float16 only to mimic a GPU's rounding in tests) elsewhere."""
    for name in (dtype, cpu_dtype):
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {name!r}")
    return DTYPES[dtype] if torch.device(device).type == "cuda" else DTYPES[cpu_dtype]


def _pow2_exponent(max_norm: float) -> int:
    """``e`` such that vectors of norm ``max_norm`` scaled by ``2**-e`` have norm <= 1."""
    return math.ceil(math.log2(max_norm)) if max_norm > 0 and math.isfinite(max_norm) else 0


@functools.cache
def _float32_products(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm`` gives float32 products of ``dtype`` matrices on ``device``."""
    if dtype == torch.float32:
        return False  # plain float32 products
    a = torch.ones((2, 4), dtype=dtype, device=device)
    try:
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def products(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``q @ r.T`` as float32 (float32 accumulation and output where torch offers it; else
    the float16 output of the product of vectors scaled to norm <= 1, widened)."""
    if _float32_products(str(q.device), q.dtype):
        return torch.mm(q, r.t(), out_dtype=torch.float32)
    return torch.mm(q, r.t()).float()


def missing_value(metric: str) -> float:
    """The distance (L2) or similarity (IP) of a missing neighbour: the worst possible."""
    return -FLT_MAX if metric == IP else FLT_MAX


def select_best(values: torch.Tensor, ids: torch.Tensor, k: int,
                largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best (value, id) of each row, best first, as Faiss keeps and orders them:
    among equal values the smaller ids are kept, and listed by increasing id (L2) or
    decreasing id (inner product, ``largest``); id -1 (missing) after every real one. Rows
    with fewer than ``k`` are padded with (worst value, -1)."""
    n, m = values.shape
    if m < k:
        worst = -math.inf if largest else math.inf
        values = torch.cat([values, values.new_full((n, k - m), worst)], 1)
        ids = torch.cat([ids, ids.new_full((n, k - m), -1)], 1)
    by_id = torch.argsort(torch.where(ids < 0, ID_MAX, ids), dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = torch.argsort(values, dim=1, descending=largest, stable=True)[:, :k]
    values, ids = values.gather(1, by_value), ids.gather(1, by_value)
    if largest:  # Faiss lists equal similarities by decreasing id
        by_id = torch.argsort(ids, dim=1, descending=True, stable=True)
        values, ids = values.gather(1, by_id), ids.gather(1, by_id)
        by_value = torch.argsort(values, dim=1, descending=True, stable=True)
        values, ids = values.gather(1, by_value), ids.gather(1, by_value)
    return values, ids


def tile_topk(dist: torch.Tensor, ids: torch.Tensor, k: int,
              largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best (value, id) of each row of ``dist`` (columns named by ``ids``), with the
    tie rule of ``select_best``, exact even when ties straddle the k-th place."""
    n_cols = dist.shape[1]
    k2 = min(n_cols, 2 * k)
    vals, cols = torch.topk(dist, k2, dim=1, largest=largest, sorted=False)
    best_v, best_i = select_best(vals, ids[cols], k, largest)
    if k2 < n_cols:  # candidates tied with the last value topk kept may have been cut
        last = vals.amin(1) if largest else vals.amax(1)
        rows = torch.nonzero(best_v[:, -1] == last).flatten()
        if len(rows):
            full_v, full_i = select_best(dist[rows], ids.expand(len(rows), -1), k, largest)
            best_v[rows], best_i[rows] = full_v, full_i
    return best_v, best_i


@dataclass
class Segment:
    """Vectors stored on one device: ``vectors * 2**-exponent`` in the storage dtype, their
    squared norms (float32, of the stored values) and their ids."""

    vectors: torch.Tensor
    norms: torch.Tensor
    ids: torch.Tensor
    exponent: int

    def __len__(self) -> int:
        return self.vectors.shape[0]


class TorchFlatIndex:
    """Exact k-NN (squared L2 or inner product) over vectors added block by block, on one or
    more torch devices (module docstring)."""

    def __init__(self, dim: int, devices: Sequence[str] = ("cpu",), metric: str = L2,
                 dtype: str = "float16", query_tile: int = QUERY_TILE,
                 ref_tile: int = REF_TILE, segment_rows: int = SEGMENT_ROWS,
                 cpu_dtype: str = "float32"):
        if metric not in (L2, IP):
            raise ValueError(f"metric must be {L2!r} or {IP!r}, not {metric!r}")
        if not devices:
            raise ValueError("no device to search on")
        self.dim, self.metric = dim, metric
        self.devices = [torch.device(d) for d in devices]
        self.dtypes = [storage_dtype(d, dtype, cpu_dtype) for d in self.devices]
        self.query_tile, self.ref_tile = max(1, query_tile), max(1, ref_tile)
        self.segment_rows = max(1, segment_rows)
        self.segments: list[list[Segment]] = [[] for _ in self.devices]
        self.ntotal = 0

    def _rows(self, d: int) -> int:
        return sum(len(s) for s in self.segments[d])

    def _upload(self, d: int, desc: np.ndarray, ids: np.ndarray) -> Segment:
        device, dtype = self.devices[d], self.dtypes[d]
        chunks = [np.ascontiguousarray(desc[s:s + UPLOAD_ROWS], np.float32)
                  for s in range(0, len(desc), UPLOAD_ROWS)]
        max_sq = max(float(np.einsum("ij,ij->i", c, c).max()) for c in chunks)
        exponent = _pow2_exponent(math.sqrt(max_sq))
        vectors = torch.empty((len(desc), self.dim), dtype=dtype, device=device)
        start = 0
        for chunk in chunks:  # never scaled in place: on the CPU it may be the caller's array
            scaled = torch.from_numpy(chunk).to(device) * 2.0 ** -exponent
            vectors[start:start + len(chunk)] = scaled
            start += len(chunk)
        norms = vectors.float().square().sum(1)  # not in place: float() may be a no-op
        return Segment(vectors, norms, torch.tensor(ids, device=device), exponent)

    def add(self, desc: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors (n x dim) with their int64 ids: a large block is split evenly over the
        devices, each part going to the least-filled one, in segments of bounded size."""
        desc = np.asarray(desc)
        ids = np.ascontiguousarray(ids, np.int64)
        if len(desc) != len(ids):
            raise ValueError(f"{len(desc)} vectors but {len(ids)} ids")
        if len(desc) == 0:
            return
        if desc.ndim != 2 or desc.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {desc.shape}, expected (n, {self.dim})")
        parts = min(len(self.devices), max(1, len(desc) // MIN_SPLIT_ROWS))
        bounds = np.linspace(0, len(desc), parts + 1).astype(int)
        for start, stop in itertools.pairwise(bounds.tolist()):
            d = min(range(len(self.devices)), key=self._rows)
            for s in range(start, stop, self.segment_rows):
                e = min(stop, s + self.segment_rows)
                self.segments[d].append(self._upload(d, desc[s:e], ids[s:e]))
            self.ntotal += stop - start

    def reset(self) -> None:
        """Drop every stored vector (the device memory returns to torch's allocator)."""
        for segments in self.segments:
            segments.clear()
        self.ntotal = 0

    def finish(self) -> TorchFlatIndex:
        """Nothing to join (``common.knn.FlatIndex`` interface)."""
        return self

    def _search_device(self, d: int, queries: np.ndarray,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k best (value, id) of every query among device ``d``'s vectors, on the CPU."""
        device, dtype, largest = self.devices[d], self.dtypes[d], self.metric == IP
        out_v, out_i = [], []
        context = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with context, torch.inference_mode():
            for qs in range(0, len(queries), self.query_tile):
                q32 = torch.from_numpy(queries[qs:qs + self.query_tile]).to(device)
                q_exp = _pow2_exponent(float(q32.double().norm(dim=1).max()))
                q = (q32 * 2.0 ** -q_exp).to(dtype)  # a copy: q32 may be the caller's array
                q_norms = q.float().square().sum(1, keepdim=True) * 4.0**q_exp  # true ||q||²
                best_v = torch.full((len(q), 0), 0.0, device=device)
                best_i = torch.full((len(q), 0), -1, dtype=torch.int64, device=device)
                for seg in self.segments[d]:
                    scale = 2.0 ** (q_exp + seg.exponent)  # of the stored products
                    for rs in range(0, len(seg), self.ref_tile):
                        r = seg.vectors[rs:rs + self.ref_tile]
                        tile = products(q, r)  # one write of the tile, then one pass for L2:
                        if not largest:  # rank by ||r||² − 2 q·r (||q||² is the row's own)
                            bias = seg.norms[rs:rs + len(r)] * 2.0 ** (seg.exponent - q_exp)
                            torch.add(bias, tile, alpha=-2.0, out=tile)
                        v, i = tile_topk(tile, seg.ids[rs:rs + len(r)], k, largest)
                        del tile
                        v = v * scale  # exact: a power of two
                        if not largest:  # ||q||² + ||r||² − 2 q·r, >= 0 as in Faiss
                            v = v.add_(q_norms).clamp_(min=0)
                        best_v, best_i = select_best(torch.cat([best_v, v], 1),
                                                     torch.cat([best_i, i], 1), k, largest)
                out_v.append(best_v.cpu())
                out_i.append(best_i.cpu())
        return torch.cat(out_v), torch.cat(out_i)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest (squared L2 distance ascending, or inner product descending) and their
        ids; missing neighbours have id -1 and distance ±FLT_MAX, as with Faiss."""
        queries = np.ascontiguousarray(queries, np.float32)
        if len(queries) == 0 or k <= 0:
            return np.zeros((len(queries), max(k, 0)), np.float32), np.full(
                (len(queries), max(k, 0)), -1, np.int64)
        used = [d for d in range(len(self.devices)) if self.segments[d]] or [0]
        if len(used) == 1:
            parts = [self._search_device(used[0], queries, k)]
        else:
            with ThreadPoolExecutor(len(used)) as pool:  # one thread per device
                parts = list(pool.map(lambda d: self._search_device(d, queries, k), used))
        values, ids = select_best(torch.cat([v for v, _ in parts], 1),
                                  torch.cat([i for _, i in parts], 1), k, self.metric == IP)
        values = values.numpy().astype(np.float32)
        ids = ids.numpy().astype(np.int64)
        values[ids < 0] = missing_value(self.metric)
        return values, ids
