"""--budget F: one parameter budget for all tensors; each keeps a rank or, where it pays, stays dense.

The budget is checked on the files as written; the allocation against a brute force over every
combination of per-tensor options (ranks 1…cap and dense), with losses computed here from the
singular values. What is proven for the allocator (lowrank_cli.linalg.budget) and checked:
  - it never spends more than the budget;
  - no single tensor can move to another option that fits in what is left and lower the loss;
  - its loss exceeds the brute-force optimum by at most the largest loss drop along one edge of any
    tensor's lower convex hull of (cost, loss) options (the linear relaxation's one fractional edge).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import (
    SAMPLES,
    as_matrix,
    assert_clean_failure,
    by_name,
    cli,
    cli_json,
    geometric,
    listing,
    load,
    low_rank,
    relative_error,
    save,
    sha256,
    singular_values,
    with_spectrum,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_cli
from lowrank_cli.errors import UsageError
from lowrank_cli.linalg.budget import allocate
from lowrank_cli.linalg.spectrum import Spectrum

DEMO = SAMPLES / "demo.safetensors"
EPS32 = float(np.finfo(np.float32).eps)


def _saving_cap(m: int, n: int) -> int:
    """The largest rank that still saves params, r·(m + n) < m·n; 0 where even rank 1 does not."""
    return max(r for r in range(min(m, n) + 1) if r * (m + n) < m * n)


def _spectrum(sigma, shape) -> Spectrum:
    return Spectrum(np.asarray(sigma, dtype=np.float64), tuple(shape), EPS32)


def _tails(sigma) -> np.ndarray:
    """tails[r] = Σ_{i>r} σ_i² / Σ σ_i²: the relative squared error left at rank r."""
    squares = np.asarray(sigma, dtype=np.float64) ** 2
    return np.append(squares[::-1].cumsum()[::-1], 0.0) / squares.sum()


def _options(
    sigma, shape, objective: str = "balanced", allow_dense: bool = True, sensitivity: float | None = None
) -> list[tuple[int, float, int | None]]:
    """(params, loss, rank or None for dense) of every choice the budget has for one tensor.

    With a sensitivity s the loss is s·Σ_{i>r} σ_i², the absolute squared error weighted by s.
    """
    m, n = shape
    numerical = int(np.count_nonzero(sigma > sigma.max() * max(m, n) * EPS32))  # past it: rounding only
    cap = min(_saving_cap(m, n) if allow_dense else min(m, n), max(1, numerical))
    power = {"relative": 0.0, "balanced": 1.0, "absolute": 2.0}[objective]
    weight = float(np.linalg.norm(sigma)) ** power  # ‖W‖^power
    if sensitivity is not None:
        weight = sensitivity * float(np.linalg.norm(sigma)) ** 2
    tails = _tails(sigma)
    options = [(r * (m + n), weight * tails[r], r) for r in range(1, cap + 1)]
    return options + ([(m * n, 0.0, None)] if allow_dense else [])


def _loss(options: dict, ranks: dict) -> float:
    return sum(next(loss for _, loss, r in options[t] if r == ranks[t]) for t in options)


def _cost(options: dict, ranks: dict) -> int:
    return sum(next(cost for cost, _, r in options[t] if r == ranks[t]) for t in options)


def _brute_force(options: dict, budget: float) -> float:
    """The least loss over every combination of options whose params fit in the budget."""
    best = math.inf
    for combo in itertools.product(*options.values()):
        if sum(cost for cost, _, _ in combo) <= budget:
            best = min(best, sum(loss for _, loss, _ in combo))
    return best


def _largest_hull_drop(points: list[tuple[int, float, int | None]]) -> float:
    """The largest loss drop between neighbouring vertices of the lower convex hull of (cost, loss).

    A point is a vertex unless it lies on or above the chord of two points on either side of it.
    """
    vertices = [
        p
        for p in points
        if not any(
            a[0] < p[0] < b[0] and p[1] >= a[1] + (b[1] - a[1]) * (p[0] - a[0]) / (b[0] - a[0])
            for a in points
            for b in points
        )
    ]
    return max((a[1] - b[1] for a, b in zip(vertices, vertices[1:], strict=False)), default=0.0)


def _check_allocation(
    sigmas: dict, shapes: dict, fraction: float, objective: str, allow_dense: bool, sensitivity: dict | None = None
) -> None:
    """Run allocate and check the three proven properties against a brute force."""
    nonzero = {t for t in sigmas if np.any(sigmas[t])}
    options = {
        t: _options(sigmas[t], shapes[t], objective, allow_dense, sensitivity[t] if sensitivity else None)
        for t in nonzero
    }
    budget = fraction * sum(shapes[t][0] * shapes[t][1] for t in nonzero)
    spectra_ = {t: _spectrum(sigmas[t], shapes[t]) for t in sigmas}
    if sum(opts[0][0] for opts in options.values()) > budget:  # the cheapest option everywhere does not fit
        with pytest.raises(UsageError, match="raise budget"):
            allocate(spectra_, fraction, objective, allow_dense=allow_dense, sensitivity=sensitivity)
        return
    ranks = allocate(spectra_, fraction, objective, allow_dense=allow_dense, sensitivity=sensitivity)
    assert set(ranks) == set(sigmas)
    assert all(ranks[t] == 0 for t in set(sigmas) - nonzero)  # zero tensors: rank 0, outside the budget
    ranks = {t: ranks[t] for t in nonzero}
    for t in nonzero:
        assert ranks[t] in [r for _, _, r in options[t]], (t, ranks[t])
    spent, loss = _cost(options, ranks), _loss(options, ranks)
    assert spent <= budget
    scale = max((opts[0][1] for opts in options.values()), default=1.0)
    tol = 1e-9 * scale
    for t in nonzero:  # no single tensor's move that fits lowers the loss
        current = next((c, lo) for c, lo, r in options[t] if r == ranks[t])
        for cost, other, _ in options[t]:
            if spent - current[0] + cost <= budget:
                assert other >= current[1] - tol, (t, ranks[t])
    optimum = _brute_force(options, budget)
    assert optimum <= loss + tol
    assert loss <= optimum + max((_largest_hull_drop(opts) for opts in options.values()), default=0.0) + tol


@st.composite
def spectra(draw, max_tensors=4, max_dim=10, zeros=True):
    """A few (shape, σ) pairs: σ descending, sometimes rank-deficient, sometimes all zero."""
    count = draw(st.integers(1, max_tensors))
    sigmas, shapes = {}, {}
    for t in range(count):
        m, n = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
        k = min(m, n)
        values = draw(st.lists(st.floats(0.01, 100.0), min_size=k, max_size=k))
        rank = draw(st.integers(0 if zeros else 1, k))
        sigma = np.array(sorted(values, reverse=True))
        sigma[rank:] = 0.0
        sigmas[f"t{t}"], shapes[f"t{t}"] = sigma, (m, n)
    return sigmas, shapes


# --- allocate: what is proven of it, against a brute force ---------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    data=spectra(),
    fraction=st.floats(0.01, 0.99),
    objective=st.sampled_from(["balanced", "absolute", "relative"]),
    allow_dense=st.booleans(),
)
def test_allocation_fits_is_one_move_optimal_and_near_the_brute_force_optimum(data, fraction, objective, allow_dense):
    sigmas, shapes = data
    _check_allocation(sigmas, shapes, fraction, objective, allow_dense)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(4, 12), st.integers(4, 12)), min_size=2, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    fraction=st.floats(0.1, 0.95),
    objective=st.sampled_from(["balanced", "absolute", "relative"]),
)
def test_allocation_on_decaying_spectra(shapes, seed, fraction, objective):
    """Spectra like trained weights': σ decaying at different rates and scales, full rank."""
    rng = np.random.default_rng(seed)
    sigmas = {f"t{i}": np.sort(rng.exponential(size=min(s)) * rng.uniform(0.1, 10))[::-1] for i, s in enumerate(shapes)}
    shapes = {f"t{i}": s for i, s in enumerate(shapes)}
    _check_allocation(sigmas, shapes, fraction, objective, allow_dense=True)


