"""analyze: spectra, ranks and what a rank policy would save."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lowrank_cli.errors import CheckpointError
from lowrank_cli.io.calibration import Calibration
from lowrank_cli.io.checkpoint import Checkpoint, TensorEntry
from lowrank_cli.io.fileformat import METADATA_KEY
from lowrank_cli.linalg.heavytail import fit_power_law
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.spectrum import Spectrum
from lowrank_cli.ops.budget import budget_options, tensor_policies
from lowrank_cli.ops.pipeline import (
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
    for shard in checkpoint.files:
        if METADATA_KEY in (shard.metadata or {}):
            raise CheckpointError(
                f"{shard.path}: is a lowrank file, whose factors are no model's matrices; run lowrank expand on it"
                " and analyze the dense checkpoint it writes"
            )
    selected = set(checkpoint.select(include, exclude))
    tensors, spectra, whitened = [], {}, set()
    for entry in checkpoint.entries.values():
        if entry.name not in selected:
            continue
        reason = skip_reason(entry)
        if reason is not None:
            tensors.append(new_report(entry, Status.skipped, reason))
        else:
            matrix = load_matrix(checkpoint, entry, device)
            view = whitened_view(matrix, calibration, entry.name)
            spectrum = spectrum_of(view, rtol=rtol)
            report = new_report(entry, Status.analyzed)
            if view is not matrix:
                whitened.add(entry.name)
            elif calibration is not None:
                report.reason = _plain_reason(calibration, entry.name)
            describe_spectrum(report, spectrum, rtol)
            _describe_tail(report, spectrum, rtol)
            report.singular_values = _singular_values(spectrum, top)
            spectra[entry.name] = spectrum
            tensors.append(report)
        if on_tensor:
            on_tensor(entry)
    if policy is not None:
        policy_for = tensor_policies(policy, spectra, calibration=calibration)  # as compress allocates
        for report in tensors:
            if report.name in spectra:
                apply_policy(report, spectra[report.name], policy_for(report.name))
                if report.name in whitened and report.status == Status.factorized:
                    report.output_error, report.rel_error = report.rel_error, None  # the optimum on W·S
    return Report(
        command="analyze",
        sources=[str(checkpoint.source)],
        tensors=tensors,
        totals=Totals.of(tensors),
        policy=policy.as_dict() if policy else None,
        options=budget_options(policy, calibration),
    )


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
