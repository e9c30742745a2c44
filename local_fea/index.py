"""Faiss search of RootSIFT descriptors: a trained CPU index, or exact search streamed in blocks.

Reference descriptors are identified by ``image_number << ROW_BITS | row`` (int64), so a hit
names its reference image without any side table. The CPU default is an IVF index from an
``index_factory`` string (``auto``: picked by the number of references, ``concrete_index``)
whose quantiser was trained on training photos (never on the references: ISC rule), shipped
under ``local_fea/assets``; ``ReferenceIndex`` keeps the populated index of a reference store
on disk, in parts of bounded size, and extends it incrementally with new shards; removed
references are left out at search time (``IndexSearch``; ``PartedSearch`` reads the parts one
at a time). Exact search
(``"Flat"``, and always when GPUs are visible) loads reference blocks of bounded size into
flat indexes (``common.knn``: float16 on every GPU, through faiss-gpu or torch) and merges
each block's k-NN into a ``faiss.ResultHeap``, query batch by query batch, so memory is set
by the block and batch sizes, not by the number of references; a reference set that fits in
one block is loaded once and kept.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
from tqdm import tqdm

from common import UserError, knn
from common.config import repo_path
from common.io import atomic_path
from common.shards import ShardStore

log = logging.getLogger(__name__)

ROW_BITS = 20
EXACT = "Flat"
DIM = 128
AUTO = "auto"


class AutoIndex(NamedTuple):
    """One step of ``index: auto``: the factory string and nprobe used for reference sets of
    at most ``max_references`` images (None: no bound)."""

    factory: str
    nprobe: int
    max_references: int | None


# Fewer lists make assigning a descriptor to its list cheaper (what dominates adding and
# searching up to ~10^4 references); more lists make the searched lists shorter (what
# dominates at scale: the codes scanned per query descriptor are nprobe / nlist of all).
# Beyond 30,000 references a 16,384-list quantiser searched through HNSW (trained by two-level
# k-means) at nprobe 16 scans a quarter of the codes of IVF4096 at 16 and finds the same
# copies; it costs twice as much to add to, and searching it costs more per query descriptor
# before the lists are long: it is the cheaper index from about 33,000 references when one
# query is searched for every four references added (docs/scale_bench.md; at nprobe 8 it lost
# one of 150 copies against real distractors).
AUTO_INDEXES = (AutoIndex("IVF1024,PQ64x4fs", 8, 15_000),
                AutoIndex("IVF4096,PQ64x4fs", 16, 30_000),
                AutoIndex("IVF16384_HNSW32,PQ64x4fs", 16, None))
HNSW_EF_MIN = 64  # an HNSW coarse quantiser explores max(this, 2 nprobe) candidates


def encode_ids(image_number: int, n: int) -> np.ndarray:
    return (np.int64(image_number) << ROW_BITS) | np.arange(n, dtype=np.int64)


def decode_images(ids: np.ndarray) -> np.ndarray:
    """Reference image numbers of descriptor ids (-1 stays -1)."""
    return np.where(ids >= 0, ids >> ROW_BITS, -1)


def use_gpu(conf: dict[str, Any]) -> bool:
    """``local_search.gpu``: ``auto`` uses GPUs whenever faiss-gpu or torch sees one; ``true``
    requires one (``common.knn.select_backend``)."""
    return knn.use_gpu(conf, "local_search")


def shard_descriptors(
    store: ShardStore, k: int, images: Iterable[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 descriptors, ids) of shard ``k``'s active images (or of the rows ``images``).

    The shard is read without the per-process cache, so a pass over many shards keeps only
    one in memory.
    """
    shard = store.load(k, cache=False)
    packed = shard["views"]["orig"]["desc"]
    offsets = packed["offsets"]
    if images is None:
        images = [r for r, i in enumerate(shard["ids"]) if not store.is_removed(i)]
    rows = list(images)
    number0 = k * store.shard_size
    ids = [encode_ids(number0 + r, offsets[r + 1] - offsets[r]) for r in rows]
    if len(rows) == len(shard["ids"]):
        desc = np.asarray(packed["data"], np.float32)
    else:
        desc = np.concatenate([packed["data"][offsets[r]:offsets[r + 1]] for r in rows]
                              or [np.zeros((0, DIM), np.uint8)]).astype(np.float32)
    return desc, np.concatenate(ids) if ids else np.zeros(0, np.int64)


