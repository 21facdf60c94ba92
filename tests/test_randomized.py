"""`--method randomized`: near-optimal errors, bounds always kept, ranks near optimal, reproducible.

Every optimum here is numpy's SVD of the very matrix lowrank reads (float32 values, in float64).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_clean_failure,
    by_name,
    cli,
    cli_json,
    geometric,
    listing,
    load,
    low_rank,
    raw_tensors,
    relative_error,
    save,
    sha256,
    singular_values,
    tail_errors,
    temp_files,
    with_spectrum,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_cli.linalg.factorize import _sketch_dtype, exact_is_cheap, truncated_svd
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.randomized import adaptive_range, fast_bfloat16, orthonormal, randomized_svd, sum_of_squares

M, N = 300, 200
BREAK_EVEN = (M * N - 1) // (M + N)  # 119: the largest r with r·(m + n) < m·n
seeds = st.integers(0, 2**31 - 1)
# The autouse sketch fixture patches a constant, so hypothesis examples sharing it is harmless.
shared_sketch = [HealthCheck.function_scoped_fixture]


@pytest.fixture(autouse=True, params=["bfloat16-sketch", "float32-sketch"])
def sketch(request, monkeypatch):
    """Every test here runs both ways: with the bfloat16 sketch that AMX CPUs get, and without it."""
    bfloat16 = request.param == "bfloat16-sketch"
    monkeypatch.setattr("lowrank_cli.linalg.factorize.fast_bfloat16", lambda device_type: bfloat16)
    return torch.bfloat16 if bfloat16 else None


def harmonic(m: int, n: int, seed: int, noise: float = 1e-3) -> torch.Tensor:
    """σ_i = 1/i, i = 1…min(m, n), plus Gaussian noise: a slowly decaying, full-rank spectrum."""
    rng = np.random.default_rng(seed + 1000)
    w = with_spectrum(m, n, 1.0 / np.arange(1, min(m, n) + 1), seed=seed, dtype=torch.float64)
    w = w + noise * torch.from_numpy(rng.standard_normal((m, n))) / math.sqrt(max(m, n))
    return w.to(torch.float32)


@pytest.fixture(scope="module")
def decaying():
    """A 300×200 float32 matrix with σ_i ≈ 1/i and its optimal errors: tail[r] = ‖W − W_r‖/‖W‖."""
    w = harmonic(M, N, seed=0)
    return w, tail_errors(singular_values(w))


@pytest.fixture(scope="module")
def decaying_file(decaying, tmp_path_factory):
    w, tail = decaying
    return save(tmp_path_factory.mktemp("decaying") / "w.safetensors", {"W": w}), w, tail


def _factors(path: Path, name: str = "W") -> tuple[torch.Tensor, torch.Tensor]:
    factors = load(path)
    return factors[f"{name}.B"], factors[f"{name}.A"]


def _optimal_rank(tail: np.ndarray, max_error: float) -> int:
    return next(r for r in range(len(tail)) if tail[r] <= max_error)


def _error_between(tail: np.ndarray, rank: int, where: float) -> float:
    """An error target strictly between the optimal errors at rank and rank − 1: the optimal rank is `rank`."""
    return float(tail[rank] + where * (tail[rank - 1] - tail[rank]))


# --- fixed rank ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 5, 20, 50, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_fixed_rank_is_within_one_percent_of_eckart_young(decaying, rank, seed):
    w, tail = decaying
    result = truncated_svd(w, RankPolicy(rank=rank), method="randomized", generator=torch.Generator().manual_seed(seed))
    assert result.method == "randomized"
    assert result.rank == rank
    assert (
        tuple(result.u.shape) == (M, rank) and tuple(result.s.shape) == (rank,) and tuple(result.vh.shape) == (rank, N)
    )
    b, a, _ = result.factors()
    error = relative_error(w, b, a)
    assert tail[rank] - 1e-7 <= error <= 1.01 * tail[rank]


@pytest.mark.parametrize("rank", [16, 64, 150])
def test_fixed_rank_stays_near_optimal_up_to_a_quarter_of_a_flat_spectrum(rank):
    """σ_i ∝ i^-0.5 plus noise, the hard case for a range finder, up to rank min(m, n)/4 where auto still
    randomizes: within 0.5 % of optimal (3 power iterations instead of 5 give 0.85 % at rank 150)."""
    m, n = 800, 600
    rng = np.random.default_rng(rank)
    w = with_spectrum(m, n, np.arange(1, n + 1) ** -0.5, seed=3, dtype=torch.float64)
    w = (w + 0.02 * torch.from_numpy(rng.standard_normal((m, n))) / math.sqrt(m)).to(torch.float32)
    tail = tail_errors(singular_values(w))
    for seed in (0, 1):
        result = truncated_svd(
            w, RankPolicy(rank=rank), method="randomized", generator=torch.Generator().manual_seed(seed)
        )
        b, a, _ = result.factors()
        assert relative_error(w, b, a) <= 1.005 * tail[rank]


@pytest.mark.parametrize("rank", [3, 40])
def test_cli_fixed_rank_is_within_one_percent_of_eckart_young(decaying_file, tmp_path, rank):
    source, w, tail = decaying_file
    out = tmp_path / "out.safetensors"
    t = by_name(cli_json("compress", source, "--method", "randomized", "--rank", rank, "-o", out))["W"]
    b, a = _factors(out)
    assert tuple(b.shape) == (M, rank) and tuple(a.shape) == (rank, N)
    assert t["rank"] == rank and t["status"] == "factorized" and t["method"] == "randomized"
    assert t["params_after"] == rank * (M + N)
    error = relative_error(w, b, a)
    assert error <= 1.01 * tail[rank]
    assert t["rel_error"] == pytest.approx(error, rel=1e-6)


# --- --max-error and --energy: the bound always holds, the rank stays near optimal -----------------


@settings(max_examples=12, deadline=None, suppress_health_check=shared_sketch)
@given(optimal=st.integers(1, 80), where=st.floats(0.05, 0.95), seed=seeds, energy=st.booleans())
def test_randomized_targets_are_always_met_near_the_optimal_rank(decaying_file, optimal, where, seed, energy):
    """The measured error of the written factors meets the bound; the rank is ≤ 1.10 × numpy's optimal rank."""
    source, w, tail = decaying_file
    max_error = _error_between(tail, optimal, where)
    assert _optimal_rank(tail, max_error) == optimal
    policy = ["--energy", repr(1.0 - max_error**2)] if energy else ["--max-error", repr(max_error)]
    if energy:  # the same target said as kept energy: Σ_{i≤r} σ² ≥ F·Σσ²
        s2 = singular_values(w) ** 2
        fraction = 1.0 - max_error**2
        assert next(r for r in range(1, len(s2) + 1) if s2[:r].sum() >= fraction * s2.sum()) == optimal
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out.safetensors"
        t = by_name(cli_json("compress", source, "--method", "randomized", "--seed", seed, *policy, "-o", out))["W"]
        assert t["status"] == "factorized", t
        b, a = _factors(out)
    rank = b.shape[1]
    assert t["rank"] == rank == a.shape[0]
    measured = relative_error(w, b, a)
    assert measured <= max_error
    assert optimal <= rank <= 1.10 * optimal
    assert t["rel_error"] == pytest.approx(measured, rel=1e-6)