@settings(max_examples=100, deadline=None)
@given(
    data=spectra(zeros=False),
    fraction=st.floats(0.05, 0.99),
    exponents=st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    allow_dense=st.booleans(),
)
def test_allocation_by_measured_sensitivity(data, fraction, exponents, allow_dense):
    """With sensitivities s_t (calibrate), the loss of a cut is s_t·(absolute squared error): same guarantees."""
    sigmas, shapes = data
    sensitivity = {t: 10.0**e for t, e in zip(sigmas, exponents, strict=False)}
    _check_allocation(sigmas, shapes, fraction, "balanced", allow_dense, sensitivity)


def test_sensitivity_decides_between_equal_spectra():
    """Two identical 10×10 spectra: the one the model is 100× more sensitive to gets the rank (or stays whole)."""
    sigma = 0.7 ** np.arange(10)
    spectra_ = {"a": _spectrum(sigma, (10, 10)), "b": _spectrum(sigma, (10, 10))}
    assert allocate(spectra_, 0.3, "balanced") in ({"a": 2, "b": 1}, {"a": 1, "b": 2})  # a tie either way
    assert allocate(spectra_, 0.3, sensitivity={"a": 1.0, "b": 100.0}) == {"a": 1, "b": 2}
    assert allocate(spectra_, 0.6, sensitivity={"a": 100.0, "b": 1.0}) == {"a": None, "b": 1}
    # Not measured (c): treated as the most sensitive one (b), so it is spared alike.
    three = {**spectra_, "c": _spectrum(sigma, (10, 10))}
    ranks = allocate(three, 0.5, sensitivity={"a": 1.0, "b": 100.0})
    assert ranks["c"] == ranks["b"] and ranks["a"] < ranks["b"], ranks
    # Zero (a weight the output ignores) still orders by the spectra, below every measured one.
    assert allocate(spectra_, 0.6, sensitivity={"a": 0.0, "b": 1e-9}) == {"a": 1, "b": None}