def reference_blocks(
    store: ShardStore, shards: Iterable[int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 descriptors, ids) of the references' active images, one shard at a time."""
    for k in shards:
        yield shard_descriptors(store, k)


def exact_search(
    queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
    gpu: bool | knn.Backend, query_batch: int = knn.QUERY_BATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN (squared L2) of ``queries`` over reference blocks (``common.knn``)."""
    return knn.exact_search(queries, blocks, k, gpu, knn.L2, query_batch)


def block_rows(conf: dict[str, Any], gpu: bool | knn.Backend) -> int:
    """Reference descriptors one exact-search block holds: ``block_mb`` of host memory as
    float32, or ``gpu_block_mb`` per GPU as float16 (``gpu``: a backend, or a bool as in
    ``knn.backend_of``)."""
    backend = knn.backend_of(gpu)
    if backend.gpu:
        return conf["gpu_block_mb"] * 2**20 // backend.bytes_per_vector(DIM) * backend.n_gpus
    return conf["block_mb"] * 2**20 // (4 * DIM)


class ExactSearch:
    """Exact k-NN over a reference store: its shards are gathered into blocks of at most
    ``max_rows`` descriptors, each loaded into a flat index of the backend (``gpu``: a
    ``knn.Backend``, or a bool as in ``knn.backend_of``) and searched by every query batch.
    When the whole store fits in one block, that block is kept for later calls (resident: on
    GPUs this is how a whole reference set is searched from GPU memory)."""

    def __init__(self, store: ShardStore, k: int, gpu: bool | knn.Backend, max_rows: int,
                 query_batch: int = knn.QUERY_BATCH):
        self.store, self.k = store, k
        self.backend = knn.backend_of(gpu)
        self.gpu = self.backend.gpu
        self.max_rows, self.query_batch = max(1, max_rows), query_batch
        knn.announce("local_search", self.backend)
        self._resident: Any = None  # the backend's flat index holding the whole store
        self._streams = False
        self._lock = threading.Lock()

    def _blocks(self) -> Iterator[tuple[knn.FlatIndex, bool]]:
        """(filled index, whether it holds the whole store), block after block."""
        index, whole = self.backend.index(DIM), True
        for k in range(len(self.store.shards)):
            desc, ids = shard_descriptors(self.store, k)
            if index.ntotal and index.ntotal + len(desc) > self.max_rows:
                yield index.finish(), False
                index.reset()  # free the searched block before the next one is read
                whole = False
            index.add(desc, ids)
            del desc, ids
        yield index.finish(), whole

    def _indexes(self) -> Iterator[knn.FlatIndex]:
        first = None
        with self._lock:  # the first call decides whether the store stays loaded
            if self._resident is None and not self._streams:
                blocks = self._blocks()
                first, whole = next(blocks)
                if whole:
                    self._resident = first
                else:
                    self._streams = True
        if self._resident is not None:
            yield self._resident
            return
        if first is not None:
            yield first
            del first
            yield from (index for index, _ in blocks)
            return
        yield from (index for index, _ in self._blocks())

    def __call__(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        heaps = knn.QueryHeaps(queries, self.k, self.query_batch)
        for index in self._indexes():
            heaps.add(index)
        return heaps.result()


def auto_index(n_references: int) -> AutoIndex:
    """The step of ``AUTO_INDEXES`` for a reference set of ``n_references`` images."""
    return next(a for a in AUTO_INDEXES
                if a.max_references is None or n_references <= a.max_references)


def concrete_index(conf: dict[str, Any], n_references: int) -> dict[str, Any]:
    """The ``local_search`` section with ``index: auto`` and ``nprobe: auto`` made concrete for
    a reference set of ``n_references`` images: ``auto`` takes the factory string of
    ``AUTO_INDEXES`` by set size, and the nprobe listed there for its index; a value given
    is kept."""
    index = conf["index"]
    if index == AUTO:
        index = auto_index(n_references).factory
    nprobe = conf["nprobe"]
    if nprobe == AUTO and index != EXACT:  # exact search probes nothing
        known = {a.factory: a.nprobe for a in AUTO_INDEXES}
        nprobe = known.get(index)
        if nprobe is None:
            raise UserError(f"local_search.nprobe: auto knows only {known}: give "
                            f"a number for {index!r}")
    return {**conf, "index": index, "nprobe": nprobe}


def trained_index_path(conf: dict[str, Any], features_name: str) -> Path:
    """Where the trained, empty index for this feature type and factory string lives."""
    label = features_name.rsplit("-", 1)[0]
    factory = re.sub(r"[^A-Za-z0-9]+", "_", conf["index"])
    return repo_path(conf["trained_dir"]) / f"{label}-{factory}.faiss"


def load_trained(conf: dict[str, Any], features_name: str) -> faiss.Index:
    path = trained_index_path(conf, features_name)
    if not path.exists():
        raise UserError(
            f"no trained index {path} for {conf['index']!r}: train one on training photos with "
            f"`python -m local_fea.train_index --images <training photos> "
            f"-o local_search.index={conf['index']}` or use local_search.index=Flat (exact)"
        )
    index = faiss.read_index(str(path))
    if not index.is_trained:
        raise UserError(f"{path} holds an untrained index")
    return index


def write_index(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def set_nprobe(index: faiss.Index, nprobe: int) -> bool:
    """Search ``nprobe`` lists (an HNSW coarse quantiser explores at least ``HNSW_EF_MIN``
    candidates for them); return whether ``index`` is IVF (nothing to set otherwise)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(HNSW_EF_MIN, 2 * nprobe)
    return True


def load_index(path: str | Path, nprobe: int) -> faiss.Index:
    """A populated index file, to search with ``nprobe`` lists (threads may share it:
    searches only read)."""
    index = faiss.read_index(str(path))
    set_nprobe(index, nprobe)
    return index


def removed_ids(store: ShardStore) -> np.ndarray:
    """Descriptor ids of the store's removed images (read from the shards' offsets only)."""
    by_shard: dict[int, list[int]] = {}
    for n in store.removed_numbers():
        by_shard.setdefault(n // store.shard_size, []).append(n % store.shard_size)
    ids = []
    for k, rows in sorted(by_shard.items()):
        offsets = store.load(k, cache=False)["views"]["orig"]["desc"]["offsets"]
        ids += [encode_ids(k * store.shard_size + r, int(offsets[r + 1] - offsets[r]))
                for r in rows]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def exclusion(exclude: np.ndarray, nprobe: int | None) -> tuple[Any, tuple]:
    """Search parameters that leave out the ids ``exclude`` (None when there are none; IVF
    parameters with ``nprobe`` when it is given), and the selectors they point to, which the
    caller keeps alive."""
    if not len(exclude):
        return None, ()
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, np.int64))
    not_selected = faiss.IDSelectorNot(selector)
    params = (faiss.SearchParameters(sel=not_selected) if nprobe is None else
              faiss.SearchParametersIVF(sel=not_selected, nprobe=nprobe))
    return params, (selector, not_selected)


class IndexSearch:
    """Search a populated index, leaving out the descriptors of removed references (an
    ``IDSelector`` in the search parameters: the index itself is never edited)."""

    def __init__(self, index: faiss.Index, k: int, nprobe: int, exclude: np.ndarray,
                 query_batch: int = knn.QUERY_BATCH):
        self.index, self.k, self.query_batch = index, k, query_batch
        ivf = set_nprobe(index, nprobe)
        self.params, self._selectors = exclusion(exclude, nprobe if ivf else None)

    def __call__(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        batch = self.query_batch
        parts = [self.index.search(queries[s:s + batch], self.k, params=self.params)
                 for s in range(0, len(queries), batch)]
        if not parts:
            return np.zeros((0, self.k), np.float32), np.zeros((0, self.k), np.int64)
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


class PartedSearch:
    """Search an index kept as several part files (``ReferenceIndex``), one part in memory at a
    time: each query descriptor is assigned to its lists once, by the trained quantiser that
    all parts share, and every part scans those lists (``search_preassigned``), query batch
    by query batch, into one result heap; the neighbours are those of a single index over all
    parts. Threads that share it take turns (a lock), so a process never holds two parts;
    every call reads every part once."""

    def __init__(self, parts: list[Path], trained: faiss.Index, k: int, nprobe: int,
                 exclude: np.ndarray, query_batch: int = knn.QUERY_BATCH):
        self.parts, self.trained, self.k, self.nprobe = parts, trained, k, nprobe
        self.query_batch = query_batch
        set_nprobe(trained, nprobe)
        self.quantizer = faiss.extract_index_ivf(trained).quantizer
        self.params, self._selectors = exclusion(exclude, nprobe)
        self._lock = threading.Lock()

    def __call__(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        n, batch = len(queries), self.query_batch
        lists_d, lists = self.quantizer.search(queries, self.nprobe)
        heap = faiss.ResultHeap(n, self.k)
        with self._lock:
            for path in self.parts:
                part = faiss.read_index(str(path))  # owns what extract_index_ivf views
                ivf = faiss.extract_index_ivf(part)
                ivf.nprobe = self.nprobe
                dist = np.empty((n, self.k), np.float32)
                ids = np.empty((n, self.k), np.int64)
                for s in range(0, n, batch):  # bounds faiss' buffers, as in IndexSearch
                    e = min(n, s + batch)
                    d, i = dist[s:e], ids[s:e]  # views of contiguous rows
                    # the C++ call: the Python wrapper of search_preassigned takes no selector
                    ivf.search_preassigned_c(
                        e - s, faiss.swig_ptr(queries[s:e]), self.k, faiss.swig_ptr(lists[s:e]),
                        faiss.swig_ptr(lists_d[s:e]), faiss.swig_ptr(d), faiss.swig_ptr(i),
                        False, self.params)
                heap.add_result(dist, ids)
                del ivf, part
        heap.finalize()
        return heap.D, heap.I


class ReferenceIndex:
    """The populated CPU index of a reference store, kept on disk and extended incrementally.

    It is a chain of part files, each holding the descriptors of a run of reference shards
    (``index-<end>.faiss`` from shard 0, ``index-<start>-<end>.faiss`` after it) and at most
    about ``local_search.index_part_mb`` (a searching process holds one part at a time when
    there are several: ``PartedSearch``). ``update`` adds any shard the store gained since
    (nothing already in the index is encoded again) to the last part while it has room, then
    to new parts, writes each file atomically, and removes the file it replaced. It holds
    every image of its shards: removed references are left out at search time
    (``IndexSearch``), so taking an image out or putting it back costs nothing here; delete
    the folder to reclaim their space (the index is rebuilt from the stored features).
    """

    def __init__(self, folder: Path, conf: dict[str, Any], features_name: str):
        self.folder, self.conf, self.features_name = Path(folder), conf, features_name

    def parts(self) -> list[tuple[int, int, Path]]:
        """(first shard, end shard, file) of each part on disk, in order; a file an
        interrupted update left behind (another file covers more from the same start) is not
        one of them."""
        longest: dict[int, tuple[int, Path]] = {}
        for path in self.folder.glob("index-*.faiss"):
            bounds = [int(b) for b in path.stem.split("-")[1:]]
            start, end = (0, bounds[0]) if len(bounds) == 1 else bounds
            if start < end and end > longest.get(start, (-1, path))[0]:
                longest[start] = (end, path)
        chain, start = [], 0
        while start in longest:
            end, path = longest[start]
            chain.append((start, end, path))
            start = end
        return chain

    def _write(self, index: faiss.Index, start: int, end: int) -> Path:
        path = self.folder / (f"index-{end}.faiss" if start == 0 else
                              f"index-{start}-{end}.faiss")
        write_index(index, path)
        return path

    def update(self, store: ShardStore) -> list[Path]:
        """Add the shards the store gained to the index parts; return the part files."""
        chain = self.parts()
        n_done = chain[-1][1] if chain else 0
        if chain and n_done == len(store.shards):
            return [p for _, _, p in chain]
        budget = self.conf["index_part_mb"] * 2**20  # of codes and ids, the quantiser aside
        start, index = n_done, load_trained(self.conf, self.features_name)
        per_desc = index.sa_code_size() + 8  # code and id (the file adds list padding)
        if chain:  # extend the last part if the next shard fits in it (file size: an upper
            # bound on what the part holds, so the loop below never splits it at once)
            empty = trained_index_path(self.conf, self.features_name).stat().st_size
            upcoming = int(store.load(n_done, cache=False)["views"]["orig"]["desc"]["offsets"][-1])
            if chain[-1][2].stat().st_size - empty + upcoming * per_desc <= budget:
                start, _, last = chain.pop()
                index = faiss.read_index(str(last))
        log.info("adding %d reference shard(s) to the index", len(store.shards) - n_done)
        for k in tqdm(range(n_done, len(store.shards)), desc="index references", unit="shard",
                      dynamic_ncols=True, mininterval=0.5):
            desc, ids = shard_descriptors(store, k, range(len(store.shards[k])))
            if index.ntotal and (index.ntotal + len(desc)) * per_desc > budget:
                chain.append((start, k, self._write(index, start, k)))
                index, start = load_trained(self.conf, self.features_name), k
            if len(desc):
                index.add_with_ids(desc, ids)
        chain.append((start, len(store.shards), self._write(index, start, len(store.shards))))
        paths = [p for _, _, p in chain]
        for stale in set(self.folder.glob("index-*.faiss")) - set(paths):
            stale.unlink()  # the part extended, or what an interrupted update left
        log.info("index of %d reference shard(s) in %d part(s) -> %s", len(store.shards),
                 len(paths), self.folder)
        return paths
