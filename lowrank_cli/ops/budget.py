"""The policy of each tensor: one for all, or under a budget a fixed rank or dense for each (linalg.budget)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lowrank_cli.io.calibration import Calibration
from lowrank_cli.linalg.budget import DEFAULT_OBJECTIVE, allocate
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.ops.pipeline import spectrum_of


def policy_per_tensor(
    policy: RankPolicy,
    names: Iterable[str],
    matrix_of: Callable[[str], torch.Tensor],
    on_done: Callable[[str], None] | None = None,
    *,
    allow_dense: bool = True,
    objective: str = DEFAULT_OBJECTIVE,
    sensitivity: dict[str, float] | None = None,
) -> Callable[[str], RankPolicy]:
    """The policy of each tensor: the same for all, or under a budget a fixed rank or dense for each.

    A budget costs one first pass: every selected matrix's singular values (of W·S with calibration:
    matrix_of gives the whitened view), then `allocate`. allow_dense=False for LoRA adapters.
    sensitivity (from calibrate): each tensor's loss is its measured cost to the model's output.
    """
    if policy.budget is None:
        return lambda name: policy
    spectra = {}
    for name in names:
        spectra[name] = spectrum_of(matrix_of(name))
        if on_done:
            on_done(name)
    ranks = allocate(spectra, policy.budget, objective, allow_dense=allow_dense, sensitivity=sensitivity)
    return budget_policies(ranks).__getitem__


def budget_policies(ranks: dict[str, int | None]) -> dict[str, RankPolicy]:
    """allocate's outcome as policies: a fixed rank, or dense (None) reported as the budget keeping it whole."""
    return {name: RankPolicy(dense=True) if rank is None else RankPolicy(rank=rank) for name, rank in ranks.items()}


def calibration_options(calibration: Calibration | None, policy: RankPolicy | None) -> dict[str, str]:
    """A report's options with statistics: their file and, under a budget, whether sensitivities weighed it."""
    if calibration is None:
        return {}
    options = {"calibration": calibration.source}
    if policy is not None and policy.budget is not None:
        options["budget_objective"] = "sensitivity" if calibration.sensitivity else DEFAULT_OBJECTIVE
    return options


def calibration_notes(calibration: Calibration | None, policy: RankPolicy | None) -> list[str]:
    """A budget whose statistics hold no sensitivities (made without the probe, or before it existed)."""
    if calibration is None or policy is None or policy.budget is None or calibration.sensitivity:
        return []
    return [
        f"{calibration.source} has no sensitivities, so the budget weighs the spectra alone; rerun lowrank"
        " calibrate with its sensitivity probe (the default) to spare the weights the model needs most"
    ]