@pytest.mark.parametrize("optimal", [40, 75, 96, 104])
def test_randomized_factorizes_whenever_a_near_optimal_rank_saves_params(decaying_file, tmp_path, optimal):
    """Optimal ranks up to break-even/1.1 (119/1.1 ≈ 108 for 300×200): a rank within 10 % of optimal pays off,
    so --method randomized must factorize, as --method exact does, not declare the target above break-even."""
    source, w, tail = decaying_file
    assert 1.10 * optimal <= BREAK_EVEN
    max_error = _error_between(tail, optimal, 0.5)
    exact = by_name(cli_json("compress", source, "--method", "exact", "--max-error", max_error, "-o", tmp_path / "e"))
    assert exact["W"]["status"] == "factorized" and exact["W"]["rank"] == optimal

    out = tmp_path / "out.safetensors"
    t = by_name(cli_json("compress", source, "--method", "randomized", "--max-error", max_error, "-o", out))["W"]
    assert t["status"] == "factorized", t["reason"]
    b, a = _factors(out)
    assert optimal <= b.shape[1] <= 1.10 * optimal
    assert relative_error(w, b, a) <= max_error


# --- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [["--rank", "12"], ["--max-error", "0.12"], ["--energy", "0.985"]], ids=" ".join)
def test_same_seed_same_file_other_seed_other_factors(decaying_file, tmp_path, policy):
    source, w, tail = decaying_file
    files = {}
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        files[name] = tmp_path / f"{name}.safetensors"
        cli_json("compress", source, "--method", "randomized", "--seed", seed, *policy, "-o", files[name])
    assert sha256(files["a"]) == sha256(files["b"])  # bit for bit, header and metadata included
    assert raw_tensors(files["a"])["W.B"] != raw_tensors(files["c"])["W.B"]

    flag, value = policy[0], float(policy[1])
    bound = 1.02 * tail[12] if flag == "--rank" else value if flag == "--max-error" else math.sqrt(1 - value)
    for path in files.values():
        b, a = _factors(path)
        assert relative_error(w, b, a) <= bound


