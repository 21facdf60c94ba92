"""The power-law fit of analyze's heavy-tail metrics (alpha, KS distance, log spectral norm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import by_name, cli_json, save, with_spectrum
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_cli.linalg.heavytail import MIN_EIGENVALUES, fit_power_law


def _power_law(alpha: float, count: int, seed: int, xmin: float = 1.0) -> np.ndarray:
    """Samples of p(x) ∝ x^(−alpha) on x ≥ xmin, by inverting its CDF 1 − (x/xmin)^(1−alpha)."""
    u = np.random.default_rng(seed).random(count)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


@pytest.mark.parametrize("alpha", [1.5, 2.0, 2.5, 3.5, 5.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fit_recovers_the_exponent_of_power_law_samples(alpha, seed):
    fit = fit_power_law(_power_law(alpha, 3000, seed))
    # the MLE's standard error is (α − 1)/√n; 4 of them, on the tail the fit kept
    assert fit.alpha == pytest.approx(alpha, abs=4 * (alpha - 1) / np.sqrt(fit.tail))
    assert fit.tail >= 300
    assert fit.ks_distance < 0.05


def test_the_cut_off_finds_where_the_power_law_starts():
    # a bulk on (0, 2) below a power law with α = 2.5 above x_min = 2: the KS distance puts x_min near 2
    rng = np.random.default_rng(3)
    data = np.concatenate([rng.uniform(0.01, 2.0, 1500), _power_law(2.5, 1500, 4, xmin=2.0)])
    fit = fit_power_law(data)
    assert fit.xmin == pytest.approx(2.0, rel=0.15)
    assert fit.alpha == pytest.approx(2.5, rel=0.1)


@pytest.mark.parametrize("count", [200, 700])  # 700: the scan's table takes several blocks of candidates
def test_the_fit_is_the_definition_evaluated_at_every_cut_off(count):
    data = np.sort(_power_law(3.0, count, 5) + np.random.default_rng(6).random(count))
    best = None
    for i, xmin in enumerate(data[:-1]):  # Clauset et al. (2009), eqs. 3.1 and 3.9, one candidate at a time
        tail = data[i:]
        alpha = 1 + len(tail) / np.sum(np.log(tail / xmin))
        law = 1 - (tail / xmin) ** (1 - alpha)
        distance = max(abs(law[j] - j / len(tail)) for j in range(len(tail)))
        if best is None or distance < best[0]:
            best = (distance, alpha, xmin, len(tail))
    fit = fit_power_law(data[::-1])  # any order
    assert (fit.ks_distance, fit.alpha, fit.xmin, fit.tail) == pytest.approx(best, rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-30, 1e30), seed=st.integers(0, 2**16))
def test_alpha_and_distance_do_not_depend_on_the_scale(scale, seed):
    data = _power_law(2.2, 100, seed)
    plain, scaled = fit_power_law(data), fit_power_law(data * scale)
    assert scaled.alpha == pytest.approx(plain.alpha, rel=1e-6)
    assert scaled.ks_distance == pytest.approx(plain.ks_distance, rel=1e-6, abs=1e-9)
    assert scaled.tail == plain.tail


def test_too_few_eigenvalues_or_all_equal_give_no_fit():
    assert fit_power_law(np.arange(1.0, MIN_EIGENVALUES)) is None
    assert fit_power_law(np.r_[np.zeros(50), np.arange(1.0, MIN_EIGENVALUES)]) is None  # zeros are no eigenvalues
    assert fit_power_law(np.full(40, 3.0)) is None
    assert fit_power_law(np.r_[np.full(30, 3.0), np.full(10, 7.0)]).alpha < 1e6  # the tie run at the top is no tail


def test_analyze_reports_the_fit_of_the_eigenvalues_of_w(tmp_path):
    # σ² at the quantiles of a power law with α = 3: λ_i = (1 − (i + ½)/N)^(−1/(α − 1))
    count, alpha = 120, 3.0
    eigenvalues = (1 - (np.arange(count) + 0.5) / count) ** (-1 / (alpha - 1))
    sigma = np.sqrt(np.sort(eigenvalues)[::-1])
    w = with_spectrum(200, count, sigma, seed=7, dtype=torch.float64) * 0.01
    tiny = with_spectrum(10, 6, [3.0, 2.0, 1.0, 0.5, 0.2, 0.1], seed=8)
    source = save(tmp_path / "tail.safetensors", {"W": w, "tiny": tiny, "b": torch.ones(5)})
    rows = by_name(cli_json("analyze", source))
    t = rows["W"]
    assert t["alpha"] == pytest.approx(alpha, rel=0.05)
    assert t["ks_distance"] < 0.05
    sigma_max = np.linalg.norm(w.numpy(), 2)
    assert t["log_spectral_norm"] == pytest.approx(np.log10(sigma_max**2), rel=1e-9)
    assert t["alpha_weighted"] == pytest.approx(t["alpha"] * t["log_spectral_norm"], rel=1e-12)
    assert 10 <= t["alpha_tail"] <= count
    assert rows["tiny"]["alpha"] is None  # 6 eigenvalues: no fit, but a spectral norm
    assert rows["tiny"]["log_spectral_norm"] == pytest.approx(np.log10(9.0), rel=1e-5)
    assert rows["b"]["alpha"] is None and rows["b"]["log_spectral_norm"] is None
