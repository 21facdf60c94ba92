"""The spectrum routes (svdvals, float64 Gram) against numpy's float64 SVD, the rule between them,
the adaptive power-iteration stop, and the fast matrix read.

Tolerances come from the dtypes' epsilons, never from one CPU's rounding: the same assertions must
hold on CPUs whose LAPACK and BLAS round differently.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import save, tail_errors, with_spectrum

import lowrank_cli
from lowrank_cli.io.checkpoint import open_checkpoint
from lowrank_cli.linalg.factorize import POWER_TOLERANCE, finite
from lowrank_cli.linalg.randomized import power_range, randomized_svd
from lowrank_cli.linalg.spectrum import (
    Spectrum,
    gram_singular_values,
    singular_values,
    spectrum_route,
    spectrum_threads,
)

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)

SPECTRA = {
    "i^-0.5": lambda k: np.arange(1, k + 1, dtype=np.float64) ** -0.5,
    "i^-2": lambda k: np.arange(1, k + 1, dtype=np.float64) ** -2.0,
    "0.9^i": lambda k: 0.9 ** np.arange(k, dtype=np.float64),
    "flat": lambda k: np.ones(k),
}


def exact(w: torch.Tensor) -> np.ndarray:
    """numpy's float64 singular values of the float32 values as stored."""
    return np.linalg.svd(w.to(torch.float64).numpy(), compute_uv=False)


@pytest.mark.parametrize("shape", [(400, 300), (300, 400)])
@pytest.mark.parametrize("decay", sorted(SPECTRA))
def test_svdvals_route_within_float32_rounding_of_float64(shape, decay):
    w = with_spectrum(*shape, SPECTRA[decay](min(shape)), seed=1)
    values, scale = singular_values(w, route="svdvals")
    reference = exact(w)
    # a backward-stable float32 SVD: |Δσ| ≤ c·ε₃₂·σ_max, c a small multiple (4 here, ~10 on 4096²)
    np.testing.assert_allclose(values.double().numpy() * scale, reference, rtol=0, atol=16 * EPS32 * reference[0])


@pytest.mark.parametrize("shape", [(400, 300), (300, 400)])
@pytest.mark.parametrize("decay", sorted(SPECTRA))
def test_gram_route_within_float64_rounding_of_the_squares(shape, decay):
    w = with_spectrum(*shape, SPECTRA[decay](min(shape)), seed=2)
    values, scale = singular_values(w, route="gram")
    got = values.double().numpy() * scale
    reference = exact(w)
    k, top = min(shape), reference[0]
    # |Δλ| ≤ k·ε₆₄·σ_max² for the float64 Gram matrix and its eigenvalues, so |Δσ| ≤ that / σ, and
    # ≤ √(k·ε₆₄)·σ_max however small σ is: far inside the 1e-6·σ_max asked of every route.
    assert np.abs(got - reference).max() <= (k * EPS64) ** 0.5 * top <= 1e-6 * top
    large = reference >= 1e-3 * top
    np.testing.assert_array_less(np.abs(got - reference)[large], k * EPS64 * top**2 / reference[large] + 1e-300)


def test_gram_route_keeps_values_near_the_dtype_maximum_finite():
    w = with_spectrum(300, 280, SPECTRA["i^-0.5"](280), seed=3) * 1e36
    values, scale = singular_values(w, route="gram")
    reference = exact(w)
    assert scale > 1e30 and torch.isfinite(values).all()
    np.testing.assert_allclose(values.double().numpy() * scale, reference, rtol=0, atol=1e-6 * reference[0])


@pytest.mark.parametrize("rank", [1, 37, 150])
@pytest.mark.parametrize("shape", [(400, 300), (300, 400)])
def test_both_routes_count_the_same_numerical_rank_on_rank_deficient_input(rank, shape):
    rng = np.random.default_rng(rank)
    w = torch.from_numpy(rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))).float()
    for name in ("svdvals", "gram"):  # the product of an m×r and an r×n Gaussian has rank r exactly
        values, scale = singular_values(w, route=name)
        assert Spectrum.of(values, shape, w.dtype, scale).numerical_rank() == rank, name