def test_seed_gives_the_same_factors_through_truncated_svd(decaying):
    w, _ = decaying
    runs = [
        truncated_svd(w, RankPolicy(max_error=0.1), method="randomized", generator=torch.Generator().manual_seed(seed))
        for seed in (3, 3, 4)
    ]
    assert torch.equal(runs[0].u, runs[1].u) and torch.equal(runs[0].s, runs[1].s)
    assert torch.equal(runs[0].vh, runs[1].vh)
    assert not torch.equal(runs[0].u, runs[2].u)


# --- exact low rank -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 45])
@pytest.mark.parametrize("policy", [["--max-error", "0.01"], ["--energy", "0.9999"]], ids=" ".join)
def test_exact_and_randomized_agree_on_an_exact_low_rank(tmp_path, k, policy):
    w = low_rank(M, N, k, seed=k)
    tail = tail_errors(singular_values(w))
    assert tail[k - 1] > 0.01 and tail[k] < 1e-5  # rank k − 1 misses both targets, rank k meets them
    source = save(tmp_path / "w.safetensors", {"W": w})
    ranks = {}
    for method in ("exact", "randomized"):
        out = tmp_path / f"{method}.safetensors"
        t = by_name(cli_json("compress", source, "--method", method, *policy, "-o", out))["W"]
        b, a = _factors(out)
        ranks[method] = b.shape[1]
        assert t["rank"] == b.shape[1]
        assert relative_error(w, b, a) < 1e-5
    assert ranks == {"exact": k, "randomized": k}


# --- the report -----------------------------------------------------------------------------------


@pytest.fixture
def mixed_file(tmp_path):
    tensors = {
        # m·n·min(m, n) = 4e8, past what an exact SVD may cost under auto: it randomizes rank 5
        "big.weight": with_spectrum(1100, 600, geometric(600, 0.9), seed=21),
        "small.weight": with_spectrum(40, 30, geometric(30, 0.7), seed=22),
        "small.bias": torch.randn(40),
    }
    return save(tmp_path / "mixed.safetensors", tensors), tensors


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("randomized", {"big.weight": "randomized", "small.weight": "randomized"}),
        ("exact", {"big.weight": "exact", "small.weight": "exact"}),
        ("auto", {"big.weight": "randomized", "small.weight": "exact"}),
    ],
)
def test_json_reports_the_method_of_each_tensor(mixed_file, tmp_path, method, expected):
    source, tensors = mixed_file
    out = tmp_path / "out.safetensors"
    report = cli_json("compress", source, "--method", method, "--rank", 5, "-o", out)
    rows = by_name(report)
    assert report["options"]["method"] == method
    for name, used in expected.items():
        assert rows[name]["method"] == used, name
        assert rows[name]["status"] == "factorized", name
        b, a = _factors(out, name)
        s = singular_values(tensors[name])
        optimal = math.sqrt((s[5:] ** 2).sum() / (s**2).sum())
        assert relative_error(tensors[name], b, a) <= 1.02 * optimal
    assert rows["small.bias"]["status"] == "skipped"
    assert rows["small.bias"]["method"] is None