def test_allocation_example_by_hand():
    """Two 10×10 tensors: ranks 1…4 save params (20 each), dense costs 100.

    a: σ = 1 (ten times): relative squared error left at rank r is (10 − r)/10: 0.9, 0.8, 0.7, 0.6; dense 0.
    b: σ² = 64, 16, 4, 1, 0.25 (85.25): left at ranks 1…4: 0.249, 0.0616, 0.0147, 0.0029.
    """
    a = np.ones(10)
    b = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0, 0, 0, 0, 0])
    spectra_ = {"a": _spectrum(a, (10, 10)), "b": _spectrum(b, (10, 10))}
    fit = dict(objective="relative")
    assert allocate(spectra_, 0.2, **fit) == {"a": 1, "b": 1}  # 40 params: rank 1 each
    assert allocate(spectra_, 0.3, **fit) == {"a": 1, "b": 2}  # 60: 0.9 + 0.062 beats a at rank 2, 0.8 + 0.249
    assert allocate(spectra_, 0.6, **fit) == {"a": None, "b": 1}  # 120: a whole + b rank 1 (0.249) beats 4 + 2 (0.66)
    assert allocate(spectra_, 0.8, **fit) == {"a": None, "b": 3}  # 160: a whole, b rank 3 (0.0147)
    ranks_only = allocate(spectra_, 0.6, **fit, allow_dense=False)
    assert ranks_only == {"a": 4, "b": 2}  # 120 without dense: 0.6 + 0.062 beats 0.9 + 0 (b at 5) and 0.7 + 0.015
    with pytest.raises(UsageError, match="raise budget"):
        allocate(spectra_, 0.19)  # 38 < 40


def test_a_tensor_too_small_to_factor_costs_its_own_size():
    """A 1×8 row: rank 1 costs 9 > 8 params, so dense is its only (and cheapest) option."""
    spectra_ = {"row": _spectrum(np.array([3.0]), (1, 8)), "w": _spectrum(0.5 ** np.arange(10), (10, 10))}
    ranks = allocate(spectra_, 0.5)  # 54 params: the row whole (8), w rank 2 (40)
    assert ranks == {"row": None, "w": 2}


