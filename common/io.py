"""Atomic file writes: a killed run never leaves a half-written file that looks complete.

Every output is written to a temporary sibling (``name.tmp-<pid>``) and moved into place with
``os.replace``, which is atomic on POSIX file systems. Readers therefore see either the old
file, nothing, or the complete new file. A write that fails because of where it writes (a full
disk, a read-only or forbidden folder) raises an ``OSError`` that names the output, not its
temporary file, and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import joblib

from common import UserError

TMP_MARK = ".tmp-"
TMP_PART = re.compile(rf"{re.escape(TMP_MARK)}\d+(?=/|$)")
INPUTS = "inputs.json"  # beside an output: the input paths it was made from
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # data reaches the disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if (named := output_error(err, tmp, path)) is not None:
            raise named from err
        raise
    finally:
        with contextlib.suppress(OSError):  # moved, never made, or on a read-only mount
            tmp.unlink()


def without_tmp(name: str) -> str:
    """The output that a temporary file (or a file in a temporary folder) is written for:
    ``name`` without its ``.tmp-<pid>``."""
    return TMP_PART.sub("", name)


def output_error(err: OSError, tmp: Path, out: Path) -> OSError | None:
    """A write error (full disk, read-only or forbidden place) that names the temporary
    ``tmp`` of ``out``, a file under it (a temporary folder), or nothing: the same error naming
    what it was written for, under ``out``. None for any other error."""
    if err.errno not in DISK_FULL + NOT_WRITABLE:
        return None
    try:
        inner = Path(err.filename or tmp).relative_to(tmp)
    except ValueError:  # another file (an input, say)
        return None
    return OSError(err.errno, err.strerror, str(out / inner))


def dump_joblib(obj: Any, path: str | os.PathLike) -> Path:
    """Pickle ``obj`` with joblib, uncompressed so that arrays can be memory-mapped back."""
    with atomic_path(path) as tmp:
        joblib.dump(obj, tmp, compress=0)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """Write a CSV with a header row, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)


def write_inputs(output: str | os.PathLike, **inputs: str | os.PathLike) -> Path:
    """Record, beside ``output``, the input paths it was made from (``read_inputs``), so a
    later stage given only ``output`` can reach them. Paths are relative to that folder, so a
    work folder that is moved or copied as a whole keeps them."""
    folder = Path(output).resolve().parent
    record = {name: os.path.relpath(Path(path).resolve(), folder)
              for name, path in inputs.items()}
    return write_json(folder / INPUTS, record)


def read_inputs(output: str | os.PathLike) -> dict[str, Path]:
    """The input paths recorded beside ``output`` by ``write_inputs``."""
    path = Path(output).parent / INPUTS
    if not path.exists():
        raise UserError(f"{output} has no {INPUTS} beside it: give an output of this version "
                        "of the pipeline")
    return {name: (path.parent / value).resolve()
            for name, value in json.loads(path.read_text()).items()}


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def is_stale_tmp(path: Path) -> bool:
    """A temporary file (``name.tmp-<pid>``) whose writer is no longer running."""
    pid = path.name.rpartition(TMP_MARK)[2]
    return not (pid.isdigit() and pid_alive(int(pid)))


def clean_stale_tmp(folder: str | os.PathLike) -> int:
    """Remove the temporary files that killed runs left behind in ``folder`` (those of live
    processes are being written); return how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if TMP_MARK in p.name and is_stale_tmp(p)]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return len(stale)