@pytest.mark.parametrize("policy", [RankPolicy(rank=64), RankPolicy(max_error=0.5)])
def test_auto_takes_the_exact_svd_of_a_384_wide_matrix(policy):
    """384×384: exact costs next to nothing, so auto's error is the optimal one, not 1.003× it."""
    w = with_spectrum(384, 384, 1 / np.sqrt(np.arange(1, 385)), seed=40)
    result = truncated_svd(w, policy, method="auto")
    assert result.method == "exact"
    s = singular_values(w)
    tail = tail_errors(s)
    rank = 64 if policy.rank else next(r for r, e in enumerate(tail) if e <= 0.5)
    assert result.rank == rank
    b, a, _ = result.factors()
    # Eckart–Young: the best rank-r error, from numpy's SVD in float64; float32 factors are within ~1e-6 of it.
    assert relative_error(w, b, a) == pytest.approx(tail[rank], rel=1e-5)


def test_auto_judges_the_exact_svd_by_its_cost_not_a_width():
    assert exact_is_cheap(384, 384) and exact_is_cheap(384, 1536) and exact_is_cheap(1536, 384)
    assert exact_is_cheap(640, 640) and not exact_is_cheap(768, 768)
    assert not exact_is_cheap(256, 1 << 16)  # a narrow vocabulary table still costs 256² per row: 4.3e9


# --- options --------------------------------------------------------------------------------------


def test_unknown_method_is_a_usage_error(decaying_file, tmp_path):
    source, _, _ = decaying_file
    before = listing(source.parent)
    result = cli("compress", source, "--method", "bogus", "--rank", 3, "-o", tmp_path / "out.safetensors")
    assert_clean_failure(result, 2, "--method", "bogus", "randomized")  # names the choices
    assert listing(source.parent) == before
    assert listing(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible, so --device cuda is valid")
@pytest.mark.parametrize("command", [["analyze"], ["compress", "--rank", "3"]], ids=lambda c: c[0])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, command, device):
    source = save(tmp_path / "w.safetensors", {"W": low_rank(12, 10, 2)})
    before = listing(tmp_path)
    result = cli(command[0], source, *command[1:], "--device", device)
    assert_clean_failure(result, 2, f"--device {device}: no CUDA device", "--device cpu")
    assert listing(tmp_path) == before and temp_files(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["randomized", "exact"])
