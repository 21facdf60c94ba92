"""expand: rebuild the dense checkpoint from a lowrank file."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError
from lowrank_cli.io.checkpoint import Checkpoint, ShardFile, TensorEntry
from lowrank_cli.io.dtypes import DTYPES, FLOAT_CODES, compute_dtype, torch_dtype
from lowrank_cli.io.fileformat import FactorRecord, decode_casts, decode_metadata, factor_names
from lowrank_cli.io.outputs import CheckpointOutput, prepare_output
from lowrank_cli.io.writer import SafetensorsWriter
from lowrank_cli.ops.pipeline import new_report
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
    shards = [
        (shard, entries, *decode_metadata(shard.path, shard.metadata)) for shard, entries in checkpoint.by_shard()
    ]
    for shard, _, _, records in shards:
        _check_factors(checkpoint, shard, records)
    out, folder = prepare_output(checkpoint, out, SUFFIX, force=force)
    tensors = []
    with CheckpointOutput(checkpoint, out, folder=folder, force=force) as output:
        for shard, entries, metadata, records in shards:
            writer = output.writer_for(shard)
            if writer.metadata is None:
                writer.metadata = metadata
            factor_of = {f: name for name in records for f in factor_names(name)}
            casts = decode_casts(shard.path, shard.metadata)
            for entry in entries:
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


def _check_factors(checkpoint: Checkpoint, shard: ShardFile, records: dict[str, FactorRecord]) -> None:
    for name, record in records.items():
        for factor_name in factor_names(name):
            entry = checkpoint.entries.get(factor_name)
            if entry is None or entry.path != shard.path:
                raise CheckpointError(
                    f"{shard.path}: factor '{factor_name}' of tensor '{name}' is missing; compress the original again"
                )
        if record.dtype not in DTYPES:
            raise CheckpointError(f"{shard.path}: tensor '{name}' has unknown dtype {record.dtype}")


def _rebuild(checkpoint: Checkpoint, name: str, record: FactorRecord) -> torch.Tensor:
    b_name, a_name = factor_names(name)
    b, a = checkpoint.read(b_name), checkpoint.read(a_name)
    rows, cols = record.shape[0], math.prod(record.shape) // record.shape[0]
    if b.shape != (rows, record.rank) or a.shape != (record.rank, cols):
        raise CheckpointError(
            f"{checkpoint.source}: factors of '{name}' have shapes {tuple(b.shape)} and {tuple(a.shape)},"
            f" not ({rows}, {record.rank}) and ({record.rank}, {cols}); compress the original again"
        )
    work = compute_dtype(record.dtype) if b.dtype != torch.float64 else torch.float64
    dense = b.to(work) @ a.to(work)  # (m, r) @ (r, n) -> (m, n)
    return dense.to(torch_dtype(record.dtype)).reshape(record.shape)
