"""`lowrank compress`: replace each weight matrix by truncated-SVD factors B·A."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lowrank_cli.checkpoint import Checkpoint, TensorEntry
from lowrank_cli.dtypes import FACTOR_DTYPES, torch_dtype
from lowrank_cli.errors import CheckpointError, UsageError
from lowrank_cli.factorize import exact_svd, relative_error, truncate
from lowrank_cli.fileformat import METADATA_KEY, FactorRecord, encode_metadata, factor_names
from lowrank_cli.matrices import apply_policy, describe_spectrum, load_matrix, new_report, skip_reason
from lowrank_cli.outputs import check_output, default_output
from lowrank_cli.policy import RankPolicy
from lowrank_cli.report import Report, Totals
from lowrank_cli.spectrum import Spectrum
from lowrank_cli.writer import SafetensorsWriter

SUFFIX = ".lowrank.safetensors"


def compress(
    checkpoint: Checkpoint,
    policy: RankPolicy,
    out: Path | None = None,
    *,
    dtype: str = "keep",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    force: bool = False,
    rtol: float | None = None,
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> Report:
    """Write OUT with factors for every selected float matrix where they save parameters.

    The error reported for each tensor is measured on the factors as written, in their dtype.
    """
    if dtype != "keep" and dtype not in FACTOR_DTYPES:
        raise UsageError(f"--dtype {dtype} is not one of keep, {', '.join(FACTOR_DTYPES)}")
    if checkpoint.metadata and METADATA_KEY in checkpoint.metadata:
        raise CheckpointError(f"{checkpoint.source}: is already a lowrank file; run lowrank expand on it first")
    out = check_output(checkpoint, out or default_output(checkpoint, SUFFIX), force=force)
    selected = set(checkpoint.select(include, exclude))
    tensors, records = [], {}
    with SafetensorsWriter(out) as writer:
        for entry in checkpoint.entries.values():
            reason = skip_reason(entry, entry.name in selected)
            if reason is not None:
                report = new_report(entry, "skipped", reason)
            else:
                report, factors = _compress_matrix(checkpoint, entry, policy, dtype, rtol)
                if factors is not None:
                    for factor_name, factor in zip(factor_names(entry.name), factors):
                        writer.add_tensor(factor_name, factor)
                    records[entry.name] = FactorRecord(entry.shape, entry.dtype, report.rank, report.rel_error)
            if report.status != "factorized":
                writer.add_bytes(entry.name, entry.dtype, entry.shape, checkpoint.read_bytes(entry.name))
            tensors.append(report)
            if on_tensor:
                on_tensor(entry)
        writer.metadata = encode_metadata(checkpoint.metadata, records)
        size_after = writer.commit()
    return Report(
        command="compress",
        sources=[str(checkpoint.source)],
        tensors=tensors,
        totals=Totals.of(tensors, checkpoint.nbytes, size_after),
        policy=policy.as_dict(),
        output=str(out),
        options={"dtype": dtype},
    )


def _compress_matrix(checkpoint: Checkpoint, entry: TensorEntry, policy: RankPolicy, dtype: str, rtol: float | None):
    matrix = load_matrix(checkpoint, entry)
    u, s, vh = exact_svd(matrix)
    spectrum = Spectrum.of(s, entry.matrix_shape)
    report = new_report(entry, "analyzed")
    describe_spectrum(report, spectrum, rtol)
    apply_policy(report, spectrum, policy)
    if report.status != "factorized":
        return report, None
    stored = torch_dtype(entry.dtype if dtype == "keep" else FACTOR_DTYPES[dtype])
    b, a = (factor.to(stored) for factor in truncate(u, s, vh, report.rank))
    report.rel_error = relative_error(matrix, b, a)  # measured on what is written
    return report, (b, a)