@pytest.mark.parametrize("policy", [["--rank", "10"], ["--max-error", "0.1"]], ids=" ".join)
def test_cuda_gives_the_cpu_result(tmp_path, method, policy):
    w = with_spectrum(300, 200, geometric(200, 0.8), seed=23)  # σ ratio 0.8: every rank boundary well apart
    source = save(tmp_path / "w.safetensors", {"W": w})
    tail = tail_errors(singular_values(w))
    errors, ranks = {}, {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.safetensors"
        t = by_name(cli_json("compress", source, "--method", method, *policy, "--device", device, "-o", out))["W"]
        b, a = _factors(out)
        ranks[device], errors[device] = b.shape[1], relative_error(w, b, a)
        assert t["rank"] == ranks[device]
        assert t["rel_error"] == pytest.approx(errors[device], rel=1e-5)
    assert ranks["cuda"] == ranks["cpu"]
    assert errors["cuda"] == pytest.approx(errors["cpu"], abs=1e-4)
    assert errors["cuda"] <= 1.02 * tail[ranks["cuda"]]


# --- adaptive_range -------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=shared_sketch)
@given(
    seed=seeds,
    fraction=st.floats(1e-3, 0.5),
    block=st.sampled_from([4, 8, 16, 32]),
    power_iters=st.integers(0, 2),
)
def test_adaptive_range_residual_is_what_its_basis_leaves(sketch, seed, fraction, block, power_iters):
    """residual = ‖W − QQᵀW‖² = ‖W‖² − ‖UᵀW‖² (U spans Q), ≤ the target; U·S·Vh is the SVD of QQᵀW."""
    w = harmonic(120, 80, seed=seed % 1000).to(torch.float64)
    w64 = w.numpy()
    total = float(np.sum(w64**2))
    found = adaptive_range(
        w,
        fraction * total,
        block=block,
        power_iters=power_iters,
        max_rank=80,
        generator=torch.Generator().manual_seed(seed),
        sketch=sketch,
    )
    assert found is not None
    (u, s, vh), residual = found
    u64 = u.numpy()
    k = u64.shape[1]
    np.testing.assert_allclose(u64.T @ u64, np.eye(k), atol=1e-10)  # orthonormal, so UUᵀ is the projector onto Q
    left = float(np.sum((w64 - u64 @ (u64.T @ w64)) ** 2))  # ‖W − UUᵀW‖²
    assert residual == pytest.approx(total - float(np.sum((u64.T @ w64) ** 2)), rel=1e-6)
    assert residual == pytest.approx(left, rel=1e-6)
    assert residual <= fraction * total
    np.testing.assert_allclose((u64 * s.numpy()) @ vh.numpy(), u64 @ (u64.T @ w64), atol=1e-10)  # (m, k) @ (k, n)
    assert np.all(np.diff(s.numpy()) <= 0)


@pytest.mark.parametrize("fraction", [0.3, 0.05, 0.01, 0.002])
def test_adaptive_range_residual_in_float32(sketch, fraction):
    """In float32 the bookkept residual is as good as float32 allows: within 1e-6 of ‖W‖²."""
    w = harmonic(M, N, seed=4)
    w64 = w.to(torch.float64).numpy()
    total = float(np.sum(w64**2))
    found = adaptive_range(
        w,
        fraction * total,
        block=32,
        power_iters=2,
        max_rank=N,
        generator=torch.Generator().manual_seed(9),
        sketch=sketch,
    )
    assert found is not None
    (u, _, _), residual = found
    u64 = u.to(torch.float64).numpy()
    truth = float(np.sum((w64 - u64 @ (u64.T @ w64)) ** 2))
    assert abs(residual - truth) <= 1e-6 * total


def test_adaptive_range_gives_up_past_max_rank(sketch):
    w = harmonic(120, 80, seed=5).to(torch.float64)
    total = float(torch.sum(w**2))
    tail = tail_errors(singular_values(w))
    needed = _optimal_rank(tail, math.sqrt(1e-3))  # the best any basis can do with fewer columns misses the target
    assert needed > 16
    generator = torch.Generator().manual_seed(0)
    found = adaptive_range(
        w, 1e-3 * total, block=8, power_iters=2, max_rank=needed - 1, generator=generator, sketch=sketch
    )
    assert found is None


# --- the building blocks: orthonormal bases, sums of squares, the bfloat16 sketch ------------------


def _conditioned(m: int, k: int, condition: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A random m×k matrix whose singular values run geometrically from 1 down to 1/condition."""
    return with_spectrum(m, k, np.geomspace(1.0, 1.0 / condition, k), seed=seed, dtype=torch.float64).to(dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=shared_sketch)
@given(
    seed=seeds,
    shape=st.sampled_from([(400, 40), (1000, 7), (64, 64), (50, 1)]),
    log_condition=st.floats(0, 12),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_orthonormal_spans_y_with_orthonormal_columns_at_any_condition(seed, shape, log_condition, dtype):
    """CholeskyQR2 where it is safe, Householder where it is not: either way QᵀQ = I and QQᵀy = y."""
    y = _conditioned(*shape, 10.0**log_condition, seed % 1000, dtype)
    eps = torch.finfo(dtype).eps
    q = orthonormal(y)
    assert q.shape == y.shape and q.dtype == dtype
    q64, y64 = q.to(torch.float64).numpy(), y.to(torch.float64).numpy()
    assert np.abs(q64.T @ q64 - np.eye(shape[1])).max() <= 50 * eps
    assert np.linalg.norm(y64 - q64 @ (q64.T @ y64)) <= 50 * eps * np.linalg.norm(y64)
    once = orthonormal(y, twice=False).to(torch.float64).numpy()  # only feeds power iterations: well-conditioned
    assert np.linalg.norm(once.T @ once - np.eye(shape[1]), 2) <= 0.5  # κ(once) ≤ √3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthonormal_of_rank_deficient_and_empty_inputs(dtype):
    y = low_rank(300, 20, 5, seed=1, dtype=dtype)  # 20 columns spanning 5 dimensions
    for twice in (True, False):
        q = orthonormal(y, twice=twice).to(torch.float64).numpy()
        y64 = y.to(torch.float64).numpy()
        assert np.abs(q.T @ q - np.eye(20)).max() < 1e-4
        assert np.linalg.norm(y64 - q @ (q.T @ y64)) < 1e-5 * np.linalg.norm(y64)
        zero = orthonormal(torch.zeros(30, 4, dtype=dtype), twice=twice).to(torch.float64).numpy()
        assert np.abs(zero.T @ zero - np.eye(4)).max() < 1e-5
    assert orthonormal(torch.zeros(30, 0, dtype=dtype)).shape == (30, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_of_squares_matches_float64_across_chunks(dtype):
    rng = np.random.default_rng(3)
    x64 = rng.standard_normal((3001, 3000)) * rng.uniform(0.1, 10.0, size=(3001, 1))  # rows of different scales
    x = torch.from_numpy(x64).to(dtype)
    truth = float(np.sum(x.to(torch.float64).numpy() ** 2))
    assert sum_of_squares(x) == pytest.approx(truth, rel=1e-7 if dtype == torch.float32 else 1e-13)
    assert sum_of_squares(x[:0]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_sketch_keeps_fixed_rank_errors_near_optimal_even_far_below_its_precision(seed):
    """W of rank 10 plus noise 3e-5 of its norm: a basis made only in bfloat16 would be off by ~1e-3, far
    above the optimum; the last product in float32 pulls it back."""
    rng = np.random.default_rng(seed)
    w = low_rank(400, 300, 10, seed=seed) + torch.from_numpy(1e-4 * rng.standard_normal((400, 300))).float()
    tail = tail_errors(singular_values(w))
    for sketch in (torch.bfloat16, None):
        generator = torch.Generator().manual_seed(seed)
        u, s, vh = randomized_svd(w, 10, oversample=16, power_iters=3, generator=generator, sketch=sketch)
        b, a = (u * s), vh  # (m, r) * (r,), (r, n)
        assert relative_error(w, b, a) <= 1.02 * tail[10]


@pytest.mark.parametrize(
    ("dtype", "fraction", "fast", "expected"),
    [
        (torch.float32, None, True, torch.bfloat16),  # a fixed rank
        (torch.float32, 0.01, True, torch.bfloat16),
        (torch.float32, 1e-3, True, torch.bfloat16),
        (torch.float32, 9e-4, True, None),  # a tight target: the sketch's 2⁻⁸ would show in the rank
        (torch.float64, 0.5, True, None),  # float64 tensors are worked in float64 throughout
        (torch.float32, 0.5, False, None),  # no AMX: bfloat16 would be slower
    ],
)
def test_sketch_precision_is_chosen_by_dtype_target_and_hardware(monkeypatch, dtype, fraction, fast, expected):
    monkeypatch.setattr("lowrank_cli.linalg.factorize.fast_bfloat16", lambda device_type: fast)
    assert _sketch_dtype(torch.zeros(2, 2, dtype=dtype), fraction) is expected


def test_cuda_keeps_a_float32_sketch():
    assert fast_bfloat16("cuda") is False


@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize(("cap", "allowed"), [("AVX512_CORE_BF16", False), ("avx2", False), ("AVX512_CORE_AMX", True)])
def test_a_onednn_cap_below_amx_turns_the_bfloat16_sketch_off(monkeypatch, variable, cap, allowed):
    """Capped below AMX, oneDNN's bfloat16 products are 1.5-50× slower than float32."""
    monkeypatch.setattr("lowrank_cli.linalg.randomized._has_amx", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert fast_bfloat16("cpu") is True
    monkeypatch.setenv(variable, cap)
    assert fast_bfloat16("cpu") is allowed
    monkeypatch.setattr("lowrank_cli.linalg.randomized._has_amx", lambda: False)
    assert fast_bfloat16("cpu") is False