# --- the CLI ----------------------------------------------------------------------------------------


def _matrices(path) -> dict[str, torch.Tensor]:
    return {name: t for name, t in load(path).items() if t.is_floating_point() and t.dim() >= 2 and t.numel()}


def _recount(written: dict, matrices: dict, report: dict) -> tuple[int, dict]:
    """Params of the selected matrices as written (factors B, A or the whole tensor) and each one's
    rank (None: kept dense, which must be the tensor bit for bit, reported as the budget's choice)."""
    after, ranks = 0, {}
    for name, w in matrices.items():
        m, n = as_matrix(w).shape
        if f"{name}.B" in written:
            b, a = written[f"{name}.B"], written[f"{name}.A"]
            ranks[name] = b.shape[1]
            assert b.shape == (m, ranks[name]) and a.shape == (ranks[name], n) and ranks[name] >= 1
            assert report[name]["rank"] == ranks[name] and report[name]["status"] == "factorized"
            assert report[name]["rel_error"] == pytest.approx(relative_error(w, b, a), rel=1e-4)
            after += b.numel() + a.numel()
        else:
            ranks[name] = None
            assert written[name].dtype == w.dtype and torch.equal(written[name], w), name  # bit for bit
            assert report[name]["status"] == "dense" and report[name]["reason"] == "the budget keeps it whole"
            after += w.numel()
    return after, ranks


def _one_move_optimal(matrices: dict, ranks: dict, budget: float) -> None:
    """No single tensor can move to another of its options within the budget and lower Σ‖W − W_r‖²/‖W‖."""
    options = {t: _options(singular_values(w), as_matrix(w).shape) for t, w in matrices.items()}
    spent, loss = _cost(options, ranks), _loss(options, ranks)
    assert spent <= budget
    for t, opts in options.items():
        cost, current = next((c, lo) for c, lo, r in opts if r == ranks[t])
        for other_cost, other, _ in opts:
            if spent - cost + other_cost <= budget:
                assert other >= current - 1e-4 * loss, t  # σ from numpy, not lowrank's SVD: a loose tie


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_compress_keeps_the_budget_on_demo(tmp_path, fraction):
    out = tmp_path / "out.safetensors"
    report = by_name(cli_json("compress", DEMO, "--budget", fraction, "-o", out))
    matrices = _matrices(DEMO)
    after, ranks = _recount(load(out), matrices, report)
    before = sum(w.numel() for w in matrices.values())
    assert after <= fraction * before
    _one_move_optimal(matrices, ranks, fraction * before)
    if fraction == 0.9:
        assert None in ranks.values() and any(r is not None for r in ranks.values())  # some whole, some cut


