"""Singular-value spectra and the ranks read off them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ENERGY_LEVELS = (0.9, 0.99, 0.999)
_SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Spectrum:
    """The singular values of an m×n matrix (float64, descending) and what follows from them."""

    singular_values: np.ndarray
    shape: tuple[int, int]
    eps: float  # machine epsilon of the dtype the values were computed in

    @classmethod
    def of(cls, values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype | None = None) -> Spectrum:
        """Wrap singular values of a matrix whose computation dtype is `dtype` (default: the values')."""
        eps = float(torch.finfo(dtype or values.dtype).eps)
        return cls(values.detach().to("cpu", torch.float64).numpy(), tuple(shape), eps)

    @property
    def sigma_max(self) -> float:
        return float(self.singular_values[0]) if self.singular_values.size else 0.0

    @property
    def energy(self) -> float:
        """Σσ² = ‖W‖_F²."""
        return float(self._cumulative[-1]) if self.singular_values.size else 0.0

    @property
    def _cumulative(self) -> np.ndarray:
        return np.cumsum(self.singular_values**2)

    @property
    def _tail(self) -> np.ndarray:
        """tail[r] = Σ_{i≥r} σ_i², summed from the small end so it does not cancel."""
        squares = self.singular_values**2
        return np.append(np.cumsum(squares[::-1])[::-1], 0.0)

    def numerical_rank(self, rtol: float | None = None) -> int:
        """Count of σ_i > σ_max·tol, tol = max(m, n)·ε as numpy.linalg.matrix_rank uses."""
        tol = rtol if rtol is not None else max(self.shape) * self.eps
        return int(np.count_nonzero(self.singular_values > self.sigma_max * tol))

    @property
    def stable_rank(self) -> float:
        """‖W‖_F² / σ_max²."""
        return self.energy / self.sigma_max**2 if self.sigma_max > 0 else 0.0

    def rank_for_energy(self, fraction: float) -> int:
        """The smallest r with Σ_{i≤r} σ_i² ≥ fraction·Σσ²."""
        if self.energy == 0.0:
            return 0
        cumulative = self._cumulative
        return min(int(np.searchsorted(cumulative, fraction * cumulative[-1], side="left")) + 1, len(cumulative))

    def relative_error(self, rank: int) -> float:
        """‖W − W_r‖_F / ‖W‖_F for the best rank-r approximation (Eckart–Young)."""
        if self.energy == 0.0:
            return 0.0
        return float(np.sqrt(self._tail[min(rank, self.singular_values.size)] / self.energy))

    def rank_for_error(self, max_error: float) -> int:
        """The smallest r whose best rank-r approximation has relative error ≤ max_error."""
        if self.energy == 0.0:
            return 0
        errors = np.sqrt(self._tail / self.energy)  # non-increasing in r
        return int(np.argmax(errors <= max_error))

    def sparkline(self, width: int = 16) -> str:
        """The decay of σ on a log scale, σ_max at the left, one block per sampled value."""
        values = self.singular_values
        if values.size == 0 or self.sigma_max == 0.0:
            return ""
        picks = values[np.unique(np.linspace(0, values.size - 1, min(width, values.size)).round().astype(int))]
        floor = self.sigma_max * self.eps
        logs = np.log10(np.maximum(picks, floor) / self.sigma_max)  # ≤ 0
        depth = max(-np.log10(self.eps), 1.0)
        levels = np.clip(((logs + depth) / depth * (len(_SPARK) - 1)).round().astype(int), 0, len(_SPARK) - 1)
        return "".join(_SPARK[level] for level in levels)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values of a float32/float64 matrix, descending, without singular vectors.

    svdvals skips the vectors, which are most of a full SVD's cost (5× on 4096×4096 here). The
    float64 Gram matrix's eigenvalues were slower still on this CPU (benchmarks/ has figures).
    """
    return torch.linalg.svdvals(matrix)
