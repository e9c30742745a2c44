"""Faiss search of RootSIFT descriptors: a trained CPU index, or exact search streamed in blocks.

Reference descriptors are identified by ``image_number << ROW_BITS | row`` (int64), so a hit
names its reference image without any side table. The CPU default is an IVF index from an
``index_factory`` string whose quantiser was trained on training photos (never on the
references: ISC rule), shipped under ``local_fea/assets``. Exact search (``"Flat"``, and
always when GPUs are visible) streams reference blocks through ``common.knn.exact_search``
(fp16 on all GPUs, merged in a result heap), so memory is set by the block size.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common import UserError, knn
from common.io import atomic_path
from common.shards import ShardStore

log = logging.getLogger(__name__)

ROW_BITS = 20
EXACT = "Flat"


def encode_ids(image_number: int, n: int) -> np.ndarray:
    return (np.int64(image_number) << ROW_BITS) | np.arange(n, dtype=np.int64)


def decode_images(ids: np.ndarray) -> np.ndarray:
    """Reference image numbers of descriptor ids (-1 stays -1)."""
    return np.where(ids >= 0, ids >> ROW_BITS, -1)


def use_gpu(conf: dict[str, Any]) -> bool:
    """``local_search.gpu``: ``auto`` uses GPUs whenever faiss sees one; ``true`` requires one."""
    return knn.use_gpu(conf, "local_search")


def reference_blocks(
    store: ShardStore, shards: Iterable[int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 descriptors, ids) of the references, one shard at a time."""
    for k in shards:
        shard = store.load(k)
        packed = shard["views"]["orig"]["desc"]
        offsets = packed["offsets"]
        ids = np.concatenate([
            encode_ids(k * store.shard_size + row, offsets[row + 1] - offsets[row])
            for row in range(len(shard["ids"]))
        ]) if len(shard["ids"]) else np.zeros(0, np.int64)
        yield np.asarray(packed["data"], np.float32), ids


def exact_search(
    queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, gpu: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN (squared L2) of ``queries`` over reference blocks (``common.knn``)."""
    return knn.exact_search(queries, blocks, k, gpu, knn.L2)


def trained_index_path(conf: dict[str, Any], features_name: str) -> Path:
    """Where the trained, empty index for this feature type and factory string lives."""
    label = features_name.rsplit("-", 1)[0]
    factory = re.sub(r"[^A-Za-z0-9]+", "_", conf["index"])
    return Path(conf["trained_dir"]) / f"{label}-{factory}.faiss"


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


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    with contextlib.suppress(RuntimeError):  # not an IVF index: nothing to set
        faiss.extract_index_ivf(index).nprobe = nprobe


class ReferenceIndex:
    """The populated CPU index of a reference store, kept on disk and extended incrementally.

    The file name records how many shards it holds (``index-<n>.faiss``); opening it adds any
    shard the store gained since, writes the new file, and removes the old one.
    """

    def __init__(self, folder: Path, conf: dict[str, Any], features_name: str):
        self.folder, self.conf, self.features_name = folder, conf, features_name

    def _existing(self) -> tuple[int, Path | None]:
        files = sorted(self.folder.glob("index-*.faiss"),
                       key=lambda p: int(p.stem.split("-")[1]))
        return (int(files[-1].stem.split("-")[1]), files[-1]) if files else (0, None)

    def open(self, store: ShardStore) -> faiss.Index:
        n_done, path = self._existing()
        index = faiss.read_index(str(path)) if path else load_trained(self.conf, self.features_name)
        todo = range(n_done, len(store.shards))
        if todo:
            log.info("adding %d reference shard(s) to the index", len(todo))
            for desc, ids in reference_blocks(store, todo):
                if len(desc):
                    index.add_with_ids(desc, ids)
            new_path = self.folder / f"index-{len(store.shards)}.faiss"
            write_index(index, new_path)
            if path:
                path.unlink()
        set_nprobe(index, self.conf["nprobe"])
        return index
