"""The heavy tail of a weight matrix's eigenvalue density: a power law fitted to the eigenvalues of WᵀW.

The method is Clauset, Shalizi and Newman's (SIAM Review 51, 2009, "Power-law distributions in
empirical data"), as the `powerlaw` package and WeightWatcher (its "ww" fitter) apply it: for each
candidate lower cut-off x_min among the eigenvalues, the maximum-likelihood exponent of a
continuous power law p(λ) ∝ λ^(−α) on λ ≥ x_min, and the Kolmogorov–Smirnov distance between that
law and the eigenvalues above x_min; the x_min with the smallest distance wins. docs/analyze-metrics.md
says what the numbers mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_EIGENVALUES = 8  # fewer nonzero eigenvalues than this: no fit (WeightWatcher's min_evals)
_BLOCK = 1 << 16  # entries of the (candidates, points) tables _ks_distances fills at a time: 512 KB, cache-sized


@dataclass(frozen=True)
class PowerLawFit:
    """p(λ) ∝ λ^(−alpha) for λ ≥ xmin, fitted to `tail` eigenvalues; ks_distance is the fit's KS distance."""

    alpha: float
    xmin: float
    ks_distance: float
    tail: int


def fit_power_law(eigenvalues: np.ndarray) -> PowerLawFit | None:
    """The power law that best fits the upper tail of `eigenvalues` (> 0), or None with fewer than 8 of them.

    For each candidate x_min = x_i (x sorted ascending, n = the count of x ≥ x_i):
        α_i = 1 + n / Σ_{j≥i} ln(x_j / x_i)                       (maximum likelihood)
        D_i = max_{j≥i} |1 − (x_j / x_i)^(1−α_i) − (j − i)/n|      (KS: the law's CDF against the data's)
    and the fit is the i with the smallest D_i (candidates with α_i ≤ 1, no normalisable law, count as D = 1).

    Args:
        eigenvalues: λ_i = σ_i² of W (any order); zeros and negatives are left out.

    Example:
        >>> x = (1 - np.random.default_rng(0).random(2000)) ** (-1 / 1.5)  # α = 2.5, x_min = 1
        >>> round(fit_power_law(x).alpha, 1)
        2.5
    """
    x = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    x = x[x > 0]
    if x.size < MIN_EIGENVALUES:
        return None
    logs = np.log(x / x[0])  # ≥ 0 and exactly 0 for ties with the smallest: sums below do not cancel them
    counts = np.arange(x.size, 0, -1, dtype=np.float64)  # n_i = N − i
    suffix = np.cumsum(logs[::-1])[::-1]  # Σ_{j≥i} ln(x_j / x_0)
    spread = suffix - counts * logs  # Σ_{j≥i} ln(x_j / x_i)
    spread[spread <= 1e-12 * suffix] = 0.0  # a tail of ties, up to the rounding of the sums
    with np.errstate(divide="ignore"):
        alphas = 1 + counts / spread  # inf where the tail is all ties
    distances = _ks_distances(logs, alphas, counts)
    best = int(np.argmin(distances))
    if not 1 < alphas[best] < np.inf:  # every candidate tail is ties or too flat: nothing to fit
        return None
    return PowerLawFit(float(alphas[best]), float(x[best]), float(distances[best]), int(x.size - best))


def _ks_distances(logs: np.ndarray, alphas: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """D_i for every candidate x_min = x_i but the last, 1 where α_i gives no normalisable law.

    The same arithmetic as one candidate at a time, on a (candidates, points) table filled a block
    of rows at a time: the scan is one numpy pass instead of N small ones (N ≈ 400 for MiniLM).
    """
    size = logs.size
    distances = np.ones(size - 1)
    fits = (alphas[:-1] > 1) & (alphas[:-1] < np.inf)
    start = 0
    while start < size - 1:
        stop = min(size - 1, start + max(1, _BLOCK // (size - start)))
        rows = np.arange(start, stop)[:, None]  # (b, 1) candidates i
        cols = np.arange(start, size)[None, :]  # (1, N − start) points j
        with np.errstate(over="ignore", invalid="ignore"):  # α_i ≤ 1 or ∞: no fit, its D_i is not used
            rises = np.maximum(logs[cols] - logs[rows], 0.0)  # (b, N − start) ln(x_j / x_i), 0 for j < i
            law = 1 - np.exp((1 - alphas[rows]) * rises)  # the fitted CDF at x_j
            data = np.maximum(cols - rows, 0) / counts[rows]  # the data's CDF (j − i)/n_i; both 0 for j < i
            distances[start:stop] = np.where(fits[start:stop], np.abs(law - data).max(axis=1), 1.0)
        start = stop
    return distances
