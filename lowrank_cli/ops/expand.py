"""expand: rebuild the dense checkpoint from a lowrank file."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, TensorError
from lowrank_cli.io.checkpoint import Checkpoint, ShardFile, TensorEntry
from lowrank_cli.io.dtypes import DTYPES, FLOAT_CODES, compute_dtype, torch_dtype
from lowrank_cli.io.fileformat import FactorRecord, ShardRecords, decode_casts, factor_names, shard_records
from lowrank_cli.io.outputs import CheckpointOutput, prepare_output
from lowrank_cli.io.writer import SafetensorsWriter
from lowrank_cli.linalg.factorize import finite
from lowrank_cli.ops.factoring import new_report
from lowrank_cli.ops.report import Report, Status, TensorReport, Totals

SUFFIX = ".dense.safetensors"


def expand(
    checkpoint: Checkpoint,
    out: str | Path | None = None,
    *,
    force: bool = False,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> Report:
    """Write every original tensor under its name, shape and dtype, with the original metadata."""
    shards = shard_records(checkpoint)
    for shard in shards:
        _check_memory(shard)
    out, folder = prepare_output(checkpoint, out, SUFFIX, force=force)
    tensors = []
    with CheckpointOutput(checkpoint, out, folder=folder, force=force, names="dense") as output:
        for found in shards:
            shard, records = found.shard, found.records
            writer = output.writer_for(shard)
            if writer.metadata is None:
                writer.metadata = found.metadata
            factor_of = {f: name for name in records for f in factor_names(name)}
            casts = decode_casts(shard.path, shard.metadata)
            for entry in found.entries:
                if entry.name.endswith(".A") and entry.name in factor_of:
                    continue  # rebuilt together with its B
                if entry.name in factor_of:
                    tensors.append(_expand_one(checkpoint, factor_of[entry.name], records, writer, entry))
                else:
                    _copy(checkpoint, entry, writer, casts.get(entry.name), shard)
                    tensors.append(new_report(entry, Status.copied))
                    tensors[-1].dtype = casts.get(entry.name, entry.dtype)
                if on_tensor:
                    on_tensor(entry)
        size_after = output.commit()
    return Report(
        command="expand",
        sources=[str(checkpoint.source)],
        tensors=tensors,
        totals=Totals.of(tensors, checkpoint.nbytes, size_after),
        output=str(out),
        options={"notes": output.notes} if output.notes else {},
    )


def _expand_one(
    checkpoint: Checkpoint, name: str, records: dict[str, FactorRecord], writer: SafetensorsWriter, b: TensorEntry
) -> TensorReport:
    """Write B·A under the original name, shape and dtype; its row carries the error recorded at compress."""
    record = records[name]
    writer.add_tensor(name, _rebuild(checkpoint, name, record))
    return TensorReport(
        name=name,
        shape=list(record.shape),
        dtype=record.dtype,
        params=math.prod(record.shape),
        status=Status.expanded,
        rank=record.rank,
        rel_error=record.rel_error,
        file=str(b.path),
    )


def _copy(
    checkpoint: Checkpoint, entry: TensorEntry, writer: SafetensorsWriter, original: str | None, shard: ShardFile
) -> None:
    """A tensor stored whole: its bytes, or (cast by compress --dtype) the values back in its own dtype."""
    if original is None:
        writer.add_bytes(entry.name, entry.dtype, entry.shape, checkpoint.read_bytes(entry.name))
        return
    if original not in FLOAT_CODES or original not in DTYPES or not entry.is_float:
        raise CheckpointError(f"{shard.path}: tensor '{entry.name}' has unknown original dtype {original}")
    writer.add_tensor(entry.name, checkpoint.read(entry.name).to(torch_dtype(original)))


def _check_memory(found: ShardRecords) -> None:
    """Each product of the shard fits in memory (its factors' shapes are checked by shard_records)."""
    available = available_memory()
    for name, record in found.records.items():
        # B·A in the computation dtype, then cast to the tensor's own: both live at once.
        needed = math.prod(record.shape) * (_itemsize(compute_dtype(record.dtype)) + DTYPES[record.dtype][1])
        if available is not None and needed > available:
            raise CheckpointError(
                f"{found.shard.path}: tensor '{name}' {list(record.shape)} needs {needed / 2**30:,.1f} GiB to rebuild,"
                f" more than the {available / 2**30:,.1f} GiB of memory available; expand it on a larger machine"
                " or run the factors as they are (lowrank_cli.load_pretrained)"
            )


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable, else free pages), or None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _rebuild(checkpoint: Checkpoint, name: str, record: FactorRecord) -> torch.Tensor:
    """B·A in the tensor's own shape and dtype (shapes checked by shard_records); never NaN or Inf."""
    where = f"{checkpoint.source}: tensor '{name}'"
    b_name, a_name = factor_names(name)
    b, a = checkpoint.read(b_name), checkpoint.read(a_name)
    for factor_name, factor in ((b_name, b), (a_name, a)):
        if not finite(factor):
            raise TensorError(f"{where}: its factor '{factor_name}' holds NaN or Inf; compress the original again")
    work = compute_dtype(record.dtype) if b.dtype != torch.float64 else torch.float64
    dense = (b.to(work) @ a.to(work)).to(torch_dtype(record.dtype))  # (m, r) @ (r, n) -> (m, n)
    if not finite(dense):
        raise TensorError(
            f"{where}: B·A overflows {record.dtype}, the tensor's own dtype, so its factors do not describe it;"
            " compress the original again"
        )
    return dense.reshape(record.shape)
