"""Writing safetensors files incrementally and atomically.

Tensor data streams into a temporary spill file as it is produced, so memory never holds more
than the tensor being written; commit() writes the header, appends the data and renames the
result into place. Until then nothing exists under the output's name, and any failure or
interruption removes every temporary file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from lowrank_cli.errors import OutputError
from lowrank_cli.io.dtypes import CODE_OF
from lowrank_cli.io.publish import make_temp, untrack_temp, write_file
from lowrank_cli.io.publish import remove_leftover_temps as remove_leftover_temps  # where api.py finds it


class SafetensorsWriter:
    """Streams tensors into `path`; use as a context manager, then call commit().

    commit() never replaces a file that exists by then (another run's) unless `force` is set.
    """

    def __init__(
        self, path: Path, metadata: dict[str, str] | None = None, *, display: Path | None = None, force: bool = False
    ) -> None:
        self.path = Path(path)
        self.force = force
        self.display = display or self.path  # the name errors give: OUT, not a temporary folder inside it
        self.metadata = metadata
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._temps: list[Path] = []
        self._spill = self._temp_file("data")

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

        def write(final: Path) -> None:
            self._spill.flush()
            self._spill.seek(0)
            with open(final, "r+b") as out:
                out.write(len(encoded).to_bytes(8, "little"))
                out.write(encoded)
                shutil.copyfileobj(self._spill, out, 16 << 20)

        try:
            write_file(self.path, write, force=self.force)
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

    def _temp_file(self, kind: str):
        try:
            path = make_temp(self.path, kind=kind)
            self._temps.append(path)
            return open(path, "w+b")  # noqa: SIM115  (closed by commit() or discard())
        except OSError as exc:
            raise OutputError(
                f"{self.display}: cannot write there ({exc.strerror or exc}); check the folder and its permissions"
            ) from None

    def _write(self, handle, data) -> None:
        try:
            handle.write(data)
        except OSError as exc:
            raise OutputError(
                f"{self.display}: cannot write ({exc.strerror or exc}); check free space and permissions"
            ) from None
