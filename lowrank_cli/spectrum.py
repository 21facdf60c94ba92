"""Singular-value spectra and the ranks read off them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_SPARK = "▁▂▃▄▅▆▇█"
_TIE = 1e-9  # a target met to within rounding of the SVD itself counts as met


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
    def is_zero(self) -> bool:
        return self.sigma_max == 0.0

    @property
    def _shares(self) -> np.ndarray:
        """σ_i² / Σσ²: each term's share of ‖W‖_F², computed on σ/σ_max so no scale overflows."""
        if self.is_zero:
            return np.zeros_like(self.singular_values)
        squares = (self.singular_values / self.sigma_max) ** 2
        return squares / squares.sum()

    @property
    def _tail(self) -> np.ndarray:
        """tail[r] = Σ_{i≥r} shares, summed from the small end so it does not cancel."""
        return np.append(np.cumsum(self._shares[::-1])[::-1], 0.0)

    def numerical_rank(self, rtol: float | None = None) -> int:
        """Count of σ_i > σ_max·tol, tol = max(m, n)·ε as numpy.linalg.matrix_rank uses."""
        tol = rtol if rtol is not None else max(self.shape) * self.eps
        return int(np.count_nonzero(self.singular_values > self.sigma_max * tol))

    @property
    def stable_rank(self) -> float:
        """‖W‖_F² / σ_max²."""
        return float(((self.singular_values / self.sigma_max) ** 2).sum()) if not self.is_zero else 0.0

    def gains(self) -> np.ndarray:
        """How much relative squared error each rank-1 term removes: σ_i² / ‖W‖_F²."""
        return self._shares

    def rank_for_energy(self, fraction: float) -> int:
        """The smallest r with Σ_{i≤r} σ_i² ≥ fraction·Σσ²."""
        if self.is_zero:
            return 0
        cumulative = np.cumsum(self._shares)
        needed = fraction * cumulative[-1] * (1 - _TIE)
        return min(int(np.searchsorted(cumulative, needed, side="left")) + 1, len(cumulative))

    def relative_error(self, rank: int) -> float:
        """‖W − W_r‖_F / ‖W‖_F for the best rank-r approximation (Eckart–Young)."""
        if self.is_zero:
            return 0.0
        return float(np.sqrt(self._tail[min(rank, self.singular_values.size)]))

    def rank_for_error(self, max_error: float) -> int:
        """The smallest r whose best rank-r approximation has relative error ≤ max_error."""
        if self.is_zero:
            return 0
        errors = np.sqrt(self._tail)  # non-increasing in r
        return int(np.argmax(errors <= max_error * (1 + _TIE)))

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