def test_analyze_and_compress_allocate_the_same_ranks(tmp_path):
    fraction = 0.7
    analyzed = by_name(cli_json("analyze", DEMO, "--budget", fraction))
    out = tmp_path / "out.safetensors"
    cli_json("compress", DEMO, "--budget", fraction, "-o", out)
    written = load(out)
    matrices = _matrices(DEMO)
    params = sum(w.numel() for w in matrices.values())
    assert sum(analyzed[name]["params_after"] for name in matrices) <= fraction * params
    assert any(analyzed[name]["status"] == "dense" for name in matrices)
    for name, w in matrices.items():
        m, n = as_matrix(w).shape
        if analyzed[name]["status"] == "dense":
            assert name in written and f"{name}.B" not in written, name
            assert analyzed[name]["params_after"] == m * n and analyzed[name]["rel_error"] == 0.0
            continue
        rank = written[f"{name}.B"].shape[1]
        assert analyzed[name]["rank"] == rank, name
        assert analyzed[name]["params_after"] == rank * (m + n), name
        s = singular_values(w)
        assert analyzed[name]["rel_error"] == pytest.approx(math.sqrt((s[rank:] ** 2).sum() / (s**2).sum()), rel=1e-4)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_budget_beats_every_uniform_rank_that_fits_in_it(tmp_path, fraction):
    """Σ_t ‖W_t − W_t,r‖²/‖W_t‖ (the budget's objective) of the ranks read from the file ≤ that of any uniform
    --rank R whose params (tensors it cannot cut counted whole, as --rank R keeps them) fit the budget."""
    out = tmp_path / "out.safetensors"
    report = by_name(cli_json("compress", DEMO, "--budget", fraction, "-o", out))
    matrices = _matrices(DEMO)
    _, ranks = _recount(load(out), matrices, report)
    options = {t: _options(singular_values(w), as_matrix(w).shape) for t, w in matrices.items()}
    budget = fraction * sum(w.numel() for w in matrices.values())
    uniform = []
    for rank in range(1, max(min(as_matrix(w).shape) for w in matrices.values()) + 1):
        choice = {t: rank if any(r == rank for _, _, r in opts) else None for t, opts in options.items()}
        if _cost(options, choice) <= budget:
            uniform.append(_loss(options, choice))
    assert uniform, "no uniform rank fits: pick a larger fraction"
    assert _loss(options, ranks) <= min(uniform) * (1 + 1e-6)


def test_skipped_tensors_take_no_part_in_the_budget(tmp_path):
    matrices = {
        "a.weight": with_spectrum(60, 40, geometric(40, 0.85), seed=1),
        "b.weight": with_spectrum(50, 50, geometric(50, 0.6), seed=2),
    }
    others = {
        "bias": torch.randn(60),
        "ids": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "big": torch.randn(90, 90),
    }
    source = save(tmp_path / "m.safetensors", {**matrices, **others})
    out = tmp_path / "out.safetensors"
    fraction = 0.25
    report = by_name(cli_json("compress", source, "--budget", fraction, "--exclude", "big", "-o", out))
    written = load(out)
    for name in others:
        assert report[name]["status"] == "skipped", name
        assert torch.equal(written[name], others[name]), name
    after = sum(written[f"{t}.B"].numel() + written[f"{t}.A"].numel() for t in matrices)
    assert after <= fraction * sum(w.numel() for w in matrices.values())
    assert all(written[f"{t}.B"].shape[1] >= 1 for t in matrices)


def test_a_zero_matrix_does_not_lend_its_share_of_the_budget(tmp_path):
    """A zero matrix is kept dense (rank 0), so its m·n params stay in the output: they must not be handed
    to the other tensors, or the factorized tensors hold more than F of their own params."""
    matrices = {
        "a.weight": with_spectrum(60, 40, geometric(40, 0.85), seed=1),
        "b.weight": with_spectrum(50, 50, geometric(50, 0.6), seed=2),
    }
    zero = torch.zeros(30, 20)
    source = save(tmp_path / "m.safetensors", {**matrices, "zero.weight": zero})
    out = tmp_path / "out.safetensors"
    fraction = 0.25
    report = by_name(cli_json("compress", source, "--budget", fraction, "-o", out))
    written = load(out)
    assert report["zero.weight"]["status"] == "dense" and report["zero.weight"]["rank"] == 0
    assert torch.equal(written["zero.weight"], zero)
    after = sum(written[f"{t}.B"].numel() + written[f"{t}.A"].numel() for t in matrices)
    before = sum(w.numel() for w in matrices.values())
    assert after <= fraction * before, f"factors hold {after} params, {after / before:.1%} of {before}"


def test_allocate_gives_a_zero_tensor_nothing_and_lends_nothing():
    sigma = 0.8 ** np.arange(10)
    ranks = allocate({"w": _spectrum(sigma, (10, 10)), "z": _spectrum(np.zeros(10), (10, 10))}, 0.4)
    assert ranks["z"] == 0
    assert ranks["w"] * 20 <= 0.4 * 100  # w's rank fits w's own budget (rank 2, not the 4 of 0.4 · 200 / 20)


# --- invalid budgets ------------------------------------------------------------------------------


