"""Rank policies: how many singular values each tensor keeps."""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_cli.errors import UsageError, arg
from lowrank_cli.linalg.spectrum import Spectrum


@dataclass(frozen=True)
class RankPolicy:
    """Exactly one of a fixed rank, an energy fraction, a maximum relative error, or a global budget.

    A budget is resolved per tensor (lowrank_cli.linalg.budget) before factorizing: into a fixed rank,
    or into `dense`, the budget keeping the tensor whole.
    """

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    budget: float | None = None
    dense: bool = False

    @classmethod
    def from_options(
        cls,
        rank: int | None = None,
        energy: float | None = None,
        max_error: float | None = None,
        budget: float | None = None,
    ) -> RankPolicy | None:
        """Validate the policy arguments; None when none was given."""
        options = (("rank", rank), ("energy", energy), ("max_error", max_error), ("budget", budget))
        given = [arg(name) for name, value in options if value is not None]
        if len(given) > 1:
            raise UsageError(f"{' and '.join(given)} both set a rank policy; give only one")
        if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank <= 0):
            raise UsageError(f"{arg('rank')} must be a positive integer, got {rank}")
        if energy is not None and not (0.0 < energy <= 1.0):
            raise UsageError(f"{arg('energy')} must be in (0, 1], got {energy}; 0.99 keeps 99 % of Σσ²")
        if max_error is not None and not (0.0 <= max_error < 1.0):
            raise UsageError(f"{arg('max_error')} must be in [0, 1), got {max_error}; 0.05 allows 5 % relative error")
        if budget is not None and not (0.0 < budget < 1.0):
            raise UsageError(f"{arg('budget')} must be in (0, 1), got {budget}; 0.25 keeps a quarter of the params")
        if not given:
            return None
        return cls(rank=None if rank is None else int(rank), energy=energy, max_error=max_error, budget=budget)

    def choose(self, spectrum: Spectrum) -> int:
        """The rank this policy keeps for a matrix with this spectrum (0 for a zero matrix)."""
        if spectrum.is_zero:
            return 0
        if self.dense:
            return min(spectrum.shape)
        if self.budget is not None:
            raise ValueError("a budget policy is resolved per tensor by lowrank_cli.linalg.budget.allocate")
        if self.rank is not None:
            return min(self.rank, min(spectrum.shape))
        if self.energy is not None:
            return spectrum.rank_for_energy(self.energy)
        return spectrum.rank_for_error(self.max_error)

    def error_target(self) -> float | None:
        """The relative error the policy promises at most (None for a fixed rank)."""
        if self.max_error is not None:
            return self.max_error
        if self.energy is not None:
            return (1.0 - self.energy) ** 0.5
        return None

    def as_dict(self) -> dict[str, float | int]:
        return {key: value for key, value in vars(self).items() if value is not None and value is not False}


def require_policy(policy: RankPolicy | None) -> RankPolicy:
    if policy is None:
        options = f"{arg('rank')}, {arg('energy')}, {arg('max_error')} or {arg('budget')}"
        raise UsageError(f"no rank policy; give one of {options}")
    return policy