def test_routes_agree_on_the_numerical_rank_of_a_decaying_spectrum_with_a_gap():
    # σ down to 1e-2 of σ_max, then a gap to 1e-6, below the line max(m, n)·ε₃₂ ≈ 4.8e-5
    sigma = np.concatenate([np.geomspace(1, 1e-2, 60), np.full(40, 1e-6)])
    w = with_spectrum(400, 300, sigma, seed=4)
    ranks = {}
    for name in ("svdvals", "gram"):
        values, scale = singular_values(w, route=name)
        ranks[name] = Spectrum.of(values, (400, 300), w.dtype, scale).numerical_rank()
    assert ranks == {"svdvals": 60, "gram": 60}


@pytest.mark.parametrize(
    ("vendor", "expected"),
    [("AuthenticAMD", "gram"), ("GenuineIntel", "svdvals"), ("", "svdvals"), ("HygonGenuine", "svdvals")],
)
def test_gram_only_on_the_cpus_where_it_was_measured_faster(vendor, expected):
    # an Intel Xeon with AMX measured svdvals faster; a CPU never measured keeps torch's own svdvals
    big = torch.zeros(1536, 1024)
    assert spectrum_route(big, vendor=vendor) == expected
    assert spectrum_route(big.T, vendor=vendor) == expected


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel", ""])
def test_svdvals_wherever_the_gram_floor_would_show_or_gram_gains_nothing(vendor):
    big = torch.zeros(1536, 1024)
    assert spectrum_route(big.double(), vendor=vendor) == "svdvals"  # numerical-rank line n·ε₆₄ is below Gram's floor
    assert spectrum_route(torch.zeros(1023, 4096), vendor=vendor) == "svdvals"  # no gain that held in every run
    assert spectrum_route(big, rtol=1e-9, vendor=vendor) == "svdvals"
    assert spectrum_route(big, rtol=1e-3, vendor=vendor) == spectrum_route(big, vendor=vendor)


def test_a_small_matrix_takes_one_thread_a_large_one_torchs_count():
    assert spectrum_threads(torch.zeros(384, 384)) == 1
    assert spectrum_threads(torch.zeros(30522, 384)) == 1  # the short side decides
    assert spectrum_threads(torch.zeros(1023, 4096)) == 1
    assert spectrum_threads(torch.zeros(1024, 1536)) is None
    assert spectrum_threads(torch.zeros(4096, 1024)) is None


