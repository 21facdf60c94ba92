"""Writing safetensors files incrementally and atomically.

Tensor data streams into a temporary spill file as it is produced, so memory never holds more
than the tensor being written; commit() writes the header, appends the data and renames the
result into place. Until then nothing exists under the output's name, and any failure or
interruption removes every temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from lowrank_cli.errors import OutputError
from lowrank_cli.io.dtypes import CODE_OF


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM across a few renames, so an interrupt cannot land between them."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# Every temporary file or folder this process has made and not yet renamed or removed. An interrupt
# that lands between making one and handing it to its owner's cleanup still finds it here.
_LIVE_TEMPS: set[Path] = set()


def track_temp(path: Path) -> Path:
    _LIVE_TEMPS.add(Path(path))
    return Path(path)


def untrack_temp(path: Path) -> None:
    _LIVE_TEMPS.discard(Path(path))


def remove_leftover_temps() -> None:
    """Remove every temporary this process still has (after an interrupt, before exiting)."""
    for path in list(_LIVE_TEMPS):
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        _LIVE_TEMPS.discard(path)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class SafetensorsWriter:
    """Streams tensors into `path`; use as a context manager, then call commit()."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None, *, display: Path | None = None) -> None:
        self.path = Path(path)
        self.display = display or self.path  # the name errors give: OUT, not a temporary folder inside it
        self.metadata = metadata
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._temps: list[Path] = []
        self._spill = self._temp_file(".data")

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        self.add_bytes(name, CODE_OF[tensor.dtype], tuple(tensor.shape), raw)

    def add_bytes(self, name: str, dtype: str, shape: tuple[int, ...], data) -> None:
        """Add a tensor given as its raw little-endian bytes (copied bit for bit)."""
        if name in self._header or name == "__metadata__":
            raise OutputError(f"{self.display}: two tensors would be named '{name}'; rename one in the input")
        size = memoryview(data).nbytes
        self._write(self._spill, data)
        self._header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self._offset, self._offset + size]}
        self._offset += size

    @property
    def nbytes(self) -> int:
        return self._offset

    @property
    def tensor_names(self) -> list[str]:
        return list(self._header)

    def commit(self) -> int:
        """Write the file under its name; returns its size in bytes."""
        header = dict(self._header)
        if self.metadata is not None:
            header = {"__metadata__": self.metadata, **header}
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the official writer's alignment
        final = self._temp_file("")
        try:
            self._spill.flush()
            self._spill.seek(0)
            with open(final, "r+b") as out:
                out.write(len(encoded).to_bytes(8, "little"))
                out.write(encoded)
                shutil.copyfileobj(self._spill, out, 16 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(final, 0o666 & ~current_umask())  # mkstemp made it private; give it a normal file's mode
            self._spill.close()
            with signals_held():  # renamed and forgotten as temporary together, or neither
                os.replace(final, self.path)
                self._temps.remove(final)
                untrack_temp(final)
        except OSError as exc:
            raise OutputError(
                f"{self.display}: cannot write ({exc.strerror or exc}); check free space and permissions"
            ) from None
        self.discard()
        return self.path.stat().st_size

    def discard(self) -> None:
        """Remove every temporary file; the output's name is left untouched."""
        with contextlib.suppress(OSError):  # close flushes, which fails on a full disk; the data goes anyway
            self._spill.close()
        for temp in self._temps:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            untrack_temp(temp)
        self._temps.clear()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def _temp_file(self, suffix: str):
        try:
            with signals_held():  # made and tracked together
                fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=suffix + ".tmp", dir=self.path.parent)
                track_temp(Path(name))
        except OSError as exc:
            raise OutputError(
                f"{self.display}: cannot write there ({exc.strerror or exc}); check the folder and its permissions"
            ) from None
        self._temps.append(Path(name))
        if suffix:
            return os.fdopen(fd, "w+b")
        os.close(fd)
        return Path(name)

    def _write(self, handle, data) -> None:
        try:
            handle.write(data)
        except OSError as exc:
            raise OutputError(
                f"{self.display}: cannot write ({exc.strerror or exc}); check free space and permissions"
            ) from None
