"""A disk that fills up: files written under one folder fail with ENOSPC once a byte budget is spent.

`FullDisk(folder, budget).install(monkeypatch)` replaces open() and io.open() (which os.fdopen and
Path.write_text use) so that every file opened for writing under `folder` sits on a raw file that
behaves like a full disk: a write past the budget writes what still fits, the next one raises
OSError(ENOSPC). The buffering on top is the real io.Buffered*/TextIOWrapper, so bytes held in a
buffer fail when it is flushed or closed, as they do on a real disk.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from pathlib import Path


class FullDisk:
    def __init__(self, folder: Path, budget: int) -> None:
        self.folder = Path(os.path.abspath(folder))
        self.left = budget
        self.written = 0
        self.refused = 0  # writes that raised ENOSPC

    def install(self, monkeypatch) -> FullDisk:
        real_open = io.open

        def open_(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
            if not _writes(mode) or not self._covers(file):
                return real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
            raw = _FullRaw(io.FileIO(file, _raw_mode(mode), closefd, opener=opener), self)
            return _buffered(raw, mode, buffering, encoding, errors, newline)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)  # shutil.copy* then goes through write()
        return self

    def _covers(self, file) -> bool:
        if isinstance(file, int):
            try:
                file = os.readlink(f"/proc/self/fd/{file}")
            except OSError:
                return False
        path = Path(os.path.abspath(os.fsdecode(file)))
        return self.folder in path.parents


def _writes(mode: str) -> bool:
    return any(flag in mode for flag in "wax+")


def _raw_mode(mode: str) -> str:
    return mode.replace("b", "").replace("t", "")


def _buffered(raw: io.RawIOBase, mode, buffering, encoding, errors, newline):
    if buffering == 0:
        return raw
    size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
    buffer = io.BufferedRandom(raw, size) if "+" in mode else io.BufferedWriter(raw, size)
    if "b" in mode:
        return buffer
    return io.TextIOWrapper(buffer, encoding or "utf-8", errors, newline, line_buffering=buffering == 1)


class _FullRaw(io.RawIOBase):
    """A FileIO whose writes stop, like a full disk's, when the budget is spent."""

    def __init__(self, file: io.FileIO, disk: FullDisk) -> None:
        self._file = file
        self._disk = disk

    @property
    def name(self):
        return self._file.name

    @property
    def mode(self):
        return self._file.mode

    def readable(self) -> bool:
        return self._file.readable()

    def writable(self) -> bool:
        return self._file.writable()

    def seekable(self) -> bool:
        return self._file.seekable()

    def fileno(self) -> int:
        return self._file.fileno()

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def truncate(self, size=None) -> int:
        return self._file.truncate(size)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) and self._disk.left <= 0:
            self._disk.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        count = self._file.write(view[: self._disk.left])
        self._disk.left -= count
        self._disk.written += count
        return count

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()
