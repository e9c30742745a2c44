"""HDF5 files written atomically, and closed cleanly whatever happens to their writes.

HDF5 buffers what it writes, so a full disk often shows only when the file is closed; a close
that fails leaves HDF5 ids half released, which h5py releases again later: "Can't decrement id
ref count", "Can't close file", then a segmentation fault. ``atomic_h5`` therefore hands HDF5
a file object (``WriteGuard``) whose writes never fail: from the first write that does (a full
disk, an interrupt), the rest of the file is kept in memory instead, page by page, so HDF5
reads back what it wrote and closes its file; the error is raised after, naming the output,
and the temporary file is removed (``common.io.atomic_path``). The writer stops at its next
check of ``WriteGuard.error``, so the memory this takes is what is written until then.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from common.io import atomic_path

if TYPE_CHECKING:
    import h5py

PAGE = 1 << 16  # bytes per page of the in-memory rest of a file whose writes failed


class WriteGuard:
    """The file object HDF5 reads and writes through (``h5py.File(guard)``), over ``file``
    (opened ``w+b``, unbuffered). ``error``: the first failed write, if any."""

    def __init__(self, file: BinaryIO):
        self.file, self.pos, self.end = file, 0, 0  # end: the file's size as HDF5 wrote it
        self.error: BaseException | None = None
        self.pages: dict[int, bytearray] = {}  # after ``error``: what HDF5 wrote, over the file

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.end}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: bytes) -> int:
        data = memoryview(data).cast("B")
        if self.error is None:
            try:
                self.file.seek(self.pos)
                rest = data
                while rest:  # an unbuffered write may be short
                    rest = rest[self.file.write(rest):]
            except BaseException as err:  # Ctrl-C too: raised once the file is closed
                self.error = err
        if self.error is not None:
            for in_page, page, part in self._spans(len(data)):
                self._page(page)[in_page] = data[part]
        self.pos += len(data)
        self.end = max(self.end, self.pos)
        return len(data)

    def readinto(self, buffer: bytearray) -> int:
        view = memoryview(buffer).cast("B")
        for in_page, page, part in self._spans(len(view)):
            view[part] = self._page(page, keep=False)[in_page]
        self.pos += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(size)
        self.readinto(buffer)
        return bytes(buffer)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                self.file.truncate(size)
            except BaseException as err:  # as in ``write``: raised once the file is closed
                self.error = err
        self.end = size
        return size

    def flush(self) -> None:
        """Unbuffered: nothing to flush."""

    def _spans(self, n: int) -> Iterator[tuple[slice, int, slice]]:
        """(bytes in its page, page, bytes of ``n`` at ``pos``) of each page they touch."""
        done = 0
        while done < n:
            page, start = divmod(self.pos + done, PAGE)
            size = min(PAGE - start, n - done)
            yield slice(start, start + size), page, slice(done, done + size)
            done += size

    def _page(self, page: int, keep: bool = True) -> bytearray:
        """The page as HDF5 wrote it: kept in memory (``keep``), or read from the file."""
        if page in self.pages:
            return self.pages[page]
        content = bytearray(PAGE)
        self.file.seek(page * PAGE)
        self.file.readinto(content)  # short at the end of the file: zeros, as HDF5 expects
        if keep:
            self.pages[page] = content
        return content


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[tuple[h5py.File, WriteGuard]]:
    """An HDF5 file open for writing, and its guard, whose ``error`` tells the block to stop
    writing; the file is moved onto ``path`` only if the block succeeds. A write that failed is
    raised once HDF5 has closed the file, as an ``OSError`` naming ``path`` (module
    docstring)."""
    import h5py

    with atomic_path(path) as tmp, open(tmp, "w+b", buffering=0) as raw:
        guard = WriteGuard(raw)
        try:
            with h5py.File(guard, "w") as f:
                yield f, guard
        finally:
            if isinstance(guard.error, OSError):
                raise OSError(guard.error.errno, guard.error.strerror, str(Path(tmp)))
            if guard.error is not None:
                raise guard.error
