"""One run per work folder: ``work_lock`` holds an exclusive ``flock`` on ``<work>/.lock``.

The kernel releases the lock when its process ends, killed or not, so a stale lock never
blocks: the file's content (pid, command, start time, host) is only what a second run names in
the one line it stops with. The lock is re-entrant within one process (``copydet run`` calls
the stages' ``main``), and it is not inherited by worker processes (they are started fresh).
A work folder that cannot be created or written in (a read-only mount, no permission) stops
the command before any work, in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import UserError
from common.io import DISK_FULL

LOCK = ".lock"
POLL_S = 0.2
_held: dict[Path, int] = {}  # work folders this process holds, with their nesting depth


class WorkFolderBusyError(UserError):
    """Another live run holds the work folder."""


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, from what it wrote there."""
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} on {info['host']} ({info['command']}: "
                f"{info['argv']}), started {info['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is just starting"


def writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and check that a file can be made in it (``UserError``)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        fix = ("free space" if err.errno in DISK_FULL else "remove the file in its way"
               if isinstance(err, FileExistsError | NotADirectoryError) else "make it writable")
        raise UserError(f"cannot write in the work folder {folder} ({err.strerror}): {fix}, "
                        "or use another --work") from None


def _open(path: Path) -> tuple[int, bool]:
    """The lock file, never through a link (a planted ``.lock`` link is refused, not written
    through): read-write, or read-only where another user made it (flock works on both)."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd, writable = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666), True
        except PermissionError:
            fd, writable = os.open(path, os.O_RDONLY | flags), False
    except OSError as err:
        raise UserError(f"cannot use {path} as the work folder's lock ({err.strerror}): "
                        "remove it, or use another --work") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a plain file: remove it, or use another --work")
    return fd, writable


def _acquire(fd: int, path: Path, wait_s: float) -> None:
    """Take the lock, polling up to ``wait_s`` seconds; a ``WorkFolderBusyError`` after."""
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise WorkFolderBusyError(
                    f"work folder {path.parent} is in use by {holder(path)}: wait for it to "
                    "finish (or set run.lock_wait_s), or use another --work") from None
            time.sleep(POLL_S)


def _record(fd: int, command: str) -> None:
    """Write who holds the lock into the lock file (for the message of a second run)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "argv": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


@contextlib.contextmanager
def work_lock(work: str | os.PathLike, command: str, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the work folder ``work`` (created if needed) for the block (module docstring)."""
    folder = Path(work).resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield folder
        finally:
            _held[folder] -= 1
        return
    writable_folder(folder)
    fd, writable = _open(folder / LOCK)
    try:
        _acquire(fd, folder / LOCK, wait_s)
        if writable:
            _record(fd, command)
        _held[folder] = 1
        try:
            yield folder
        finally:
            del _held[folder]
    finally:
        os.close(fd)  # releases the lock
