"""compress: replace each weight matrix by truncated-SVD factors B·A."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lowrank_cli.errors import CheckpointError, Note, arg
from lowrank_cli.io.calibration import Calibration
from lowrank_cli.io.checkpoint import Checkpoint, TensorEntry
from lowrank_cli.io.dtypes import torch_dtype
from lowrank_cli.io.fileformat import METADATA_KEY, FactorRecord, calibration_record, encode_metadata, factor_names
from lowrank_cli.io.outputs import CheckpointOutput, prepare_output
from lowrank_cli.io.writer import SafetensorsWriter
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.spectrum import SPEED_SHARE, speed_rank
from lowrank_cli.ops.budget import budget_options, calibration_notes, policy_per_tensor
from lowrank_cli.ops.factoring import (
    STORED_CODES,
    cast_dense,
    factor_tensor,
    load_matrix,
    new_report,
    record,
    skip_reason,
    stored_dtype,
    whitened_view,
)
from lowrank_cli.ops.report import Report, Status, TensorReport, Totals
from lowrank_cli.ops.settings import DType, Objective, Settings, choice

CASTABLE = frozenset(STORED_CODES.values())  # float8 tensors are kept: casting them up would grow the file

SUFFIX = ".lowrank.safetensors"


def compress(
    checkpoint: Checkpoint,
    policy: RankPolicy,
    out: str | Path | None = None,
    *,
    settings: Settings | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    force: bool = False,
    on_tensor: Callable[[TensorEntry], None] | None = None,
    calibration: Calibration | None = None,
    fidelity: dict | None = None,
    objective: Objective = Objective.params,
) -> Report:
    """Write OUT with factors for every selected float matrix where they save parameters (Objective.speed:
    where they hold at most SPEED_SHARE of them, where they can gain speed too).

    The error reported for each tensor is measured on the factors as written, in their dtype.
    With calibration, each tensor with statistics is factorized as W·S (activation-aware).
    fidelity: the `fidelity` record of the metadata (model.fidelity: the target and the hash of
    the text that chose the budget, which evaluate reads to say that text is not held out).
    """
    settings = settings or Settings()
    objective = choice(Objective, objective, "objective")
    speed = objective == Objective.speed
    if checkpoint.metadata and METADATA_KEY in checkpoint.metadata:
        raise CheckpointError(f"{checkpoint.source}: is already a lowrank file; run lowrank expand on it first")
    out, folder = prepare_output(
        checkpoint, out, SUFFIX, force=force, inputs=[calibration.source if calibration is not None else None]
    )
    selected = set(checkpoint.select(include, exclude))
    candidates = [e.name for e in checkpoint.entries.values() if skip_reason(e, e.name in selected) is None]
    policy_for = policy_per_tensor(
        policy,
        candidates,
        lambda name: whitened_view(
            load_matrix(checkpoint, checkpoint.entries[name], settings.device), calibration, name
        ),
        on_done=(lambda name: on_tensor(checkpoint.entries[name])) if on_tensor else None,
        calibration=calibration,
        speed=speed,
    )
    with CheckpointOutput(checkpoint, out, folder=folder, force=force, names="lowrank") as output:
        tensors = _write(checkpoint, output, policy_for, settings, selected, on_tensor, calibration, fidelity, speed)
        size_after = output.commit()
    notes = [*output.notes, *calibration_notes(calibration, policy), *slow_factor_notes(tensors)]
    return Report(
        command="compress",
        sources=[str(checkpoint.source)],
        tensors=tensors,
        totals=Totals.of(tensors, checkpoint.nbytes, size_after),
        policy=policy.as_dict(),
        output=str(out),
        options={
            **settings.as_dict(),
            "objective": objective.value,
            **budget_options(policy, calibration),
            **({"notes": notes} if notes else {}),
        },
    )


def slow_factor_notes(tensors: list[TensorReport]) -> list[str]:
    """A note on the factorized tensors whose factors hold more than SPEED_SHARE of their params:
    they save memory, but two products of that size gain little speed over the dense one, or lose some."""
    slow = [t for t in tensors if t.status == Status.factorized and t.rank > speed_rank(t.shape[0], _columns(t))]
    if not slow:
        return []
    share = max(t.params_after / t.params for t in slow)
    some = ", ".join(f"'{t.name}'" for t in slow[:3]) + (", …" if len(slow) > 3 else "")
    return [
        Note(
            f"{len(slow)} factorized tensors ({some}) keep more than {SPEED_SHARE:.0%} of their params (up to"
            f" {share:.0%}): their factors save memory, but a layer running them does at least {SPEED_SHARE:.0%}"
            " of the dense matrix's work, in two products instead of one, so it gains little speed or loses some"
            f" (benchmarks/bench_kernels.py times both); {arg('objective')} speed keeps such matrices whole"
        )
    ]


def _columns(tensor: TensorReport) -> int:
    return tensor.params // tensor.shape[0]  # n of the (m, n) matrix a tensor of more dims is read as


def _write(
    checkpoint: Checkpoint,
    output: CheckpointOutput,
    policy_for: Callable[[str], RankPolicy],
    settings: Settings,
    selected: set[str],
    on_tensor: Callable[[TensorEntry], None] | None,
    calibration: Calibration | None = None,
    fidelity: dict | None = None,
    speed: bool = False,
) -> list[TensorReport]:
    """Every tensor into its writer; each writer's metadata is the first shard's, plus its factor records."""
    tensors = []
    records: dict[SafetensorsWriter, dict[str, FactorRecord]] = {}
    casts: dict[SafetensorsWriter, dict[str, str]] = {}
    base_metadata: dict[SafetensorsWriter, dict[str, str] | None] = {}
    for shard, entries in checkpoint.by_shard():
        writer = output.writer_for(shard)  # one per shard, or one for all in a single file
        base_metadata.setdefault(writer, shard.metadata)
        shard_records, shard_casts = records.setdefault(writer, {}), casts.setdefault(writer, {})
        for entry in entries:
            step = (policy_for, settings, selected, calibration, speed)
            report = _compress_entry(checkpoint, entry, writer, shard_records, *step)
            # a matrix the policy bounds but keeps whole: the bound holds on it as written, cast or not
            bound = policy_for(entry.name).max_error if report.status == Status.dense else None
            if report.status != Status.factorized and _write_whole(checkpoint, entry, writer, settings, report, bound):
                shard_casts[entry.name] = entry.dtype
            tensors.append(report)
            if on_tensor:
                on_tensor(entry)
    for writer in output.writers:
        extra = calibration_record(calibration)
        writer.metadata = encode_metadata(base_metadata[writer], records[writer], casts[writer], extra, fidelity)
    return tensors


def _compress_entry(
    checkpoint: Checkpoint,
    entry: TensorEntry,
    writer: SafetensorsWriter,
    records: dict[str, FactorRecord],
    policy_for: Callable[[str], RankPolicy],
    settings: Settings,
    selected: set[str],
    calibration: Calibration | None = None,
    speed: bool = False,
) -> TensorReport:
    """Write one tensor's factors where they pay; return its report row (the caller writes the others whole)."""
    reason = skip_reason(entry, entry.name in selected)
    if reason is not None:
        report = new_report(entry, Status.skipped, reason)
    else:
        report = new_report(entry, Status.analyzed)
        matrix = load_matrix(checkpoint, entry, settings.device)
        outcome = factor_tensor(
            matrix,
            policy_for(entry.name),
            settings,
            calibration,
            name=entry.name,
            stored=stored_dtype(settings, entry.dtype),
            limit=speed_rank(*matrix.shape) if speed else None,
            where=f"{entry.path}: tensor '{entry.name}'",
        )
        record(report, outcome, settings.rtol)
        if report.status == Status.factorized:
            for factor_name, tensor in zip(factor_names(entry.name), (outcome.b, outcome.a), strict=True):
                writer.add_tensor(factor_name, tensor)
            records[entry.name] = FactorRecord(
                entry.shape, entry.dtype, report.rank, report.rel_error, report.split, report.output_error
            )
    return report