@pytest.fixture
def small_file(tmp_path):
    return save(tmp_path / "m.safetensors", {"a": low_rank(40, 40, 40, seed=1), "b": low_rank(40, 30, 30, seed=2)})


@pytest.mark.parametrize("command", ["analyze", "compress"])
@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "nan"])
def test_budget_outside_zero_one_is_a_usage_error(small_file, tmp_path, command, value):
    before, digest = listing(tmp_path), sha256(small_file)
    result = cli(command, small_file, "--budget", value)
    assert_clean_failure(result, 2, "--budget")
    assert listing(tmp_path) == before and sha256(small_file) == digest


@pytest.mark.parametrize("command", ["analyze", "compress"])
def test_budget_too_small_for_rank_one_everywhere(small_file, tmp_path, command):
    # rank 1 everywhere: (40 + 40) + (40 + 30) = 150 params of 2,800; 0.05 allows 140
    assert 150 > 0.05 * (40 * 40 + 40 * 30)
    before = listing(tmp_path)
    result = cli(command, small_file, "--budget", 0.05)
    assert_clean_failure(result, 2, "--budget", "raise --budget")
    assert listing(tmp_path) == before

    assert 150 <= 0.06 * (40 * 40 + 40 * 30)  # just enough: every tensor gets rank 1
    result = cli(command, small_file, "--budget", 0.06, "--json")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("command", ["analyze", "compress"])
@pytest.mark.parametrize("other", [["--rank", "2"], ["--energy", "0.9"], ["--max-error", "0.1"]], ids=" ".join)
def test_budget_with_another_policy_is_a_usage_error(small_file, tmp_path, command, other):
    before = listing(tmp_path)
    result = cli(command, small_file, "--budget", 0.3, *other)
    assert_clean_failure(result, 2, "--budget", other[0])
    assert listing(tmp_path) == before


