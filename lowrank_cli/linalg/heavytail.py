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
    distances = np.ones(x.size - 1)
    for i in range(x.size - 1):  # the last point alone is no tail
        alpha = alphas[i]
        if not 1 < alpha < np.inf:
            continue
        n = x.size - i
        law = 1 - np.exp((1 - alpha) * (logs[i:] - logs[i]))  # (n,) the fitted CDF at x_i … x_N
        distances[i] = np.max(np.abs(law - np.arange(n) / n))
    best = int(np.argmin(distances))
    if not 1 < alphas[best] < np.inf:  # every candidate tail is ties or too flat: nothing to fit
        return None
    return PowerLawFit(float(alphas[best]), float(x[best]), float(distances[best]), int(x.size - best))