def _write_whole(
    checkpoint: Checkpoint,
    entry: TensorEntry,
    writer: SafetensorsWriter,
    settings: Settings,
    report: TensorReport,
    bound: float | None = None,
) -> bool:
    """A tensor that is not factorized: its bytes unchanged, or, with a --dtype, a float tensor cast to it,
    so that a bfloat16 run halves every float32 tensor; the error is measured on what is written.

    bound: the error the policy promises for this matrix (max_error); a cast that would exceed it is
    not made, the tensor kept in its own dtype, and its row's note says so. Returns whether it was cast.
    """
    stored = None if settings.dtype == DType.keep else STORED_CODES[settings.dtype]
    if stored is None or entry.dtype not in CASTABLE or entry.dtype == stored:
        writer.add_bytes(entry.name, entry.dtype, entry.shape, checkpoint.read_bytes(entry.name))
        return False
    where = f"{entry.path}: tensor '{entry.name}'"
    tensor, error = cast_dense(checkpoint.read(entry.name), torch_dtype(stored), where)
    if bound is not None and error is not None and error > bound:
        own = str(torch_dtype(entry.dtype)).removeprefix("torch.")
        kept = f"kept in {own}: {settings.dtype.value} would make its error {error:.3g}, above the target {bound:g}"
        report.reason = f"{report.reason}; {kept}" if report.reason else kept
        writer.add_bytes(entry.name, entry.dtype, entry.shape, checkpoint.read_bytes(entry.name))
        return False
    report.rel_error = error
    writer.add_tensor(entry.name, tensor)
    return True
