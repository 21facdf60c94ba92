"""Reading safetensors checkpoints lazily: one file, or shards with a Hugging Face index.

Headers are validated by the official loader (safe_open), so lowrank refuses exactly what
safetensors refuses; tensors are then read one at a time with plain file reads, so memory
holds one tensor at a time whatever the checkpoint's size. Loading a model maps them instead
(Checkpoint.mapped), so that pages no computation touches are never read.
"""

from __future__ import annotations

import fnmatch
import json
import mmap
import re
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from lowrank_cli.errors import CheckpointError, UsageError, arg
from lowrank_cli.io.dtypes import DTYPES, FLOAT_CODES, torch_dtype
from lowrank_cli.io.paths import require_file

INDEX_SUFFIX = ".safetensors.index.json"
_GIVE = "give a .safetensors file, a folder or an index"
_MAX_HEADER = 100_000_000  # the official loader's own limit
_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file and byte range, and what it holds."""

    name: str
    dtype: str  # safetensors code: "F32", "BF16", …
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def is_known(self) -> bool:
        """A dtype torch can hold; others (C64, F4, …) are only ever copied as bytes."""
        return self.dtype in DTYPES

    @property
    def is_matrix(self) -> bool:
        """A non-empty float tensor of two or more dimensions: what lowrank factors (ops.factoring.skip_reason)."""
        return self.is_known and self.is_float and len(self.shape) >= 2 and self.numel > 0

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in·kh·kw…): how a tensor of two or more dimensions is factorized."""
        return self.shape[0], self.numel // self.shape[0] if self.shape[0] else 0


@dataclass(frozen=True)
class ShardFile:
    path: Path
    metadata: dict[str, str] | None
    size: int


