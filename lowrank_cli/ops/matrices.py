"""What every command does to one tensor: decide if it is a matrix, load it, read its spectrum."""

from __future__ import annotations

import torch

from lowrank_cli.io.checkpoint import Checkpoint, TensorEntry
from lowrank_cli.io.dtypes import compute_dtype
from lowrank_cli.errors import TensorError
from lowrank_cli.linalg.factorize import break_even_rank
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.ops.report import TensorReport
from lowrank_cli.linalg.spectrum import Spectrum


def skip_reason(entry: TensorEntry, selected: bool = True) -> str | None:
    """Why a tensor is copied unchanged instead of factorized, or None for a float matrix."""
    if not selected:
        return "not selected (--include/--exclude)"
    if not entry.is_known:
        return f"{entry.dtype}, a dtype lowrank copies but does not compute in"
    if not entry.is_float:
        return f"{entry.dtype}, not floating point"
    if len(entry.shape) < 2:
        return f"{len(entry.shape)}-D, not a matrix"
    if entry.numel == 0:
        return "empty tensor"
    return None


def new_report(entry: TensorEntry, status: str, reason: str | None = None) -> TensorReport:
    """A row for the tensor; until a rank is decided it keeps all its params."""
    return TensorReport(
        name=entry.name,
        shape=list(entry.shape),
        dtype=entry.dtype,
        params=entry.numel,
        status=status,
        reason=reason,
        params_after=entry.numel,
        file=str(entry.path),
    )


def load_matrix(checkpoint: Checkpoint, entry: TensorEntry, device: str = "cpu") -> torch.Tensor:
    """The tensor as an (out, in·…) matrix in its computation dtype, checked for NaN and Inf."""
    matrix = checkpoint.read(entry.name).to(device).reshape(entry.matrix_shape).to(compute_dtype(entry.dtype))
    if not bool(torch.isfinite(matrix).all()):
        bad = "NaN" if bool(torch.isnan(matrix).any()) else "Inf"
        raise TensorError(
            f"{entry.path}: tensor '{entry.name}' contains {bad}; repair the checkpoint or leave the tensor"
            f" out with --exclude '{entry.name}'"
        )
    return matrix


def describe_spectrum(report: TensorReport, spectrum: Spectrum, rtol: float | None = None) -> None:
    """Fill in the spectrum's own numbers: numerical and stable rank, energy ranks, sparkline."""
    report.numerical_rank = spectrum.numerical_rank(rtol)
    report.stable_rank = spectrum.stable_rank
    report.rank_90, report.rank_99, report.rank_999 = (spectrum.rank_for_energy(f) for f in (0.9, 0.99, 0.999))
    report.sparkline = spectrum.sparkline()


def apply_policy(report: TensorReport, spectrum: Spectrum, policy: RankPolicy) -> None:
    """What the policy would do, with the optimal (Eckart–Young) error at its rank."""
    rank = policy.choose(spectrum)
    decide(report, rank, spectrum.shape, policy)
    if report.status == "factorized":
        report.rel_error = spectrum.relative_error(rank)


def decide(report: TensorReport, rank: int | None, shape: tuple[int, int], policy: RankPolicy) -> None:
    """Factorized when r·(m + n) < m·n, else dense with the reason; rank None: above break-even."""
    m, n = shape
    report.rank = rank
    report.params_after = report.params
    report.rel_error = 0.0
    report.status = "dense"
    if rank is None:
        report.reason = f"the target needs rank > {break_even_rank(m, n)}, where factors stop saving params"
    elif rank == 0:
        report.reason = "zero matrix"
    elif rank * (m + n) >= m * n:
        clamp = f"--rank {policy.rank} clamped to min(m, n); " if policy.rank and policy.rank > rank else ""
        report.reason = f"{clamp}rank {rank} needs {rank * (m + n):,} ≥ {m * n:,} params"
    else:
        report.status = "factorized"
        report.params_after = rank * (m + n)
        report.rel_error = None  # the caller measures or computes it
