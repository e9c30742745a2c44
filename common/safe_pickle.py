"""Load the joblib pickles of a work folder (shards) without running code from them.

Shards are plain ``joblib.dump`` files, so joblib still loads them, but a pickle can name any
importable function and call it while it loads. ``load`` reads them with an allow-list
unpickler: numpy arrays (memory-mapped with ``mmap_mode``), numpy dtypes and scalars, and the
builtin containers and scalars; any other global is refused with one line (``UnsafePickleError``,
a ``UserError``) before anything is called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from joblib.numpy_pickle import NumpyUnpickler
from joblib.numpy_pickle_utils import _validate_fileobject_and_memmap

from common import UserError

_NUMPY = frozenset({"_reconstruct", "ndarray", "dtype", "scalar"})
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("joblib.numpy_pickle", "NumpyArrayWrapper"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in _NUMPY),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *(("builtins", name) for name in (
        "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int",
        "float", "complex", "bool")),
})


class UnsafePickleError(UserError):
    """A pickle names something other than plain data."""


class SafeUnpickler(NumpyUnpickler):
    """joblib's unpickler, restricted to ``ALLOWED`` globals (nested object arrays included:
    joblib reads them through this ``find_class``)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise UnsafePickleError(
                f"{self.filename} holds {module}.{name}, which is not plain data: refusing to "
                "load it (delete it to recompute)")
        return super().find_class(module, name)


def load(path: str | os.PathLike, mmap_mode: str | None = None) -> Any:
    """``joblib.load(path, mmap_mode)`` that only builds plain data (module docstring)."""
    filename = os.fspath(path)
    with open(filename, "rb") as f, _validate_fileobject_and_memmap(f, filename, mmap_mode) as (
            fobj, mode):
        if isinstance(fobj, str):  # joblib < 0.10 layout: loaded by plain pickle
            raise UnsafePickleError(f"{Path(filename)} is a pickle of an old joblib layout: "
                                    "refusing to load it (delete it to recompute)")
        return SafeUnpickler(filename, fobj, mmap_mode is None, mmap_mode=mode).load()