def test_budget_over_a_sharded_folder(tmp_path):
    """The budget is one for the whole checkpoint, across its shards."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": with_spectrum(60, 40, geometric(40, 0.9), seed=3)},
        "model-00002-of-00002.safetensors": {
            "b.weight": with_spectrum(48, 48, geometric(48, 0.7), seed=4),
            "c.weight": with_spectrum(64, 32, geometric(32, 0.8), seed=5),
        },
    }
    for shard, tensors in shards.items():
        save(folder / shard, tensors)
    fraction = 0.5
    report = by_name(cli_json("compress", folder, "--budget", fraction))
    out = tmp_path / "ckpt.lowrank"
    before = after = 0
    ranks, matrices = {}, {}
    for shard, tensors in shards.items():
        shard_after, shard_ranks = _recount(
            load(out / shard.replace(".safetensors", ".lowrank.safetensors")), tensors, report
        )
        before += sum(w.numel() for w in tensors.values())
        after += shard_after
        ranks.update(shard_ranks)
        matrices.update(tensors)
    assert after <= fraction * before
    _one_move_optimal(matrices, ranks, fraction * before)


def test_extract_budget_allocates_lora_ranks_only(tmp_path):
    """A LoRA cannot hold a whole matrix: at F = 0.9, where compress would keep the flat ΔW whole, extract
    gives every changed matrix a rank, and Σ r·(m + n) ≤ F·Σ m·n of the changed matrices, counted in the file."""
    generator = torch.Generator().manual_seed(5)
    base = {f"layer.{i}.weight": torch.randn(40, 30, generator=generator) for i in range(3)}
    deltas = {
        "layer.0.weight": torch.randn(40, 30, generator=generator),  # flat spectrum: dense would pay
        "layer.1.weight": with_spectrum(40, 30, geometric(30, 0.5), seed=6),
        "layer.2.weight": with_spectrum(40, 30, geometric(30, 0.8), seed=7),
    }
    tuned = {name: base[name] + deltas[name] for name in base}
    base_file, tuned_file = save(tmp_path / "base.safetensors", base), save(tmp_path / "tuned.safetensors", tuned)
    fraction = 0.9
    plain = allocate({t: _spectrum(singular_values(d), tuple(d.shape)) for t, d in deltas.items()}, fraction)
    assert plain["layer.0.weight"] is None  # what compress would do with these ΔW: keep the flat one whole
    adapter = tmp_path / "adapter"
    report = by_name(cli_json("extract", base_file, tuned_file, "-o", adapter, "--budget", fraction))
    factors = load(adapter / "adapter_model.safetensors")
    params = 0
    for name in base:
        module = name.removesuffix(".weight")
        b = factors[f"base_model.model.{module}.lora_B.weight"]
        a = factors[f"base_model.model.{module}.lora_A.weight"]
        assert b.shape[1] == a.shape[0] >= 1 and report[name]["rank"] == b.shape[1], name
        params += b.numel() + a.numel()
    assert params <= fraction * sum(w.numel() for w in base.values())


def test_analyze_and_extract_allocate_the_same_ranks_where_their_objectives_agree(tmp_path):
    """One function turns a budget into ranks for every command (ops.budget). analyze weighs a model's
    matrices (balanced: by ‖W‖), extract a fine-tune's ΔW (absolute: by ‖ΔW‖², ranks only); for ΔWs of
    equal norm and of low rank, where keeping one whole never pays, the two objectives are one, and
    analyze of the ΔWs must predict extract's ranks exactly."""
    shapes = {"a.weight": (40, 30), "b.weight": (48, 30), "c.weight": (40, 36)}
    deltas = {}
    for i, (name, (m, n)) in enumerate(shapes.items()):
        delta = with_spectrum(m, n, geometric(6, (0.45, 0.7, 0.9)[i]), seed=30 + i, dtype=torch.float64)
        deltas[name] = delta / delta.norm()  # ‖ΔW‖_F = 1 for each
    generator = torch.Generator().manual_seed(8)
    base = {name: torch.randn(*shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
    tuned = {name: base[name] + deltas[name] for name in shapes}
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "tuned.safetensors", tuned)
    save(tmp_path / "delta.safetensors", {name: tuned[name] - base[name] for name in shapes})  # extract's ΔW
    fraction = 0.15

    analyzed = lowrank_cli.analyze(tmp_path / "delta.safetensors", budget=fraction)
    extracted = lowrank_cli.extract(
        tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "adapter", budget=fraction
    )
    predicted = {t.name: t.rank for t in analyzed.tensors}
    ranks = {t.name: t.rank for t in extracted.tensors}
    assert predicted == ranks, (predicted, ranks)
    assert len(set(ranks.values())) > 1  # the budget chose: no uniform rank
    factors = load(tmp_path / "adapter" / "adapter_model.safetensors")
    spent = sum(f.numel() for key, f in factors.items() if ".lora_" in key)
    assert spent <= fraction * sum(m * n for m, n in shapes.values())
    assert analyzed.options["budget_objective"] == "balanced" and extracted.options["budget_objective"] == "absolute"


def test_every_command_under_a_budget_reports_its_objective(tmp_path):
    base = {"a.weight": low_rank(40, 30, 8, seed=1), "b.weight": low_rank(40, 30, 8, seed=2)}
    tuned = {name: w + low_rank(40, 30, 4, seed=3 + i) for i, (name, w) in enumerate(base.items())}
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "tuned.safetensors", tuned)
    args = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    reports = {
        "analyze": lowrank_cli.analyze(args[0], budget=0.5),
        "compress": lowrank_cli.compress(args[0], tmp_path / "c.safetensors", budget=0.5),
        "extract": lowrank_cli.extract(*args, tmp_path / "adapter", budget=0.5),
        "resize": lowrank_cli.resize(tmp_path / "adapter", tmp_path / "small", budget=0.5),
    }
    objectives = {command: report.options.get("budget_objective") for command, report in reports.items()}
    assert objectives == {"analyze": "balanced", "compress": "balanced", "extract": "absolute", "resize": "absolute"}
    ranked = lowrank_cli.analyze(args[0], rank=2)
    assert "budget_objective" not in ranked.options  # a policy without a budget has no objective
