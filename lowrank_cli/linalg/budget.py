"""--budget F: ranks for all tensors together, under one parameter budget.

Each further rank-1 term i of tensor t costs (m_t + n_t) numbers and removes σ_{t,i}²/‖W_t‖_F²
of t's relative squared error. Minimizing Σ_t relative squared error under Σ_t r_t·(m_t + n_t) ≤
F·Σ_t m_t·n_t is then a knapsack whose items, per tensor, come in non-increasing order of gain
per number; taking items greedily by gain per number is optimal for its relaxation.
"""

from __future__ import annotations

import numpy as np

from lowrank_cli.errors import UsageError
from lowrank_cli.linalg.spectrum import Spectrum, break_even_rank


def allocate(spectra: dict[str, Spectrum], fraction: float) -> dict[str, int]:
    """A rank per tensor with Σ r·(m + n) ≤ fraction·Σ m·n, at least 1 for each non-zero tensor.

    Zero matrices (unchanged weights, for extract) get rank 0 and count in neither side.
    """
    budget = fraction * sum(s.shape[0] * s.shape[1] for s in spectra.values() if not s.is_zero)
    ranks = {name: int(not s.is_zero) for name, s in spectra.items()}
    spent = sum(r * sum(spectra[name].shape) for name, r in ranks.items())
    if spent > budget:
        raise UsageError(
            f"{{budget}} {fraction:g} allows {budget:,.0f} params, but rank 1 for every tensor needs {spent:,};"
            " raise {budget} or select fewer tensors"
        )
    names, gains, costs = [], [], []
    for name, spectrum in spectra.items():
        if spectrum.is_zero:
            continue
        m, n = spectrum.shape
        # Above break-even factors save nothing; past the numerical rank a term removes only rounding.
        cap = max(1, min(break_even_rank(m, n), spectrum.numerical_rank()))
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