@pytest.mark.parametrize("fails", [False, True])
def test_the_one_thread_holds_for_the_call_only(monkeypatch, fails):
    seen = []

    def svdvals(w):
        seen.append(torch.get_num_threads())
        if fails:
            raise RuntimeError("LAPACK failed")
        return torch.ones(min(w.shape))

    monkeypatch.setattr(torch.linalg, "svdvals", svdvals)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            singular_values(torch.ones(30, 20), route="svdvals")
        assert seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_analyze_writes_nothing_outside_its_outputs(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    source = save(tmp_path / "w.safetensors", {"w": with_spectrum(1100, 1024, SPECTRA["i^-0.5"](1024), seed=6)})
    lowrank_cli.analyze(source)
    assert list(home.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "w.safetensors"]


def test_gram_values_of_a_wide_matrix_are_those_of_its_transpose():
    w = with_spectrum(120, 500, SPECTRA["i^-0.5"](120), seed=5)
    np.testing.assert_allclose(gram_singular_values(w).numpy(), exact(w), rtol=0, atol=1e-9)


# --- power iterations that stop once converged --------------------------------------------------


def _sketch(w: torch.Tensor, k: int) -> torch.Tensor:
    return torch.randn(w.shape[1], k, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def spectra_1024() -> dict[str, torch.Tensor]:
    return {name: with_spectrum(1024, 1024, decay(1024), seed=8) for name, decay in SPECTRA.items()}


def _kept_error_squared(w: torch.Tensor, z: torch.Tensor, rank: int) -> float:
    """‖W‖² − Σ_{i≤rank} σ_i(W·Z)², in numpy's float64: the squared error of the rank-`rank` truncation of W·Z·Zᵀ."""
    w64, z64 = w.double().numpy(), z.double().numpy()
    s = np.linalg.svd(w64 @ z64, compute_uv=False)  # (m, n) @ (n, k) -> (m, k)
    return float((w64**2).sum() - (s[:rank] ** 2).sum())


@pytest.mark.parametrize("decay", sorted(SPECTRA))
def test_power_iterations_stop_early_at_no_cost_in_error(spectra_1024, decay):
    w, rank = spectra_1024[decay], 64
    _, z, passes = power_range(w, _sketch(w, rank + 16), rank, power_iters=5, tolerance=POWER_TOLERANCE)
    _, z_all, _ = power_range(w, _sketch(w, rank + 16), rank, power_iters=5)
    # what the stop promises: every iteration it skipped would have lowered the squared error by less
    # than the tolerance; and where the spectrum decays fast or not at all, it does skip some. The
    # iterations run in float32, so below about ε₃₂·‖W‖² (where i^-2's rank-64 error lies, ~1e-6 of
    # ‖W‖²) the error is rounding whose last bits differ by CPU: that much is allowed on top.
    floor = 2 * torch.finfo(torch.float32).eps * float(w.double().square().sum())
    assert _kept_error_squared(w, z, rank) <= (1 + POWER_TOLERANCE) * _kept_error_squared(w, z_all, rank) + floor
    assert passes < 5 or decay == "i^-0.5"


def test_slow_decay_takes_more_power_iterations_than_fast(spectra_1024):
    passes = {}
    for decay in ("i^-0.5", "i^-2"):
        w = spectra_1024[decay]
        _, _, passes[decay] = power_range(w, _sketch(w, 80), 64, power_iters=5, tolerance=POWER_TOLERANCE)
    assert passes["i^-0.5"] > passes["i^-2"]


def test_without_a_tolerance_the_count_is_fixed(spectra_1024):
    w = spectra_1024["flat"]
    assert power_range(w, _sketch(w, 80), 64, power_iters=3)[2] == 3


@pytest.mark.parametrize("decay", sorted(SPECTRA))
@pytest.mark.parametrize("rank", [8, 64])
def test_adaptive_stop_keeps_the_error_within_the_target(spectra_1024, decay, rank):
    w = spectra_1024[decay]
    u, s, vh = randomized_svd(
        w, rank, oversample=16, power_iters=5, generator=torch.Generator().manual_seed(9), tolerance=POWER_TOLERANCE
    )
    w64 = w.double()
    error = float(torch.linalg.norm(w64 - (u.double() * s.double()) @ vh.double()) / torch.linalg.norm(w64))
    optimal = tail_errors(exact(w))[rank]
    assert error <= (1 + POWER_TOLERANCE) ** 0.5 * optimal + 1e-6  # 1.01× the optimal error
    # the factors are those of W·Z·Zᵀ with Z orthonormal: error² = ‖W‖² − Σ s², which the stop rule watched
    kept = float((s.double() ** 2).sum() / (w64**2).sum())
    assert error**2 == pytest.approx(1 - kept, rel=1e-3, abs=1e-6)


# --- reading a matrix --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_read_matrix_is_the_tensor_reshaped_and_converted(tmp_path, dtype):
    tensors = {
        "conv": torch.randn(6, 3, 2, 2).to(dtype),
        "plain": torch.randn(5, 7).to(dtype),
        "empty": torch.zeros(3, 0).to(dtype),
    }
    path = save(tmp_path / "m.safetensors", tensors)
    with open_checkpoint(path) as checkpoint:
        for name, tensor in tensors.items():
            compute = torch.float64 if dtype == torch.float64 else torch.float32
            matrix = checkpoint.read_matrix(name, compute)
            assert matrix.dtype == compute and matrix.shape == (tensor.shape[0], int(np.prod(tensor.shape[1:])))
            assert torch.equal(matrix, tensor.to(compute).reshape(matrix.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1, 517, -1])
def test_finite_finds_one_bad_entry_anywhere(dtype, bad, where):
    w = torch.randn(37, 29).to(dtype)  # odd sizes: the vectorized loops' tails count too
    assert finite(w)
    w.view(-1)[where] = bad
    assert not finite(w)
