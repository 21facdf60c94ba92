"""A budget becomes a policy per tensor here, and only here: for analyze, compress, extract, resize and
compress --fidelity alike (linalg.budget.allocate does the allocating)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lowrank_cli.io.calibration import Calibration
from lowrank_cli.linalg.budget import DEFAULT_OBJECTIVE, allocate, uniform
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.spectrum import Spectrum
from lowrank_cli.ops.factoring import spectrum_of

# What a budget minimizes. A model's matrices (analyze, compress): the measured sensitivities when the
# statistics hold them; statistics without them cut every matrix to the same share of its params
# (UNIFORM, SVD-LLM's choice): weighing the whitened spectra alone did worse than that on SmolLM2
# (KL 2.10 against 1.58 at 0.6, docs/calibration.md). Without statistics, linalg.budget's default.
# A LoRA adapter's ΔW (extract, resize): Σ‖ΔW − BA‖², since a small ΔW changes the outputs little; on a
# real fine-tune it beat a uniform rank of the same size where the balanced objective did not
# (benchmarks/README.md). Sensitivities were measured on cuts of W, not of a ΔW, so an adapter does not use them.
ADAPTER_OBJECTIVE = "absolute"
SENSITIVITY = "sensitivity"
UNIFORM = "uniform"


def budget_objective(calibration: Calibration | None, *, adapter: bool = False) -> str:
    """The objective a budget allocates by (see above); the report's options["budget_objective"]."""
    if adapter:
        return ADAPTER_OBJECTIVE
    if calibration is None:
        return DEFAULT_OBJECTIVE
    return SENSITIVITY if calibration.sensitivity else UNIFORM


def budget_ranks(
    spectra: dict[str, Spectrum],
    budget: float,
    *,
    calibration: Calibration | None = None,
    adapter: bool = False,
    speed: bool = False,
) -> dict[str, int | None]:
    """A rank per tensor, or None where the budget keeps it whole (never for an adapter, which holds ranks only);
    with `speed`, ranks only up to speed_rank (compress --objective speed)."""
    objective = budget_objective(calibration, adapter=adapter)
    if objective == SENSITIVITY:
        return allocate(spectra, budget, sensitivity=calibration.sensitivity, speed=speed)
    if objective == UNIFORM:
        return uniform(spectra, budget)
    return allocate(spectra, budget, objective, allow_dense=not adapter, speed=speed)


def tensor_policies(
    policy: RankPolicy,
    spectra: dict[str, Spectrum],
    *,
    calibration: Calibration | None = None,
    adapter: bool = False,
    speed: bool = False,
) -> Callable[[str], RankPolicy]:
    """The policy of each tensor: the same for all, or under a budget a fixed rank or dense for each.

    spectra: every selected matrix's singular values (of W·S with calibration; of ΔW for an adapter).
    """
    if policy.budget is None:
        return lambda name: policy
    ranks = budget_ranks(spectra, policy.budget, calibration=calibration, adapter=adapter, speed=speed)
    return {
        name: RankPolicy(dense=True) if rank is None else RankPolicy(rank=rank) for name, rank in ranks.items()
    }.__getitem__


def policy_per_tensor(
    policy: RankPolicy,
    names: Iterable[str],
    matrix_of: Callable[[str], torch.Tensor],
    on_done: Callable[[str], None] | None = None,
    *,
    calibration: Calibration | None = None,
    adapter: bool = False,
    speed: bool = False,
) -> Callable[[str], RankPolicy]:
    """tensor_policies over matrices read on demand: a budget costs one first pass over their spectra
    (matrix_of gives the view the factors are of: W·S with calibration, ΔW for an adapter)."""
    if policy.budget is None:
        return lambda name: policy
    spectra = {}
    for name in names:
        spectra[name] = spectrum_of(matrix_of(name))
        if on_done:
            on_done(name)
    return tensor_policies(policy, spectra, calibration=calibration, adapter=adapter, speed=speed)


def budget_options(
    policy: RankPolicy | None, calibration: Calibration | None, *, adapter: bool = False
) -> dict[str, str]:
    """A report's options for its policy and statistics: the statistics file, and under a budget its objective."""
    options = {} if calibration is None else {"calibration": calibration.source}
    if policy is not None and policy.budget is not None:
        options["budget_objective"] = budget_objective(calibration, adapter=adapter)
    return options


def calibration_notes(calibration: Calibration | None, policy: RankPolicy | None) -> list[str]:
    """A budget whose statistics hold no sensitivities (made without the probe, or before it existed)."""
    if calibration is None or policy is None or policy.budget is None or calibration.sensitivity:
        return []
    return [
        f"{calibration.source} has no sensitivities, so the budget cuts every matrix to the same share of its"
        " params; rerun lowrank calibrate with its sensitivity probe (the default) to spare the weights the"
        " model needs most"
    ]
