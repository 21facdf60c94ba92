"""analyze: spectra, ranks and what a rank policy would save; of W, or of a fine-tune's change ΔW."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lowrank_cli.errors import CheckpointError, Note, UsageError, arg
from lowrank_cli.io.calibration import Calibration
from lowrank_cli.io.checkpoint import Checkpoint, TensorEntry, is_selected, natural_key
from lowrank_cli.io.fileformat import METADATA_KEY
from lowrank_cli.linalg.heavytail import fit_power_law
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.spectrum import Spectrum
from lowrank_cli.ops.budget import budget_options, calibration_notes, tensor_policies
from lowrank_cli.ops.extract import UNCHANGED, ExtractOptions, check_adapter_policy, delta_matrix, screen
from lowrank_cli.ops.factoring import (
    NO_LOOKUPS,
    NO_STATISTICS,
    ZERO_MOMENT,
    apply_policy,
    describe_spectrum,
    load_matrix,
    new_report,
    skip_reason,
    spectrum_of,
    whitened_view,
)
from lowrank_cli.ops.report import Report, Status, TensorReport, Totals


def analyze(
    checkpoint: Checkpoint,
    policy: RankPolicy | None = None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    rtol: float | None = None,
    device: str = "cpu",
    top: int | None = None,
    on_tensor: Callable[[TensorEntry], None] | None = None,
    calibration: Calibration | None = None,
) -> Report:
    """One report row per tensor; with a policy, the rank, error and params it would give.

    Each row lists the singular values of W (all, or the `top` largest), so a policy can be read off the curve.
    With calibration, a tensor with statistics is described by the spectrum of W·S, and the error a
    policy would give is the output error (its Eckart–Young optimum on W·S).
    """
    _refuse_lowrank_files(checkpoint)
    selected = set(checkpoint.select(include, exclude))
    tensors, spectra, whitened = [], {}, set()
    for entry in checkpoint.entries.values():
        if entry.name not in selected:
            continue
        reason = skip_reason(entry)
        if reason is not None:
            tensors.append(new_report(entry, Status.skipped, reason))
        else:
            report = new_report(entry, Status.analyzed)
            matrix = load_matrix(checkpoint, entry, device)
            spectra[entry.name] = _describe(report, matrix, calibration, whitened, rtol=rtol, top=top)
            tensors.append(report)
        if on_tensor:
            on_tensor(entry)
    if policy is not None:
        policy_for = tensor_policies(policy, spectra, calibration=calibration)  # as compress allocates
        for report in tensors:
            if report.name in spectra:
                apply_policy(report, spectra[report.name], policy_for(report.name))
                _optimum_on_view(report, whitened)
    options = budget_options(policy, calibration)
    if notes := calibration_notes(calibration, policy):
        options["notes"] = notes
    return Report(
        command="analyze",
        sources=[str(checkpoint.source)],
        tensors=tensors,
        totals=Totals.of(tensors),
        policy=policy.as_dict() if policy else None,
        options=options,
    )


def analyze_change(
    base: Checkpoint,
    tuned: Checkpoint,
    policy: RankPolicy | None = None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    rtol: float | None = None,
    device: str = "cpu",
    top: int | None = None,
    on_tensor: Callable[[TensorEntry], None] | None = None,
    calibration: Calibration | None = None,
) -> Report:
    """One report row per tensor of the change ΔW = W_tuned − W_base; with a policy, what extract would make of it.

    Every tensor in both checkpoints is compared; a shape that differs between them is an error that
    names the tensor, and a tensor in one only is named in the report's notes. Each matrix's row
    describes the spectrum of its ΔW (the same ΔW extract factors: ops.extract.delta_matrix). With a
    policy, each changed matrix extract can adapt gets the rank extract would give it (any rank up to
    min(m, n); a budget shared as extract shares it), the optimal relative error of ΔW at that rank
    and the adapter's params r·(m + n); the totals are over those matrices, as `extract --embeddings
    --conv` would write them (a row extract leaves out by default says so in its reason). The others
    are skipped, with params_after 0. With calibration (BASE's statistics) the spectra are of ΔW·S,
    as extract's.
    """
    check_adapter_policy(policy)
    for checkpoint in (base, tuned):
        _refuse_lowrank_files(checkpoint)
    names = [
        n for n in sorted(set(base.entries) | set(tuned.entries), key=natural_key) if is_selected(n, include, exclude)
    ]
    shared = [name for name in names if name in base.entries and name in tuned.entries]
    if not shared:
        if set(base.entries) & set(tuned.entries):
            raise UsageError(f"no tensor of both checkpoints is selected; check {arg('include')} and {arg('exclude')}")
        raise CheckpointError(
            f"{tuned.source}: has no tensor name in common with {base.source}, so there is no ΔW to analyze;"
            " give the model TUNED was fine-tuned from as BASE"
        )
    for name in shared:
        _check_same_shape(base, tuned, name)
    tensors, whitened = [], set()
    candidates = {}  # the changed matrices extract --embeddings --conv would factor, and their spectra
    opt_in = []  # those of them extract factors only when asked (embeddings, conv kernels)
    for name in shared:
        entry, before = tuned.entries[name], base.entries[name]
        reason = skip_reason(entry) or skip_reason(before)
        if reason is not None:
            tensors.append(new_report(entry, Status.skipped, reason))
        else:
            report = new_report(entry, Status.analyzed)
            delta = delta_matrix(base, tuned, name, device)
            spectrum = _describe(report, delta, calibration, whitened, rtol=rtol, top=top)
            never = screen(base, tuned, name, ExtractOptions(embeddings=True, conv=True)).reason
            if spectrum.is_zero:
                _add_reason(report, UNCHANGED)
            elif never is not None:
                _add_reason(report, f"extract has no LoRA for it: {never}")
            else:
                candidates[name] = spectrum
                by_default = screen(base, tuned, name, ExtractOptions()).reason
                if by_default is not None:
                    _add_reason(report, f"extract leaves it out by default: {by_default}")
                    opt_in.append(name)
            tensors.append(report)
        if on_tensor:
            on_tensor(before)
            on_tensor(entry)
    adapted = tensors
    if policy is not None:
        # as extract: any rank up to min(m, n), a budget weighing each ‖ΔW − BA‖² as it is, no tensor kept whole
        policy_for = tensor_policies(policy, candidates, calibration=calibration, adapter=True)
        for report in tensors:
            spectrum = candidates.get(report.name)
            if spectrum is None:
                report.status, report.params_after = Status.skipped, 0  # in no adapter
                continue
            apply_policy(report, spectrum, policy_for(report.name), limit=min(spectrum.shape))
            if report.status == Status.factorized and report.name not in whitened:
                report.kept = max(0.0, 1.0 - report.rel_error**2)
            _optimum_on_view(report, whitened)
        adapted = [t for t in tensors if t.status == Status.factorized]
    options = {**budget_options(policy, calibration, adapter=True), "diff": True}
    notes = _only_in(base, "BASE", names, tuned) + _only_in(tuned, "TUNED", names, base)
    if policy is not None and not adapted:
        notes.append(_no_adapter(tensors, candidates))
    if policy is not None and opt_in:
        notes.append(
            Note(
                f"the totals count {len(opt_in)} matri{'ces' if len(opt_in) != 1 else 'x'} that extract adapts only"
                f" with {arg('embeddings')} or {arg('conv')}, as extract with them would (first: '{opt_in[0]}')"
            )
        )
    if notes:
        options["notes"] = notes
    return Report(
        command="analyze",
        sources=[str(base.source), str(tuned.source)],
        tensors=tensors,
        totals=Totals.of(adapted),
        policy=policy.as_dict() if policy else None,
        options=options,
    )


def _refuse_lowrank_files(checkpoint: Checkpoint) -> None:
    for shard in checkpoint.files:
        if METADATA_KEY in (shard.metadata or {}):
            raise CheckpointError(
                f"{shard.path}: is a lowrank file, whose factors are no model's matrices; run lowrank expand on it"
                " and analyze the dense checkpoint it writes"
            )


def _describe(
    report: TensorReport,
    matrix: torch.Tensor,
    calibration: Calibration | None,
    whitened: set[str],
    *,
    rtol: float | None,
    top: int | None,
) -> Spectrum:
    """Fill in the row from the spectrum of the matrix (of its W·S view with calibration, noted in `whitened`)."""
    view = whitened_view(matrix, calibration, report.name)
    spectrum = spectrum_of(view, rtol=rtol)
    if view is not matrix:
        whitened.add(report.name)
    elif calibration is not None:
        report.reason = _plain_reason(calibration, report.name)
    describe_spectrum(report, spectrum, rtol)
    _describe_tail(report, spectrum, rtol)
    report.singular_values = _singular_values(spectrum, top)
    return spectrum


def _add_reason(report: TensorReport, reason: str) -> None:
    report.reason = f"{report.reason}; {reason}" if report.reason else reason


def _optimum_on_view(report: TensorReport, whitened: set[str]) -> None:
    """A whitened row's optimal error is the output error: the Eckart–Young optimum on W·S."""
    if report.name in whitened and report.status == Status.factorized:
        report.output_error, report.rel_error = report.rel_error, None


def _check_same_shape(base: Checkpoint, tuned: Checkpoint, name: str) -> None:
    before, after = base.entries[name].shape, tuned.entries[name].shape
    if tuple(before) != tuple(after):
        raise CheckpointError(
            f"tensor '{name}' is {_shape(before)} in {base.source} but {_shape(after)} in {tuned.source}; ΔW needs"
            f" the same shape: compare checkpoints of one architecture, or leave it out with {arg('exclude')} '{name}'"
        )


def _shape(shape) -> str:
    return "×".join(map(str, shape)) or "scalar"


_LISTED = 8  # names a note spells out; the rest it counts


def _no_adapter(tensors: list[TensorReport], candidates: dict[str, Spectrum]) -> str:
    """Why extract would write no adapter with the policy (it refuses): what analyze --diff says, not 0 params."""
    if not candidates:
        return "no matrix that extract can adapt differs between BASE and TUNED, so extract would write no adapter"
    first = next(t for t in tensors if t.name in candidates)
    return (
        f"the policy keeps every changed matrix out of the adapter (first: '{first.name}', {first.reason}),"
        " so extract would write no adapter"
    )


def _only_in(checkpoint: Checkpoint, label: str, names: list[str], other: Checkpoint) -> list[str]:
    """A note naming the selected tensors of `checkpoint` that `other` lacks, or none."""
    alone = [name for name in names if name in checkpoint.entries and name not in other.entries]
    if not alone:
        return []
    listed = ", ".join(f"'{name}'" for name in alone[:_LISTED]) + (
        f" and {len(alone) - _LISTED} more" if len(alone) > _LISTED else ""
    )
    count = f"{len(alone)} tensor{'s' if len(alone) != 1 else ''}"
    return [f"{count} only in {label} ({checkpoint.source}), left out: {listed}"]


def _plain_reason(calibration: Calibration, name: str) -> str:
    """Why a tensor with calibration is described by the spectrum of W itself."""
    if calibration.moment_for(name) is not None:
        return ZERO_MOMENT
    return NO_LOOKUPS if name in calibration.token_counts else NO_STATISTICS


def _describe_tail(report: TensorReport, spectrum: Spectrum, rtol: float | None) -> None:
    """The power-law fit to λ = σ² (the σ counted in the numerical rank) and log10 λ_max, from σ already computed."""
    if spectrum.is_zero:
        return
    top = spectrum.singular_values[0]
    report.log_spectral_norm = 2 * (float(np.log10(top)) + float(np.log10(spectrum.scale)))  # no σ_max² overflow
    relative = spectrum.singular_values[: spectrum.numerical_rank(rtol)] / top
    fit = fit_power_law(relative**2)  # α and D depend on ratios λ/x_min only
    if fit is not None:
        report.alpha, report.alpha_tail, report.ks_distance = fit.alpha, fit.tail, fit.ks_distance
        report.alpha_weighted = fit.alpha * report.log_spectral_norm


def _singular_values(spectrum: Spectrum, top: int | None) -> list[float] | None:
    """σ of W itself; None in the one case where σ > float64's maximum (entries near it), which JSON cannot hold."""
    with np.errstate(over="ignore"):
        values = spectrum.singular_values[:top] * spectrum.scale
    return values.tolist() if np.isfinite(values).all() else None
