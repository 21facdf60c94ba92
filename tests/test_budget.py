"""--budget F: one parameter budget for all tensors, ranks allocated greedily by error removed per number.

The budget is checked on the files as written; the allocation against a brute force over all ranks and
against its optimality (KKT) conditions, with gains σ_i²/‖W‖² computed here from numpy's SVD.
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

from lowrank_cli.errors import UsageError
from lowrank_cli.linalg.budget import allocate
from lowrank_cli.linalg.spectrum import Spectrum

DEMO = SAMPLES / "demo.safetensors"


def _cap(m: int, n: int) -> int:
    """The largest rank that still saves params, r·(m + n) < m·n; at least 1."""
    return max(1, max(r for r in range(min(m, n) + 1) if r * (m + n) < m * n))


def _spectrum(sigma, shape) -> Spectrum:
    return Spectrum(np.asarray(sigma, dtype=np.float64), tuple(shape), float(np.finfo(np.float32).eps))


def _shares(sigma) -> np.ndarray:
    squares = np.asarray(sigma, dtype=np.float64) ** 2
    return squares / squares.sum()


def _objective(sigmas: dict, ranks: dict) -> float:
    """Σ_t relative squared error of the best rank-r_t approximations: Σ_t Σ_{i>r_t} σ_{t,i}² / ‖W_t‖²."""
    return float(sum(_shares(sigmas[t])[ranks[t] :].sum() for t in sigmas if np.any(sigmas[t])))


def _params(shapes: dict, ranks: dict) -> int:
    return sum(ranks[t] * (shapes[t][0] + shapes[t][1]) for t in shapes)


def _brute_force(sigmas: dict, shapes: dict, capacity: float) -> float:
    """The least objective over every rank combination 1 ≤ r_t ≤ cap_t with Σ r_t·(m_t + n_t) ≤ capacity."""
    names = list(sigmas)
    tails = {t: [_shares(sigmas[t])[r:].sum() for r in range(_cap(*shapes[t]) + 1)] for t in names}
    choices = [range(1, _cap(*shapes[t]) + 1) for t in names]
    best = math.inf
    for combo in itertools.product(*choices):
        if sum(r * sum(shapes[t]) for t, r in zip(names, combo, strict=True)) <= capacity:
            best = min(best, sum(tails[t][r] for t, r in zip(names, combo, strict=True)))
    return best


def _check_kkt(sigmas: dict, shapes: dict, ranks: dict, budget: float, rtol: float = 1e-12) -> None:
    """Every term taken removes at least as much error per number as every term left out, and the best term
    left out would not fit in what is left of the budget (the greedy did not stop early). Terms beyond the
    numerical rank are not candidates: they would spend params on rounding noise.

    rtol: how far apart two ratios may be and still count as a tie (σ from another SVD than lowrank's).
    """
    taken, left = [], []
    for t, sigma in sigmas.items():
        if not np.any(sigma):
            continue
        m, n = shapes[t]
        ratio = _shares(sigma) / (m + n)  # per term i = 1…k: the error it removes per number it costs
        taken += list(ratio[1 : ranks[t]])  # rank 1 is given to every tensor, not chosen
        # Terms past the numerical rank (σ ≤ σ_max·max(m, n)·ε) remove only rounding: never candidates.
        numerical = int(np.count_nonzero(sigma > sigma.max() * max(m, n) * np.finfo(np.float32).eps))
        left += [(ratio[i], m + n) for i in range(ranks[t], min(_cap(m, n), numerical))]
    if taken and left:
        assert min(taken) >= max(r for r, _ in left) * (1 - rtol)
    if left:
        best = max(r for r, _ in left)
        assert any(_params(shapes, ranks) + cost > budget for r, cost in left if r >= best * (1 - rtol))


@st.composite
def spectra(draw, max_tensors=5, max_dim=24, zeros=True):
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


# --- allocate: the greedy's guarantees -----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=spectra(zeros=False), fraction=st.floats(0.01, 0.99))
def test_allocation_fits_the_budget_and_keeps_every_tensor(data, fraction):
    sigmas, shapes = data
    budget = fraction * sum(m * n for m, n in shapes.values())
    spectra_ = {t: _spectrum(sigmas[t], shapes[t]) for t in sigmas}
    if sum(m + n for m, n in shapes.values()) > budget:  # rank 1 everywhere does not fit
        with pytest.raises(UsageError, match="raise budget"):
            allocate(spectra_, fraction)
        return
    ranks = allocate(spectra_, fraction)
    assert set(ranks) == set(sigmas)
    assert _params(shapes, ranks) <= budget
    for t in sigmas:
        assert 1 <= ranks[t] <= _cap(*shapes[t]), t
    _check_kkt(sigmas, shapes, ranks, budget)


@settings(max_examples=40, deadline=None)
@given(data=spectra(), fraction=st.floats(0.01, 0.99))
def test_zero_tensors_get_rank_zero_and_count_in_no_budget(data, fraction):
    """A zero matrix gets rank 0 and stays dense, so the budget is F × the params of the non-zero ones."""
    sigmas, shapes = data
    nonzero = [t for t in sigmas if np.any(sigmas[t])]
    budget = fraction * sum(shapes[t][0] * shapes[t][1] for t in nonzero)
    spectra_ = {t: _spectrum(sigmas[t], shapes[t]) for t in sigmas}
    if sum(sum(shapes[t]) for t in nonzero) > budget:
        with pytest.raises(UsageError, match="raise budget"):
            allocate(spectra_, fraction)
        return
    ranks = allocate(spectra_, fraction)
    assert _params(shapes, ranks) <= budget
    for t in sigmas:
        if t in nonzero:
            assert 1 <= ranks[t] <= _cap(*shapes[t]), t
        else:
            assert ranks[t] == 0, t
    _check_kkt(sigmas, shapes, ranks, budget)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.permutations([(12, 12), (10, 14), (8, 16), (16, 8)]).map(lambda p: p[:3]),
    seed=st.integers(0, 2**31 - 1),
    fraction=st.floats(0.2, 0.9),
)
def test_allocation_is_optimal_when_every_term_costs_the_same(shapes, seed, fraction):
    """m + n = 24 for every tensor: the greedy takes the largest gains the budget allows, which is optimal."""
    rng = np.random.default_rng(seed)
    names = [f"t{i}" for i in range(len(shapes))]
    shapes = dict(zip(names, shapes, strict=True))
    sigmas = {t: np.sort(rng.exponential(size=min(shapes[t])) ** 2)[::-1] for t in names}
    budget = fraction * sum(m * n for m, n in shapes.values())
    ranks = allocate({t: _spectrum(sigmas[t], shapes[t]) for t in names}, fraction)
    assert _params(shapes, ranks) <= budget
    assert _objective(sigmas, ranks) == pytest.approx(_brute_force(sigmas, shapes, budget), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(4, 16), st.integers(4, 16)), min_size=2, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    fraction=st.floats(0.1, 0.9),
)
def test_allocation_is_optimal_for_the_params_it_uses(shapes, seed, fraction):
    """Costs differ between tensors: no ranks using at most the greedy's params beat it, and with the
    whole budget the optimum beats it by less than the best term it left out."""
    rng = np.random.default_rng(seed)
    names = [f"t{i}" for i in range(len(shapes))]
    shapes = dict(zip(names, shapes, strict=True))
    sigmas = {t: np.sort(rng.exponential(size=min(shapes[t])))[::-1] for t in names}
    budget = fraction * sum(m * n for m, n in shapes.values())
    spectra_ = {t: _spectrum(sigmas[t], shapes[t]) for t in names}
    if sum(m + n for m, n in shapes.values()) > budget:
        with pytest.raises(UsageError):
            allocate(spectra_, fraction)
        return
    ranks = allocate(spectra_, fraction)
    used = _params(shapes, ranks)
    assert used <= budget
    greedy = _objective(sigmas, ranks)
    assert greedy == pytest.approx(_brute_force(sigmas, shapes, used), abs=1e-12)
    optimum = _brute_force(sigmas, shapes, budget)
    next_gains = [_shares(sigmas[t])[ranks[t]] for t in names if ranks[t] < _cap(*shapes[t])]
    assert optimum <= greedy + 1e-12
    assert greedy - optimum <= max(next_gains, default=0.0) + 1e-12


def test_allocation_example_by_hand():
    """Two 10×10 tensors, 200 params; break-even allows ranks up to 4, each term costs 20.

    a: σ² = 64, 16, 4, 1, …  shares of terms 2…4: 16/85.3 = 0.188, 0.047, 0.012
    b: σ² = 9, 9, 9, 9, 9, … shares of terms 2…4: 9/45.05 = 0.200 each
    """
    a = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    b = np.array([3.0, 3.0, 3.0, 3.0, 3.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    spectra_ = {"a": _spectrum(a, (10, 10)), "b": _spectrum(b, (10, 10))}
    assert allocate(spectra_, 0.2) == {"a": 1, "b": 1}  # 40 params: rank 1 each, nothing left
    assert allocate(spectra_, 0.3) == {"a": 1, "b": 2}  # 60: one more term, b's 0.200 beats a's 0.188
    assert allocate(spectra_, 0.5) == {"a": 1, "b": 4}  # 100: three more, all of b's
    assert allocate(spectra_, 0.6) == {"a": 2, "b": 4}  # 120: then a's second term
    assert allocate(spectra_, 0.69) == {"a": 2, "b": 4}  # 138: not enough for a fifth term
    assert allocate(spectra_, 0.99) == {"a": 4, "b": 4}  # 198: everything up to break-even
    with pytest.raises(UsageError, match="raise budget"):
        allocate(spectra_, 0.19)  # 38 < 40


# --- the CLI ----------------------------------------------------------------------------------------


def _matrices(path) -> dict[str, torch.Tensor]:
    return {name: t for name, t in load(path).items() if t.is_floating_point() and t.dim() >= 2 and t.numel()}


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_compress_keeps_the_budget_on_demo(tmp_path, fraction):
    out = tmp_path / "out.safetensors"
    report = by_name(cli_json("compress", DEMO, "--budget", fraction, "--dtype", "float32", "-o", out))
    matrices = _matrices(DEMO)
    written = load(out)
    before = after = 0
    ranks = {}
    for name, w in matrices.items():
        assert f"{name}.B" in written, name  # every matrix of demo is factorized under these budgets
        b, a = written[f"{name}.B"], written[f"{name}.A"]
        m, n = as_matrix(w).shape
        ranks[name] = b.shape[1]
        assert b.shape == (m, ranks[name]) and a.shape == (ranks[name], n)
        assert ranks[name] >= 1
        before += w.numel()
        after += b.numel() + a.numel()
        assert report[name]["rank"] == ranks[name]
        assert report[name]["rel_error"] == pytest.approx(relative_error(w, b, a), rel=1e-5)
    assert after <= fraction * before
    sigmas = {t: singular_values(w) for t, w in matrices.items()}
    shapes = {t: as_matrix(w).shape for t, w in matrices.items()}
    _check_kkt(sigmas, shapes, ranks, fraction * before, rtol=1e-3)


def test_analyze_and_compress_allocate_the_same_ranks(tmp_path):
    fraction = 0.2
    analyzed = by_name(cli_json("analyze", DEMO, "--budget", fraction))
    out = tmp_path / "out.safetensors"
    cli_json("compress", DEMO, "--budget", fraction, "-o", out)
    written = load(out)
    matrices = _matrices(DEMO)
    params = sum(w.numel() for w in matrices.values())
    assert sum(analyzed[name]["params_after"] for name in matrices) <= fraction * params
    for name, w in matrices.items():
        rank = written[f"{name}.B"].shape[1]
        m, n = as_matrix(w).shape
        assert analyzed[name]["rank"] == rank, name
        assert analyzed[name]["params_after"] == rank * (m + n), name
        s = singular_values(w)
        assert analyzed[name]["rel_error"] == pytest.approx(math.sqrt((s[rank:] ** 2).sum() / (s**2).sum()), rel=1e-4)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.3, 0.5])
def test_budget_beats_every_uniform_rank_that_fits_in_it(tmp_path, fraction):
    """Σ_t relative squared error: the budget's ranks (read from the file) ≤ any uniform --rank R whose
    params (dense tensors counted whole, as --rank R keeps them) are ≤ the budget's."""
    out = tmp_path / "out.safetensors"
    cli_json("compress", DEMO, "--budget", fraction, "-o", out)
    written = load(out)
    matrices = _matrices(DEMO)
    sigmas = {t: singular_values(w) for t, w in matrices.items()}
    shapes = {t: as_matrix(w).shape for t, w in matrices.items()}
    ranks = {t: written[f"{t}.B"].shape[1] for t in matrices}
    budget_params = _params(shapes, ranks)
    budget_error = _objective(sigmas, ranks)

    uniform = []
    for rank in range(1, max(min(s) for s in shapes.values()) + 1):
        params = error = 0.0
        for t, (m, n) in shapes.items():
            r = min(rank, m, n)
            if r * (m + n) < m * n:
                params += r * (m + n)
                error += _shares(sigmas[t])[r:].sum()
            else:
                params += m * n  # kept dense: no error
        if params <= budget_params:
            uniform.append(error)
    assert uniform, "no uniform rank fits: pick a larger fraction"
    assert budget_error <= min(uniform) + 1e-9


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
    fraction = 0.3
    report = by_name(cli_json("compress", folder, "--budget", fraction))
    out = tmp_path / "ckpt.lowrank"
    before = after = 0
    ranks, sigmas, shapes = {}, {}, {}
    for shard, tensors in shards.items():
        written = load(out / shard)
        for name, w in tensors.items():
            b, a = written[f"{name}.B"], written[f"{name}.A"]
            before += w.numel()
            after += b.numel() + a.numel()
            ranks[name], sigmas[name], shapes[name] = b.shape[1], singular_values(w), tuple(w.shape)
            assert report[name]["rank"] == ranks[name] >= 1
    assert after <= fraction * before
    _check_kkt(sigmas, shapes, ranks, fraction * before, rtol=1e-3)
