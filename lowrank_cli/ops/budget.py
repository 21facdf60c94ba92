"""The policy of each tensor: one for all, or under a budget a fixed rank for each (linalg.budget)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lowrank_cli.linalg.budget import allocate
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.ops.pipeline import spectrum_of


def policy_per_tensor(
    policy: RankPolicy,
    names: Iterable[str],
    matrix_of: Callable[[str], torch.Tensor],
    on_done: Callable[[str], None] | None = None,
) -> Callable[[str], RankPolicy]:
    """The policy of each tensor: the same for all, or under a budget a fixed rank for each.

    A budget costs one first pass: every selected matrix's singular values, then `allocate`.
    """
    if policy.budget is None:
        return lambda name: policy
    spectra = {}
    for name in names:
        spectra[name] = spectrum_of(matrix_of(name))
        if on_done:
            on_done(name)
    ranks = allocate(spectra, policy.budget)
    return lambda name: RankPolicy(rank=ranks[name])