class Checkpoint:
    """A safetensors checkpoint: one file, or several shards read as one."""

    def __init__(
        self,
        source: Path,
        files: list[ShardFile],
        entries: dict[str, TensorEntry],
        index_path: Path | None = None,
    ) -> None:
        self.source = source
        self.files = files
        self.entries = entries
        self.index_path = index_path
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    @property
    def metadata(self) -> dict[str, str] | None:
        return self.files[0].metadata if self.files else None

    @property
    def is_sharded(self) -> bool:
        return self.index_path is not None or len(self.files) > 1

    @property
    def is_folder(self) -> bool:
        """A folder or an index was given: outputs are folders with the same file names."""
        return self.index_path is not None or self.source.is_dir()

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def paths(self) -> list[Path]:
        paths = [f.path for f in self.files]
        return paths + [self.index_path] if self.index_path else paths

    def by_shard(self) -> list[tuple[ShardFile, list[TensorEntry]]]:
        """Each file with its tensors, in name order."""
        return [(shard, [e for e in self.entries.values() if e.path == shard.path]) for shard in self.files]

    def select(self, include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
        """Tensor names in file order that match any --include glob and no --exclude glob."""
        return [name for name in self.entries if is_selected(name, include, exclude)]

    def read_bytes(self, name: str) -> bytearray:
        """The tensor's raw little-endian bytes, read into one fresh buffer."""
        data = self._allocate(self.entries[name], lambda entry: bytearray(entry.nbytes))
        self._read_into(self.entries[name], data)
        return data

    def read(self, name: str) -> torch.Tensor:
        """The tensor with its own dtype and shape, on the CPU."""
        entry = self.entries[name]
        dtype = torch_dtype(entry.dtype)
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(self.read_bytes(name), dtype=dtype).reshape(entry.shape)

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor with its own dtype and shape, on the CPU, backed by a private mapping of the file.

        Nothing is read until used, so pages that a computation never touches stay on disk. The
        mapping is copy-on-write: writing to the tensor (training in place) never reaches the file.
        It holds the file's inode, so the tensor stays valid when the file is replaced by rename or
        deleted (lowrank's writers publish by rename); a file truncated or rewritten in place is not
        safe. A tensor whose bytes are not aligned to its element size, or a file that cannot be
        mapped, is read instead.
        """
        entry = self.entries[name]
        dtype = torch_dtype(entry.dtype)
        if entry.numel == 0 or entry.start % dtype.itemsize:
            return self.read(name)
        mapping = self._maps.get(entry.path)
        if mapping is None:
            try:
                with open(entry.path, "rb") as handle:
                    mapping = self._maps[entry.path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):
                return self.read(name)
        if entry.end > len(mapping):
            raise CheckpointError(
                f"{entry.path}: tensor '{entry.name}' is truncated ({max(len(mapping) - entry.start, 0)} of"
                f" {entry.nbytes} bytes); the file changed or is damaged, re-download it"
            )
        # numpy holds the mapping's buffer, so it stays mapped for as long as any tensor uses it;
        # unsigned ints of the element's size, then .view(dtype), because numpy has no bfloat16 or float8.
        raw = np.frombuffer(mapping, dtype=_UINT_OF_SIZE[dtype.itemsize], count=entry.numel, offset=entry.start)
        return torch.from_numpy(raw).view(dtype).reshape(entry.shape)

    def release(self, names: list[str]) -> None:
        """Drop the pages of these tensors' bytes from this process's mappings of the file (mapped()).

        Pages a computation touched stay in the resident set for as long as the file is mapped, so a
        model run one block at a time would end up holding all of them; the block runner releases each
        block's bytes once the block is freed. Only pages wholly inside a tensor's bytes are dropped
        (a page shared with a neighbour, which may be in use, is kept); a tensor mapped again later
        reads the file afresh. The tensors must no longer be in use: a write into a mapped tensor
        (copy-on-write) would be lost.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):  # Windows: no madvise; the pages stay until the file is closed
            return
        page = mmap.PAGESIZE
        for name in names:
            entry = self.entries.get(name)
            mapping = self._maps.get(entry.path) if entry is not None else None
            start, end = (-(-entry.start // page) * page, entry.end // page * page) if mapping is not None else (0, 0)
            if end > start:
                mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def read_matrix(self, name: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor as its (out, in·…) matrix in `dtype` on `device`.

        The bytes land in the tensor's own memory (no bytearray to zero and copy) and are converted
        once, in place when the file's dtype already is `dtype`: about the time of one pass over them.
        """
        entry = self.entries[name]
        raw = self._allocate(entry, lambda e: torch.empty(e.matrix_shape, dtype=torch_dtype(e.dtype)))  # (out, in·…)
        if raw.numel():
            self._read_into(entry, raw.view(-1).view(torch.uint8).numpy())
        return raw.to(device=device, dtype=dtype)  # no copy when dtype and device already match

    @staticmethod
    def _allocate(entry: TensorEntry, make):
        """make(entry), or a CheckpointError naming the tensor when memory (or a memory cap) runs out."""
        try:
            return make(entry)
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "memory" not in str(exc):
                raise
            raise CheckpointError(
                f"{entry.path}: tensor '{entry.name}' ({entry.nbytes:,} bytes) does not fit in the memory available;"
                " free memory, raise the process's memory limit or run on a larger machine"
            ) from None

    def _read_into(self, entry: TensorEntry, buffer: bytearray | np.ndarray) -> None:
        handle = self._handles.get(entry.path)
        if handle is None:
            handle = self._handles[entry.path] = open(entry.path, "rb")  # noqa: SIM115
        handle.seek(entry.start)
        count = handle.readinto(buffer)
        if count != entry.nbytes:
            raise CheckpointError(
                f"{entry.path}: tensor '{entry.name}' is truncated ({count} of {entry.nbytes} bytes);"
                " the file changed or is damaged, re-download it"
            )

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._maps.clear()  # not closed: tensors from mapped() keep their mapping alive

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_selected(name: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude))


def check_patterns(checkpoints: list[Checkpoint], include: list[str] | None, exclude: list[str] | None) -> None:
    """A glob that matches no tensor is a typo, not a choice: say so rather than write an unchanged copy.
    So is a selection that leaves no matrix to factor (`exclude='*'`, `include='*LayerNorm*'`)."""
    names = [name for checkpoint in checkpoints for name in checkpoint.entries]
    for argument, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or []:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                sample = ", ".join(f"'{name}'" for name in names[:3]) + (", …" if len(names) > 3 else "")
                raise UsageError(
                    f"{arg(argument)} '{pattern}' matches no tensor; names look like {sample} (globs match whole names)"
                )
    entries = [entry for checkpoint in checkpoints for entry in checkpoint.entries.values()]
    if (include or exclude) and not any(e.is_matrix and is_selected(e.name, include, exclude) for e in entries):
        given = [f"{arg('include')} '{p}'" for p in include or []] + [f"{arg('exclude')} '{p}'" for p in exclude or []]
        raise UsageError(
            f"{' '.join(given)} leaves no weight matrix to factor (what remains is 1-D, integer or empty),"
            " so nothing would change; select at least one matrix"
        )


def natural_key(name: str) -> list:
    """layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a .safetensors file, a folder of shards, or a *.safetensors.index.json."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        return _open_folder(path)
    if path.name.endswith(".json"):
        return _open_index(path)
    return _merge(path, [_read_shard(path)], index_path=None)


class PipelineCheckpoint(Checkpoint):
    """A diffusers pipeline folder read as one checkpoint: each model folder's tensors under '<folder>.<name>'."""

    def __init__(self, source: Path, parts: dict[str, Checkpoint]) -> None:
        entries = {}
        for folder, part in parts.items():
            for name, entry in part.entries.items():
                entries[f"{folder}.{name}"] = replace(entry, name=f"{folder}.{name}")
        ordered = dict(sorted(entries.items(), key=lambda item: natural_key(item[0])))
        super().__init__(source, [shard for part in parts.values() for shard in part.files], ordered)
        self.models = tuple(parts)  # the model folders read, in the order given


def is_pipeline(path: str | Path, models: Sequence[str]) -> bool:
    """A folder with no weights of its own and at least one of the model folders `models` (unet/, …)."""
    path = Path(path)
    if not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*" + INDEX_SUFFIX)):
        return False
    return any((path / model).is_dir() for model in models)


def open_pipeline(folder: str | Path, models: Sequence[str]) -> PipelineCheckpoint:
    """The model folders `models` of a diffusers pipeline folder that it has (unet/, text_encoder/, …), as one."""
    folder = Path(folder)
    parts = {}
    try:
        for model in models:
            if (folder / model).is_dir():
                parts[model] = open_checkpoint(folder / model)
                parts[model].close()  # its entries name their files; the pipeline opens them as it reads
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: a diffusers pipeline folder, and {exc}") from None
    return PipelineCheckpoint(folder, parts)


def _open_folder(folder: Path) -> Checkpoint:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    preferred = folder / ("model" + INDEX_SUFFIX)
    if preferred.exists():
        return _open_index(preferred, source=folder)
    if len(indexes) == 1:
        return _open_index(indexes[0], source=folder)
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise CheckpointError(f"{folder}: several index files ({names}); pass the one to use")
    shard_paths = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if not shard_paths:
        others = [p for p in sorted(folder.iterdir()) if p.is_file() and _foreign_format(p)]
        hint = f"; {others[0].name} is {_foreign_format(others[0])}" if others else ""
        raise CheckpointError(f"{folder}: no *.safetensors files and no {INDEX_SUFFIX} in this folder{hint}")
    return _merge(folder, [_read_shard(p) for p in shard_paths], index_path=None)


def _open_index(index_path: Path, source: Path | None = None) -> Checkpoint:
    require_file(index_path, _GIVE)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(
            f"{index_path}: not a safetensors index ({type(exc).__name__}: {exc}); it needs a 'weight_map' object"
        ) from None
    if not weight_map:
        raise CheckpointError(f"{index_path}: its weight_map lists no tensors; fix the index")
    shard_names = sorted(set(weight_map.values()))
    shards = []
    for shard_name in shard_names:
        shard_path = index_path.parent / shard_name
        if Path(shard_name).name != shard_name or not shard_path.exists():
            raise CheckpointError(f"{index_path}: shard '{shard_name}' is missing; restore it or fix the index")
        shards.append(_read_shard(shard_path))
    checkpoint = _merge(source or index_path, shards, index_path=index_path)
    for name, shard_name in weight_map.items():
        entry = checkpoint.entries.get(name)
        if entry is None:
            raise CheckpointError(f"{index_path}: tensor '{name}' is in the index but in no shard; fix the index")
        if entry.path.name != shard_name:
            raise CheckpointError(
                f"{index_path}: tensor '{name}' is indexed in '{shard_name}' but stored in '{entry.path.name}';"
                " fix the index"
            )
    unindexed = [name for name in checkpoint.entries if name not in weight_map]
    if unindexed:
        raise CheckpointError(
            f"{index_path}: tensor '{unindexed[0]}' is in a shard but not in the index; fix the index"
        )
    return checkpoint


def _merge(source: Path, shards: list[tuple[ShardFile, dict[str, TensorEntry]]], index_path: Path | None) -> Checkpoint:
    entries: dict[str, TensorEntry] = {}
    for _, shard_entries in shards:
        for name, entry in shard_entries.items():
            if name in entries:
                raise CheckpointError(
                    f"{source}: tensor '{name}' is stored in both {entries[name].path.name} and"
                    f" {entry.path.name}; remove one copy"
                )
            entries[name] = entry
    ordered = dict(sorted(entries.items(), key=lambda item: natural_key(item[0])))
    return Checkpoint(source, [shard for shard, _ in shards], ordered, index_path=index_path)


_CONVERT = (
    'convert it: python -c "import torch; from safetensors.torch import save_file;'
    " save_file({{k: v.contiguous().clone() for k, v in torch.load('{path}', weights_only=True).items()}},"
    " '{target}')\""
)


def _foreign_format(path: Path) -> str | None:
    """What a file that is not safetensors is, from its first bytes, and how to get safetensors; None if unknown.

    Never unpickles: a torch zip is recognised by its member names alone.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    # The converted file goes beside the checkpoint, where a folder's reader will find it, not into the cwd.
    target = path.with_name("model.safetensors")
    torch_fix = _CONVERT.format(path=str(path).replace("'", "\\'"), target=str(target).replace("'", "\\'"))
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            members = []
        if any(name.endswith("data.pkl") for name in members):
            return f"a PyTorch checkpoint (torch.save zip); lowrank reads safetensors only, {torch_fix}"
        return "a zip archive, not safetensors; unpack it and pass the .safetensors file or folder inside"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"a Python pickle (legacy torch.save); lowrank reads safetensors only, {torch_fix}"
    if head.startswith(b"GGUF"):
        return "a GGUF file (llama.cpp); lowrank reads safetensors only, use the model's original safetensors weights"
    if head.startswith(b"\x93NUMPY"):
        return (
            "a NumPy .npy array; convert it with safetensors.numpy.save_file({'weight': numpy.load(...)},"
            " 'model.safetensors')"
        )
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (Keras .h5); lowrank reads safetensors only, save the weights as safetensors"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive, not safetensors; unpack it first"
    return None


def _read_shard(path: Path) -> tuple[ShardFile, dict[str, TensorEntry]]:
    """Validate one file with the official loader, then index its tensors' byte ranges."""
    require_file(path, _GIVE)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
    except (SafetensorError, OSError, ValueError, TypeError) as exc:  # safe_open raises these for odd files
        # Only now ask what the file is: a valid safetensors header may begin with any bytes (a length
        # of 0x0280 reads as a pickle's magic), and safe_open's own "header too large" says nothing useful.
        foreign = _foreign_format(path)
        if foreign is not None:
            raise CheckpointError(f"{path}: is {foreign}") from None
        if isinstance(exc, SafetensorError):
            raise CheckpointError(f"{path}: not a valid safetensors file ({_reason(exc)})") from None
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from None
    try:
        with open(path, "rb") as handle:
            size = path.stat().st_size
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(min(header_len, _MAX_HEADER)))
    except (OSError, ValueError, struct.error, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from None
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if isinstance(info, list):  # serde also reads a struct written as an array
            info = dict(zip(("dtype", "shape", "data_offsets"), info, strict=False))
        start, end = info["data_offsets"]
        entries[name] = TensorEntry(name, info["dtype"], tuple(info["shape"]), path, base + start, base + end)
    return ShardFile(path, metadata, size), entries


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.removeprefix("Error while deserializing header: ") or type(exc).__name__
