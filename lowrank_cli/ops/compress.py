"""`lowrank compress`: replace each weight matrix by truncated-SVD factors B·A."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_cli.linalg.budget import policy_per_tensor
from lowrank_cli.io.checkpoint import Checkpoint, TensorEntry
from lowrank_cli.io.dtypes import FACTOR_DTYPES, torch_dtype
from lowrank_cli.errors import CheckpointError, TensorError, UsageError
from lowrank_cli.linalg.factorize import METHODS, factorize, finite, generator_for, relative_error
from lowrank_cli.io.fileformat import METADATA_KEY, FactorRecord, encode_metadata, factor_names
from lowrank_cli.ops.matrices import decide, describe_spectrum, load_matrix, new_report, skip_reason
from lowrank_cli.io.outputs import CheckpointOutput, check_output, default_output
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.ops.report import Report, TensorReport, Totals
from lowrank_cli.io.writer import SafetensorsWriter

SUFFIX = ".lowrank.safetensors"


@dataclass(frozen=True)
class Settings:
    """How factors are computed and stored."""

    dtype: str = "keep"  # the factors' dtype: keep (the tensor's own), float32, float16, bfloat16
    method: str = "auto"  # auto | exact | randomized
    seed: int = 0
    device: str = "cpu"
    rtol: float | None = None

    def __post_init__(self) -> None:
        if self.dtype != "keep" and self.dtype not in FACTOR_DTYPES:
            raise UsageError(f"--dtype {self.dtype} is not one of keep, {', '.join(FACTOR_DTYPES)}")
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method} is not one of {', '.join(METHODS)}")


def compress(
    checkpoint: Checkpoint,
    policy: RankPolicy,
    out: Path | None = None,
    *,
    settings: Settings | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    force: bool = False,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> Report:
    """Write OUT with factors for every selected float matrix where they save parameters.

    The error reported for each tensor is measured on the factors as written, in their dtype.
    """
    settings = settings or Settings()
    if checkpoint.metadata and METADATA_KEY in checkpoint.metadata:
        raise CheckpointError(f"{checkpoint.source}: is already a lowrank file; run lowrank expand on it first")
    out = check_output(checkpoint, out or default_output(checkpoint, SUFFIX), force=force)
    selected = set(checkpoint.select(include, exclude))
    policy_for = policy_per_tensor(
        policy,
        [e.name for e in checkpoint.entries.values() if skip_reason(e, e.name in selected) is None],
        lambda name: load_matrix(checkpoint, checkpoint.entries[name], settings.device),
        on_done=(lambda name: on_tensor(checkpoint.entries[name])) if on_tensor else None,
    )
    tensors = []
    records: dict[SafetensorsWriter, dict[str, FactorRecord]] = {}
    base_metadata: dict[SafetensorsWriter, dict[str, str] | None] = {}
    with CheckpointOutput(checkpoint, out, force=force) as output:
        for shard, entries in checkpoint.by_shard():
            writer = output.writer_for(shard)  # one per shard, or one for all in a single file
            base_metadata.setdefault(writer, shard.metadata)
            shard_records = records.setdefault(writer, {})
            for entry in entries:
                reason = skip_reason(entry, entry.name in selected)
                if reason is not None:
                    report = new_report(entry, "skipped", reason)
                else:
                    report, factors = _compress_matrix(checkpoint, entry, policy_for(entry.name), settings)
                    if factors is not None:
                        for factor_name, factor in zip(factor_names(entry.name), factors, strict=True):
                            writer.add_tensor(factor_name, factor)
                        shard_records[entry.name] = FactorRecord(
                            entry.shape, entry.dtype, report.rank, report.rel_error, report.split
                        )
                if report.status != "factorized":
                    writer.add_bytes(entry.name, entry.dtype, entry.shape, checkpoint.read_bytes(entry.name))
                tensors.append(report)
                if on_tensor:
                    on_tensor(entry)
        for writer in output.writers:
            writer.metadata = encode_metadata(base_metadata[writer], records[writer])
        size_after = output.commit()
    return Report(
        command="compress",
        sources=[str(checkpoint.source)],
        tensors=tensors,
        totals=Totals.of(tensors, checkpoint.nbytes, size_after),
        policy=policy.as_dict(),
        output=str(out),
        options={"dtype": settings.dtype, "method": settings.method, "seed": settings.seed},
    )


def _compress_matrix(
    checkpoint: Checkpoint, entry: TensorEntry, policy: RankPolicy, settings: Settings, method: str | None = None
) -> tuple[TensorReport, tuple[torch.Tensor, torch.Tensor] | None]:
    matrix = load_matrix(checkpoint, entry, settings.device)
    method = method or settings.method
    result = factorize(matrix, policy, method=method, generator=generator_for(entry.name, settings.seed, matrix.device))
    report = new_report(entry, "analyzed")
    report.method = result.method
    if result.spectrum is not None:
        describe_spectrum(report, result.spectrum, settings.rtol)
    decide(report, result.rank, entry.matrix_shape, policy)
    if report.status != "factorized":
        return report, None
    stored = torch_dtype(entry.dtype if settings.dtype == "keep" else FACTOR_DTYPES[settings.dtype])
    b, a, split = result.factors(stored)
    if not (finite(b) and finite(a)):
        wider = "bfloat16 or float32" if stored == torch.float16 else "float64"
        raise TensorError(
            f"{entry.path}: tensor '{entry.name}': its factors overflow {stored} even split as U·√S and √S·Vᵀ;"
            f" use --dtype {wider}"
        )
    report.rel_error = relative_error(matrix, b, a)  # measured on what is written
    report.split = split
    target = policy.error_target()
    if result.method == "randomized" and stored == matrix.dtype and target is not None and report.rel_error > target:
        # The randomized residual is bookkept in floating point; settle a near miss exactly.
        return _compress_matrix(checkpoint, entry, policy, settings, method="exact")
    return report, (b.cpu(), a.cpu())
