"""Numerical edge cases through the CLI, each checked against numpy.

Zero, 1×n and n×1 matrices, exactly rank-deficient ones, entries from 1e-30 to 1e30 (and to the
ends of float64), subnormals, the float64 machine epsilon, float16 factors that need the √S split
and factors that overflow even so, float8 inputs, entries near a dtype's maximum. Every error
lowrank reports is recomputed here from the factors as stored (rel 1e-6 or abs 1e-12).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import (
    as_matrix,
    by_name,
    cli,
    cli_json,
    file_metadata,
    listing,
    load,
    low_rank,
    raw_tensors,
    save,
    sha256,
    tail_errors,
    with_spectrum,
)

from lowrank_cli.linalg.spectrum import singular_values, svd

FLOAT16_MAX = 65504.0
HALF_ULP = 2.0**-11  # float16 rounding, relative


def _svd64(w: np.ndarray) -> np.ndarray:
    """Singular values in float64 of a float64 matrix of any scale (scaled to max |w| = 1 first)."""
    peak = np.abs(w).max()
    return np.linalg.svd(w / peak, compute_uv=False) * peak if peak else np.zeros(min(w.shape))


def _rel_norm(diff: np.ndarray, ref: np.ndarray) -> float:
    """‖diff‖_F / ‖ref‖_F without overflow or underflow: both scaled by max |ref|."""
    peak = np.abs(ref).max()
    return float(np.linalg.norm(diff / peak) / np.linalg.norm(ref / peak))


def _stored_error(w: torch.Tensor, out, name: str) -> float:
    """‖W − B·A‖_F / ‖W‖_F from the factors as they are in the file, in float64."""
    stored = load(out)
    b, a = stored[f"{name}.B"].double().numpy(), stored[f"{name}.A"].double().numpy()
    peak = float(w.double().abs().max())
    approx = (b / peak) @ a  # (m, r) @ (r, n) -> (m, n), scaled so that 1e300 entries do not overflow
    w64 = as_matrix(w) / peak
    return float(np.linalg.norm(w64 - approx) / np.linalg.norm(w64))


def _assert_same_error(reported: float, recomputed: float) -> None:
    assert math.isclose(reported, recomputed, rel_tol=1e-6, abs_tol=1e-12), (reported, recomputed)


def _compress(source, out, *options) -> dict:
    return by_name(cli_json("compress", source, *options, "-o", out))


def _expand(compressed, out) -> dict[str, torch.Tensor]:
    result = cli("expand", compressed, "-o", out)
    assert result.exit_code == 0, result.stderr
    return load(out)


# --- zero, 1×n, n×1 ----------------------------------------------------------------------------------

ZEROS = {
    "f32": torch.zeros(16, 12),
    "f64": torch.zeros(9, 7, dtype=torch.float64),
    "bf16": torch.zeros(12, 16, dtype=torch.bfloat16),
    "f16 conv": torch.zeros(8, 4, 3, 3, dtype=torch.float16),
    "negative zeros": -torch.zeros(10, 10),
}


@pytest.mark.parametrize("policy", [["--rank", "2"], ["--energy", "0.9"], ["--max-error", "0.1"]], ids=" ".join)
def test_zero_matrices_are_rank_zero_and_kept_dense(tmp_path, policy):
    source = save(tmp_path / "z.safetensors", ZEROS)
    analyzed = by_name(cli_json("analyze", source))
    out = tmp_path / "out.safetensors"
    compressed = _compress(source, out, *policy)
    for name, w in ZEROS.items():
        assert analyzed[name]["numerical_rank"] == 0
        assert analyzed[name]["stable_rank"] == 0.0
        t = compressed[name]
        assert (t["status"], t["rank"], t["rel_error"]) == ("dense", 0, 0.0), t
        assert t["params_after"] == w.numel()
    assert raw_tensors(out) == raw_tensors(source)  # every byte kept, -0.0 included
    _expand(out, tmp_path / "dense.safetensors")
    assert raw_tensors(tmp_path / "dense.safetensors") == raw_tensors(source)


@pytest.mark.parametrize("shape", [(1, 40), (40, 1), (1, 1), (1, 6, 3, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_single_row_or_column(tmp_path, shape, dtype):
    w = torch.from_numpy(np.random.default_rng(7).standard_normal(shape)).to(dtype)
    source = save(tmp_path / "v.safetensors", {"v": w})
    t = by_name(cli_json("analyze", source, "--rank", 1))["v"]
    m = as_matrix(w)
    assert t["numerical_rank"] == np.linalg.matrix_rank(m) == 1
    assert t["stable_rank"] == pytest.approx(1.0, rel=1e-12)  # ‖W‖_F² = σ_1² for one row or column
    assert (t["rank_90"], t["rank_99"], t["rank_999"]) == (1, 1, 1)
    assert t["rel_error"] == 0.0

    out = tmp_path / "out.safetensors"
    c = _compress(source, out, "--rank", 1)["v"]
    rows, cols = m.shape
    assert 1 * (rows + cols) >= rows * cols  # factors of rank 1 hold more numbers than W
    assert (c["status"], c["params_after"]) == ("dense", w.numel())
    assert raw_tensors(out)["v"] == raw_tensors(source)["v"]


# --- exactly rank-deficient -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exactly_rank_deficient(tmp_path, dtype):
    k = 5
    w = low_rank(48, 32, k, seed=11, dtype=dtype)
    source = save(tmp_path / "w.safetensors", {"W": w})
    assert by_name(cli_json("analyze", source))["W"]["numerical_rank"] == k

    tiny = 1e-5 if dtype == torch.float32 else 1e-12
    for policy in (["--rank", str(k)], ["--energy", "1.0"], ["--max-error", "1e-5"]):
        out = tmp_path / "out.safetensors"
        t = _compress(source, out, *policy, "--method", "exact")["W"]
        assert (t["status"], t["rank"]) == ("factorized", k), (policy, t)
        error = _stored_error(w, out, "W")
        _assert_same_error(t["rel_error"], error)
        assert error < tiny
        dense = _expand(out, tmp_path / "dense.safetensors")["W"]
        assert _rel_norm(as_matrix(dense) - as_matrix(w), as_matrix(w)) <= error + tiny
        out.unlink()
        (tmp_path / "dense.safetensors").unlink()


# --- scales: 1e-30 … 1e30, the ends of float64, subnormals --------------------------------------------


def _two_scales(m: int, n: int, low: float, high: float) -> np.ndarray:
    """Rank 2, entries from 10^low to 10^high: x·yᵀ (x, y geometric) plus ½·10^high at (1, 0)."""
    x = np.logspace(low / 2, high / 2, m)
    y = np.logspace(low / 2, high / 2, n)
    w = np.outer(x, y)
    w[1, 0] += 0.5 * 10.0**high  # a second direction, nearly orthogonal to x·yᵀ: σ_2 ≈ σ_1 / 2
    return w


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [(torch.float32, -30, 30), (torch.float64, -30, 30), (torch.float64, -300, 300)],
    ids=["f32 1e±30", "f64 1e±30", "f64 1e±300"],
)
def test_entries_spanning_many_orders_of_magnitude(tmp_path, dtype, low, high):
    w = torch.from_numpy(_two_scales(24, 20, low, high)).to(dtype)
    w64 = as_matrix(w)
    assert 0.5 < np.abs(w64).min() / 10.0**low < 2 and 0.5 < np.abs(w64).max() / 10.0**high < 2
    s = _svd64(w64)
    optimal = tail_errors(s / s[0])[1]  # best rank-1 error (Eckart–Young), from numpy in float64
    source = save(tmp_path / "w.safetensors", {"W": w})

    t = by_name(cli_json("analyze", source, "--rank", 1))["W"]
    eps = float(torch.finfo(dtype).eps)
    assert t["numerical_rank"] == int(np.count_nonzero(s > s[0] * max(w.shape) * eps)) == 2
    # lowrank's spectrum of a float32 matrix is computed in float32: agreement to its precision
    tolerance = 1e-6 if dtype == torch.float64 else 1e-5
    assert t["stable_rank"] == pytest.approx(float(np.sum((s / s[0]) ** 2)), rel=tolerance)
    assert t["rel_error"] == pytest.approx(optimal, rel=tolerance)

    out = tmp_path / "out.safetensors"
    c = _compress(source, out, "--rank", 1)["W"]
    stored = load(out)
    assert all(bool(torch.isfinite(v).all()) for v in stored.values())
    error = _stored_error(w, out, "W")
    _assert_same_error(c["rel_error"], error)
    assert error == pytest.approx(optimal, rel=1e-4)  # as good as the best rank-1 approximation
    dense = _expand(out, tmp_path / "dense.safetensors")["W"]
    assert _rel_norm(as_matrix(dense) - w64, w64) <= error + 1e-5


def test_subnormal_float32(tmp_path):
    """W = (A·B)·2⁻¹⁴⁰ with small integers: every entry subnormal in float32, and exactly rank 2."""
    rng = np.random.default_rng(5)
    exact = (rng.integers(1, 16, (20, 2)) @ rng.integers(1, 16, (2, 16))).astype(np.float64) * 2.0**-140
    w = torch.from_numpy(exact).float()
    assert bool((w.abs() < torch.finfo(torch.float32).tiny).all()) and bool((w != 0).all())
    assert np.array_equal(w.double().numpy(), exact)  # stored exactly
    s = _svd64(exact)
    source = save(tmp_path / "w.safetensors", {"W": w})

    t = by_name(cli_json("analyze", source, "--rank", 1))["W"]
    assert t["numerical_rank"] == 2
    assert t["stable_rank"] == pytest.approx(float(np.sum((s / s[0]) ** 2)), rel=1e-5)
    assert t["rel_error"] == pytest.approx(tail_errors(s)[1], rel=1e-5)

    for rank in (1, 2):
        out = tmp_path / f"r{rank}.safetensors"
        c = _compress(source, out, "--rank", rank)["W"]
        assert c["status"] == "factorized"
        error = _stored_error(w, out, "W")
        _assert_same_error(c["rel_error"], error)
        # near the best rank-r error, though the factors' own entries are subnormal too
        assert error == pytest.approx(tail_errors(s)[rank], abs=1e-4)
        dense = _expand(out, tmp_path / f"d{rank}.safetensors")["W"]
        assert _rel_norm(as_matrix(dense) - exact, exact) <= error + 1e-4


def test_float64_numerical_rank_uses_float64_epsilon(tmp_path):
    """σ = 1, 1e-4, 1e-9, 1e-12: float64 sees rank 4; the same matrix in float32 sees rank 2."""
    w64 = with_spectrum(40, 30, [1.0, 1e-4, 1e-9, 1e-12], seed=2, dtype=torch.float64)
    w32 = w64.float()
    source = save(tmp_path / "w.safetensors", {"w64": w64, "w32": w32})
    report = by_name(cli_json("analyze", source, "--rank", 3))
    assert report["w64"]["numerical_rank"] == 4
    assert report["w32"]["numerical_rank"] == 2
    # the Eckart–Young error at rank 3, float64 throughout
    assert report["w64"]["rel_error"] == pytest.approx(tail_errors(_svd64(w64.numpy()))[3], rel=1e-6)


# --- float16 factors: the √S split, and overflow even when split ------------------------------------


def _outer(scale: float, size: int = 64, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return scale * np.outer(rng.uniform(0.5, 1.0, size), rng.uniform(0.5, 1.0, size))


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16], ids=str)
def test_float16_factors_split_when_u_times_s_overflows(tmp_path, input_dtype):
    w = torch.from_numpy(_outer(3e4)).to(input_dtype)  # entries ≤ 3e4 fit in float16
    u, s, vh = np.linalg.svd(as_matrix(w))
    assert float(w.abs().max()) < FLOAT16_MAX
    assert s[0] * np.abs(u[:, 0]).max() > FLOAT16_MAX  # B = U·S would overflow float16 …
    assert np.sqrt(s[0]) * max(np.abs(u[:, 0]).max(), np.abs(vh[0]).max()) < FLOAT16_MAX  # … U·√S does not
    control = torch.from_numpy(_outer(10.0, seed=4)).to(input_dtype)
    source = save(tmp_path / "w.safetensors", {"W": w, "control": control})
    digest = sha256(source)

    out = tmp_path / "out.safetensors"
    report = _compress(source, out, "--rank", 1, "--dtype", "float16")
    stored = load(out)
    for name in ("W", "control"):
        assert stored[f"{name}.B"].dtype == stored[f"{name}.A"].dtype == torch.float16
        assert bool(torch.isfinite(stored[f"{name}.B"]).all()) and bool(torch.isfinite(stored[f"{name}.A"]).all())
    records = json.loads(file_metadata(out)["lowrank"])["tensors"]
    assert records["W"]["split"] == "sqrt"
    assert records["control"]["split"] == "us"  # σ ≈ 4e2: U·S fits, the plain split is kept

    error = _stored_error(w, out, "W")
    _assert_same_error(report["W"]["rel_error"], error)
    assert error < 4 * HALF_ULP  # a rank-1 W: only float16 rounding of the factors
    assert records["W"]["rel_error"] == report["W"]["rel_error"]

    dense = _expand(out, tmp_path / "dense.safetensors")["W"]
    assert dense.dtype == input_dtype and bool(torch.isfinite(dense).all())
    output_rounding = HALF_ULP if input_dtype == torch.float16 else 1e-7
    assert _rel_norm(as_matrix(dense) - as_matrix(w), as_matrix(w)) <= error + output_rounding * (1 + error)
    assert sha256(source) == digest


def test_float16_factors_that_overflow_even_split_are_refused(tmp_path):
    w = torch.from_numpy(_outer(1e10)).float()
    u, s, vh = np.linalg.svd(as_matrix(w))
    assert np.sqrt(s[0]) * np.abs(u[:, 0]).max() > FLOAT16_MAX  # U·√S overflows float16 too
    source = save(tmp_path / "w.safetensors", {"fine": low_rank(12, 10, 2), "huge.weight": w})
    before, digest = listing(tmp_path), sha256(source)
    out = tmp_path / "out.safetensors"

    result = cli("compress", source, "--rank", 1, "--dtype", "float16", "-o", out)
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in result.output
    assert "'huge.weight'" in message and "--dtype bfloat16" in message and "float32" in message
    assert listing(tmp_path) == before and sha256(source) == digest

    # the advice works: bfloat16 holds the same factors
    t = _compress(source, out, "--rank", 1, "--dtype", "bfloat16")["huge.weight"]
    assert bool(torch.isfinite(load(out)["huge.weight.B"]).all())
    _assert_same_error(t["rel_error"], _stored_error(w, out, "huge.weight"))


# --- float8 inputs and entries near a dtype's maximum -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_float8_matrix_with_factors_kept_in_float8(tmp_path, dtype):
    w = (low_rank(32, 24, 2, seed=8) / 4).to(dtype)  # entries within float8's range
    assert bool(torch.isfinite(w.float()).all())
    source = save(tmp_path / "w.safetensors", {"W": w})
    out = tmp_path / "out.safetensors"
    result = cli("compress", source, "--rank", 2, "-o", out, "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    t = by_name(json.loads(result.stdout))["W"]
    stored = load(out)
    assert stored["W.B"].dtype == dtype
    assert bool(torch.isfinite(stored["W.B"].float()).all()) and bool(torch.isfinite(stored["W.A"].float()).all())
    _assert_same_error(t["rel_error"], _stored_error(w, out, "W"))


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(torch.float32, 1e38), (torch.bfloat16, 1e38), (torch.float64, 1.5e307)],
    ids=["f32", "bf16", "f64"],
)
def test_entries_near_the_dtype_maximum(tmp_path, dtype, scale):
    """Every entry finite, but ‖W‖ and σ_1 exceed the dtype: spectrum and factors must not overflow."""
    rng = np.random.default_rng(9)
    signs = np.outer(rng.choice([-1.0, 1.0], 16), rng.choice([-1.0, 1.0], 12))  # rank 1, |entries| = 1
    w = torch.from_numpy(scale * signs).to(dtype)
    assert bool(torch.isfinite(w).all())
    peak = float(w.double().abs().max())
    sigma_over_peak = np.linalg.svd(as_matrix(w) / peak, compute_uv=False)[0]
    compute_max = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
    assert sigma_over_peak > compute_max / peak  # σ_1 itself overflows the dtype the SVD runs in
    source = save(tmp_path / "w.safetensors", {"W": w})

    result = cli("analyze", source, "--rank", 1, "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    t = by_name(json.loads(result.stdout))["W"]
    assert t["numerical_rank"] == 1
    assert t["stable_rank"] == pytest.approx(1.0, rel=1e-6)

    out = tmp_path / "out.safetensors"
    result = cli("compress", source, "--rank", 1, "-o", out, "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    c = by_name(json.loads(result.stdout))["W"]
    stored = load(out)
    assert bool(torch.isfinite(stored["W.B"]).all()) and bool(torch.isfinite(stored["W.A"]).all())
    error = _stored_error(w, out, "W")
    _assert_same_error(c["rel_error"], error)
    assert error < 1e-2


# --- wide matrices go through LAPACK's tall path ----------------------------------------------------


@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (40, 40), (1, 9), (9, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svd_of_wide_and_tall_matrices_is_numpys(shape, dtype):
    """svd() works on Wᵀ when W is wide; its U, S, Vh must still be W's own: orthonormal, W = U·S·Vh."""
    w = torch.from_numpy(np.random.default_rng(sum(shape)).standard_normal(shape)).to(dtype)
    u, s, vh = svd(w)
    k = min(shape)
    assert tuple(u.shape) == (shape[0], k) and tuple(s.shape) == (k,) and tuple(vh.shape) == (k, shape[1])
    w64 = w.to(torch.float64).numpy()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(s.to(torch.float64).numpy(), np.linalg.svd(w64, compute_uv=False), rtol=tol, atol=tol)
    u64, vh64 = u.to(torch.float64).numpy(), vh.to(torch.float64).numpy()
    np.testing.assert_allclose(u64.T @ u64, np.eye(k), atol=tol)
    np.testing.assert_allclose(vh64 @ vh64.T, np.eye(k), atol=tol)
    np.testing.assert_allclose((u64 * s.to(torch.float64).numpy()) @ vh64, w64, atol=10 * tol)  # (m, k) @ (k, n)
    values, scale = singular_values(w)
    np.testing.assert_allclose(values.to(torch.float64).numpy() * scale, np.linalg.svd(w64, compute_uv=False), rtol=tol)
