"""--budget F: ranks for all tensors together, under one parameter budget.

Each further rank-1 term i of tensor t costs (m_t + n_t) numbers and removes σ_{t,i}²/‖W_t‖_F²
of t's relative squared error. Minimizing Σ_t relative squared error under Σ_t r_t·(m_t + n_t) ≤
F·Σ_t m_t·n_t is then a knapsack whose items, per tensor, come in non-increasing order of gain
per number; taking items greedily by gain per number is optimal for its relaxation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from lowrank_cli.errors import UsageError
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.spectrum import Spectrum, singular_values


def allocate(spectra: dict[str, Spectrum], fraction: float) -> dict[str, int]:
    """A rank per tensor with Σ r·(m + n) ≤ fraction·Σ m·n, at least 1 for each non-zero tensor.

    Zero matrices (unchanged weights, for extract) get rank 0 and count in neither side.
    """
    budget = fraction * sum(s.shape[0] * s.shape[1] for s in spectra.values() if not s.is_zero)
    ranks = {name: int(not s.is_zero) for name, s in spectra.items()}
    spent = sum(r * sum(spectra[name].shape) for name, r in ranks.items())
    if spent > budget:
        raise UsageError(
            f"--budget {fraction:g} allows {budget:,.0f} params, but rank 1 for every tensor needs {spent:,};"
            " raise --budget or select fewer tensors"
        )
    names, gains, costs = [], [], []
    for name, spectrum in spectra.items():
        if spectrum.is_zero:
            continue
        m, n = spectrum.shape
        # Above break-even factors save nothing; past the numerical rank a term removes only rounding.
        cap = max(1, min((m * n - 1) // (m + n), spectrum.numerical_rank()))
        terms = spectrum.gains()[1:cap]  # what ranks 2…cap each remove
        names += [name] * len(terms)
        gains.append(terms / (m + n))
        costs.append(np.full(len(terms), m + n))
    if not names:
        return ranks
    gain = np.concatenate(gains)
    cost = np.concatenate(costs)
    order = np.argsort(-gain, kind="stable")
    taken = order[np.cumsum(cost[order]) <= budget - spent]
    for index in taken:
        ranks[names[index]] += 1
    return ranks


def policy_per_tensor(
    policy: RankPolicy,
    names: Iterable[str],
    matrix_of: Callable[[str], torch.Tensor],
    on_done: Callable[[str], None] | None = None,
) -> Callable[[str], RankPolicy]:
    """The policy of each tensor: the same for all, or under --budget a fixed rank for each.

    A budget costs one first pass: every selected matrix's singular values, then `allocate`.
    """
    if policy.budget is None:
        return lambda name: policy
    spectra = {}
    for name in names:
        matrix = matrix_of(name)
        values, scale = singular_values(matrix)
        spectra[name] = Spectrum.of(values, tuple(matrix.shape), matrix.dtype, scale)
        if on_done:
            on_done(name)
    ranks = allocate(spectra, policy.budget)
    return lambda name: RankPolicy(rank=ranks[name])
