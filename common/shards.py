"""Sharded, resumable per-image outputs: joblib pickles of a fixed number of images each.

A store is a folder holding ``manifest.json`` (which image ids go to which shard, and the
source folder they came from) and ``shard_NNNNN.pkl`` files. The manifest is append-only:
ids keep their shard and row for ever, new ids go to new shards, so a restarted or extended
run only computes the shards that are missing. Shards are written atomically and
uncompressed, so loading one with ``mmap_mode="r"`` reads only the rows that are used; they
are loaded by ``common.safe_pickle``, which builds arrays and plain containers and nothing else.

Images that leave the folder are not deleted from the shards: the manifest lists them as
``removed`` (and un-lists them if they come back), and consumers leave them out of their
results (``is_removed``, ``removed_numbers``). ``revision`` names the store's content, so
outputs computed from a store can be keyed by it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import UserError, safe_pickle
from common.config import digest
from common.images import ImageSet
from common.io import clean_stale_tmp, write_csv, write_json

MANIFEST = "manifest.json"


class StoreMismatchError(UserError):
    """A store folder already holds another image folder's outputs."""


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs to compute one shard."""

    index: int
    ids: tuple[str, ...]
    paths: tuple[str, ...]
    out: Path


def unreadable(shard: dict[str, Any]) -> list[str]:
    """Why each image of a shard could not be read (empty when it was read)."""
    return list(shard["status"])


class ShardStore:
    """One image set's outputs, split into shards of ``shard_size`` images."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            raise UserError(f"no store at {self.root} (missing {MANIFEST}): give the folder "
                            "that the stage which made it printed")
        self.manifest = json.loads(manifest_path.read_text())
        self.shard_size: int = self.manifest["shard_size"]
        self.shards: list[list[str]] = self.manifest["shards"]
        self.removed: frozenset[str] = frozenset(self.manifest.get("removed", []))
        self._where = {i: (k, r) for k, ids in enumerate(self.shards) for r, i in enumerate(ids)}

    @classmethod
    def plan(cls, root: str | Path, images: ImageSet, shard_size: int) -> ShardStore:
        """Create the store for ``images``, extend it with ids it does not hold yet, and mark
        the ids no longer in ``images`` as removed (ids that came back are restored)."""
        root = Path(root)
        source = str(images.root.resolve())
        manifest_path = root / MANIFEST
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if manifest["source"] != source:
                raise StoreMismatchError(
                    f"{root} holds images of {manifest['source']}, not {source}: "
                    "use another work folder"
                )
        else:
            manifest = {"set": images.name, "source": source, "shard_size": shard_size,
                        "shards": [], "paths": {}}
        known = {i for ids in manifest["shards"] for i in ids}
        new = [(i, p) for i, p in zip(images.ids, images.paths, strict=True) if i not in known]
        size = manifest["shard_size"]
        for start in range(0, len(new), size):
            chunk = new[start:start + size]
            manifest["shards"].append([i for i, _ in chunk])
            manifest["paths"].update({i: str(Path(p).relative_to(images.root)) for i, p in chunk})
        removed = sorted(known - set(images.ids))
        changed = removed != manifest.get("removed", [])
        manifest["removed"] = removed
        if new or changed or not manifest_path.exists():
            write_json(manifest_path, manifest)
        clean_stale_tmp(root)
        return cls(root)

    @property
    def ids(self) -> list[str]:
        return [i for ids in self.shards for i in ids]

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._where

    def is_removed(self, image_id: str) -> bool:
        return image_id in self.removed

    def removed_numbers(self) -> list[int]:
        """``number`` of every removed id, sorted."""
        return sorted(self.number(i) for i in self.removed)

    @property
    def revision(self) -> str:
        """Names the store's content: shard count plus a hash of the removed ids."""
        return f"{len(self.shards)}-{digest(sorted(self.removed))}"

    def shard_path(self, k: int) -> Path:
        return self.root / f"shard_{k:05d}.pkl"

    def source_path(self, image_id: str) -> Path:
        return Path(self.manifest["source"]) / self.manifest["paths"][image_id]

    def write_skipped(self, reasons: Callable[[dict[str, Any]], list[str]] = unreadable) -> int:
        """Write the store's ``skipped.csv`` (all runs so far): every image of the set that
        ``reasons(shard)`` (one per row, empty for an image that was used; by default why it
        could not be read) gives a reason; return how many."""
        rows = []
        for k in range(len(self.shards)):
            shard = self.load(k)
            rows += [(i, self.source_path(i), s)
                     for i, s in zip(shard["ids"], reasons(shard), strict=True)
                     if s and not self.is_removed(i)]
        write_csv(self.root / "skipped.csv", ["id", "path", "reason"], rows)
        return len(rows)

    def missing(self) -> list[int]:
        """Indices of shards not written yet."""
        return [k for k in range(len(self.shards)) if not self.shard_path(k).exists()]

    def tasks(self, shards: Sequence[int] | None = None) -> list[ShardTask]:
        shards = self.missing() if shards is None else shards
        return [
            ShardTask(k, tuple(self.shards[k]),
                      tuple(str(self.source_path(i)) for i in self.shards[k]), self.shard_path(k))
            for k in shards
        ]

    def load(self, k: int, cache: bool = True) -> dict[str, Any]:
        """Shard ``k`` with its arrays memory-mapped (plain ndarray views of the mapped pages),
        cached per process (a rewritten shard file is read again); ``cache=False`` for a
        one-pass stream over many shards (``np.memmap`` arrays, their pages released once the
        shard is dropped)."""
        path = self.shard_path(k)
        if not cache:
            return safe_pickle.load(path, mmap_mode="r")
        stat = path.stat()
        return _load_shard(str(path), stat.st_mtime_ns, stat.st_ino)

    def locate(self, image_id: str) -> tuple[int, int]:
        """(shard, row) of an image id."""
        try:
            return self._where[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in the store {self.root}") from None

    def number(self, image_id: str) -> int:
        """A stable integer for an image: shard * shard_size + row."""
        k, row = self.locate(image_id)
        return k * self.shard_size + row

    def id_of(self, number: int) -> str:
        k, row = divmod(int(number), self.shard_size)
        return self.shards[k][row]


@functools.lru_cache(maxsize=128)
def _load_shard(path: str, mtime_ns: int, inode: int) -> dict[str, Any]:
    return _plain(safe_pickle.load(path, mmap_mode="r"))


def _plain(obj: Any) -> Any:
    """Memory-mapped arrays as plain ndarray views of the same pages: slicing a ``np.memmap``
    goes through Python-level hooks, a cost per image that verification pays per pair."""
    if isinstance(obj, np.memmap):
        return obj.view(np.ndarray)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(map(_plain, obj))
    return obj


def pack(arrays: Sequence[np.ndarray], dtype: Any, width: int | None = None) -> dict[str, Any]:
    """Concatenate per-image arrays into ``data`` with ``offsets`` (n + 1 row boundaries)."""
    shape = (0, width) if width else (0,)
    data = np.concatenate([np.asarray(a, dtype) for a in arrays]) if arrays else np.zeros(shape)
    lengths = [len(a) for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return {"data": np.ascontiguousarray(data, dtype=dtype), "offsets": offsets}


def unpack(packed: dict[str, Any], row: int) -> np.ndarray:
    """Rows of one image from a ``pack`` result."""
    start, stop = packed["offsets"][row], packed["offsets"][row + 1]
    return packed["data"][start:stop]
