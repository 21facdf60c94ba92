"""`lowrank compress`: rank policies, when a tensor is factorized, factor dtypes, what is copied."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    FACTOR_DTYPE,
    TORCH_DTYPE,
    as_matrix,
    by_name,
    cli,
    cli_json,
    energy_rank,
    geometric,
    load,
    low_rank,
    raw_tensors,
    relative_error,
    save,
    sha256,
    singular_values,
    table_rows,
    tail_errors,
    with_spectrum,
)

M, N = 40, 24  # r·(m + n) < m·n  ⇔  r < 15


@pytest.fixture
def geometric_file(tmp_path):
    """W (40×24) with σ_i = 0.7^i: full rank, every energy / error threshold far from a boundary."""
    w = with_spectrum(M, N, geometric(N), seed=1)
    return save(tmp_path / "geo.safetensors", {"W": w}), w


def _assert_factors(path, name, rank, m, n):
    factors = load(path)
    assert name not in factors
    assert tuple(factors[f"{name}.B"].shape) == (m, rank)
    assert tuple(factors[f"{name}.A"].shape) == (rank, n)
    return factors[f"{name}.B"], factors[f"{name}.A"]


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_energy_picks_smallest_rank_keeping_fraction(geometric_file, tmp_path, fraction):
    source, w = geometric_file
    s = singular_values(w)
    expected = energy_rank(s, fraction)

    out = tmp_path / "out.safetensors"
    t = by_name(cli_json("compress", source, "--energy", fraction, "-o", out))["W"]
    assert t["rank"] == expected
    if expected * (M + N) < M * N:
        assert t["status"] == "factorized"
        _assert_factors(out, "W", expected, M, N)
    else:
        assert t["status"] == "dense"
        assert raw_tensors(out)["W"] == raw_tensors(source)["W"]


@pytest.mark.parametrize("max_error", [0.5, 0.3, 0.1, 0.03, 0.01, 0.0])
def test_max_error_picks_smallest_rank_within_error(geometric_file, tmp_path, max_error):
    source, w = geometric_file
    errors = tail_errors(singular_values(w))
    expected = next(r for r in range(len(errors)) if errors[r] <= max_error)

    out = tmp_path / "out.safetensors"
    t = by_name(cli_json("compress", source, "--max-error", max_error, "-o", out))["W"]
    assert t["rank"] == expected
    if expected * (M + N) < M * N:
        assert t["status"] == "factorized"
        b, a = _assert_factors(out, "W", expected, M, N)
        measured = relative_error(w, b, a)
        assert measured <= max_error
        assert t["rel_error"] == pytest.approx(measured, rel=1e-6)
    else:
        assert t["status"] == "dense"
        assert raw_tensors(out)["W"] == raw_tensors(source)["W"]


def test_rank_above_min_dim_is_clamped_and_kept_dense(geometric_file, tmp_path):
    source, _ = geometric_file
    out = tmp_path / "out.safetensors"
    t = by_name(cli_json("compress", source, "--rank", 50, "-o", out))["W"]
    assert t["rank"] == min(M, N)
    assert t["status"] == "dense"
    assert "clamp" in t["reason"] and str(min(M, N)) in t["reason"]
    assert t["params_after"] == M * N
    assert t["rel_error"] == 0.0
    assert raw_tensors(out)["W"] == raw_tensors(source)["W"]
    assert set(load(out)) == {"W"}


@pytest.mark.parametrize(
    ("m", "n", "rank"),
    [(10, 10, 4), (10, 10, 5), (10, 10, 6), (12, 6, 3), (12, 6, 4), (7, 3, 2), (7, 3, 1), (1, 8, 1), (8, 1, 1)],
)
def test_factorized_only_when_factors_hold_fewer_params(tmp_path, m, n, rank):
    w = low_rank(m, n, min(m, n), seed=m * 100 + n)  # full rank
    source = save(tmp_path / "w.safetensors", {"W": w})
    out = tmp_path / "out.safetensors"
    t = by_name(cli_json("compress", source, "--rank", rank, "-o", out))["W"]
    assert t["rank"] == rank
    if rank * (m + n) < m * n:
        assert t["status"] == "factorized"
        assert t["params_after"] == rank * (m + n)
        b, a = _assert_factors(out, "W", rank, m, n)
        assert b.numel() + a.numel() == rank * (m + n)
    else:
        assert t["status"] == "dense"
        assert t["reason"]
        assert t["params_after"] == m * n
        assert set(load(out)) == {"W"}
        assert raw_tensors(out)["W"] == raw_tensors(source)["W"]


@pytest.mark.parametrize("factor_dtype", ["keep", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("input_dtype", ["F32", "F16", "BF16", "F64"])
def test_factor_dtype_and_error_measured_on_stored_factors(tmp_path, input_dtype, factor_dtype):
    w = with_spectrum(24, 16, geometric(16, 0.6), seed=3, dtype=TORCH_DTYPE[input_dtype])
    source = save(tmp_path / "w.safetensors", {"W": w, "bias": torch.ones(24, dtype=TORCH_DTYPE[input_dtype])})
    out = tmp_path / "out.safetensors"
    report = cli_json("compress", source, "--rank", 4, "--dtype", factor_dtype, "-o", out)
    t = by_name(report)["W"]
    assert t["status"] == "factorized"
    assert t["dtype"] == input_dtype

    stored = input_dtype if factor_dtype == "keep" else FACTOR_DTYPE[factor_dtype]
    raw = raw_tensors(out)
    assert raw["W.B"][0] == stored and raw["W.A"][0] == stored
    b, a = _assert_factors(out, "W", 4, 24, 16)
    assert b.dtype == TORCH_DTYPE[stored] and a.dtype == TORCH_DTYPE[stored]
    assert t["rel_error"] == pytest.approx(relative_error(w, b, a), rel=1e-6, abs=1e-12)
    if factor_dtype == "keep":
        assert raw["bias"] == raw_tensors(source)["bias"]
    else:  # --dtype covers every float tensor, the bias too
        assert raw["bias"][0] == stored

    # expand gives back the input dtype
    dense = tmp_path / "dense.safetensors"
    assert cli("expand", out, "-o", dense).exit_code == 0
    expanded = load(dense)
    assert expanded["W"].dtype == w.dtype and expanded["W"].shape == w.shape


def test_float16_factors_that_overflow_are_not_written_silently(tmp_path):
    """σ_max ≈ 10⁶: B = U·diag(σ) does not fit in float16 (max 65504)."""
    w = with_spectrum(10, 10, [1e6, 5e5, 1e3, 1.0], seed=4)
    source = save(tmp_path / "big.safetensors", {"W": w})
    out = tmp_path / "out.safetensors"
    result = cli("compress", source, "--rank", 2, "--dtype", "float16", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    t = by_name(json.loads(result.stdout))["W"]
    assert t["status"] == "factorized" and t["rank"] == 2
    stored = load(out)  # written, with every stored number finite and the error reported truthfully
    assert stored["W.B"].dtype == stored["W.A"].dtype == torch.float16
    assert all(bool(torch.isfinite(v.float()).all()) for v in stored.values())
    assert t["rel_error"] == pytest.approx(relative_error(w, stored["W.B"], stored["W.A"]), rel=1e-6)


def test_zero_matrix_is_rank_zero_and_kept_dense(tmp_path):
    source = save(tmp_path / "z.safetensors", {"Z": torch.zeros(6, 8)})
    out = tmp_path / "out.safetensors"
    result = cli("compress", source, "--rank", 2, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    t = by_name(json.loads(result.stdout))["Z"]
    assert t["numerical_rank"] == 0
    assert t["rank"] == 0
    assert t["status"] == "dense"
    assert t["reason"]
    assert t["params_after"] == 48
    assert raw_tensors(out)["Z"] == raw_tensors(source)["Z"]


def test_non_matrices_are_copied_unchanged_and_listed_as_skipped(tmp_path):
    tensors = {
        "W": low_rank(12, 10, 2, seed=5),
        "bias": torch.randn(12),
        "ids": torch.arange(7, dtype=torch.int64),
        "table": torch.arange(20, dtype=torch.int64).reshape(4, 5),
        "mask": torch.tensor([[True, False, True], [False, False, True]]),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(3.5),
    }
    source = save(tmp_path / "mixed.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    report = by_name(cli_json("compress", source, "--rank", 2, "-o", out))
    assert set(report) == set(tensors)
    assert report["W"]["status"] == "factorized"
    raw_in, raw_out = raw_tensors(source), raw_tensors(out)
    for name, tensor in tensors.items():
        if name == "W":
            continue
        t = report[name]
        assert t["status"] == "skipped", name
        assert isinstance(t["reason"], str) and t["reason"], name
        assert t["params"] == tensor.numel(), name
        assert raw_out[name] == raw_in[name], name

    dense = tmp_path / "dense.safetensors"
    assert cli("expand", out, "-o", dense).exit_code == 0
    raw_dense = raw_tensors(dense)
    expanded = load(dense)
    for name, tensor in tensors.items():
        assert expanded[name].dtype == tensor.dtype and expanded[name].shape == tensor.shape, name
        if name != "W":
            assert raw_dense[name] == raw_in[name], name
            assert torch.equal(expanded[name], tensor), name


def test_conv_kernel_is_factorized_as_out_by_in_kh_kw(tmp_path):
    kernel = low_rank(8, 4 * 3 * 3, 2, seed=6).reshape(8, 4, 3, 3)
    source = save(tmp_path / "conv.safetensors", {"conv.weight": kernel, "conv.bias": torch.randn(8)})
    out = tmp_path / "out.safetensors"
    t = by_name(cli_json("compress", source, "--rank", 2, "-o", out))["conv.weight"]
    assert t["status"] == "factorized"
    assert t["shape"] == [8, 4, 3, 3]
    assert t["params"] == 8 * 36
    assert t["params_after"] == 2 * (8 + 36)
    b, a = _assert_factors(out, "conv.weight", 2, 8, 36)
    assert relative_error(kernel, b, a) < 1e-5

    dense = tmp_path / "dense.safetensors"
    assert cli("expand", out, "-o", dense).exit_code == 0
    restored = load(dense)["conv.weight"]
    assert restored.shape == (8, 4, 3, 3)
    assert float(torch.linalg.vector_norm(restored - kernel) / torch.linalg.vector_norm(kernel)) < 1e-5


@pytest.mark.parametrize(
    ("options", "factorized"),
    [
        (["--include", "enc.*"], {"enc.0.weight", "enc.1.weight"}),
        (["--exclude", "*.1.*"], {"enc.0.weight", "dec.0.weight"}),
        (["--include", "enc.*", "--exclude", "enc.1.*"], {"enc.0.weight"}),
        (["--include", "enc.*", "--include", "dec.*"], {"enc.0.weight", "enc.1.weight", "dec.0.weight"}),
        ([], {"enc.0.weight", "enc.1.weight", "dec.0.weight"}),
    ],
)
def test_include_exclude_select_tensors(tmp_path, options, factorized):
    names = ["enc.0.weight", "enc.1.weight", "dec.0.weight"]
    tensors = {name: low_rank(12, 10, 10, seed=i) for i, name in enumerate(names)}
    source = save(tmp_path / "m.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    report = by_name(cli_json("compress", source, "--rank", 2, "-o", out, *options))
    raw_in, raw_out = raw_tensors(source), raw_tensors(out)
    for name in names:
        if name in factorized:
            assert report[name]["status"] == "factorized", name
            _assert_factors(out, name, 2, 12, 10)
        else:
            assert report[name]["status"] == "skipped", name
            assert report[name]["reason"], name
            assert raw_out[name] == raw_in[name], name
            assert f"{name}.B" not in raw_out


def test_fail_above_gates_on_measured_error(tmp_path):
    w = with_spectrum(12, 10, [4.0, 3.0, 1.0, 0.5, 0.25], seed=7)
    source = save(tmp_path / "w.safetensors", {"W": w, "exact": low_rank(12, 10, 2, seed=8)})
    error = tail_errors(singular_values(w))[2]  # ≈ 0.22, the worst tensor's error at rank 2

    out = tmp_path / "gate.safetensors"
    result = cli("compress", source, "--rank", 2, "-o", out, "--fail-above", error * 0.9)
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert "'W'" in result.stderr

    result = cli("compress", source, "--rank", 2, "-o", out, "--force", "--fail-above", error * 1.1)
    assert result.exit_code == 0, result.stderr


def test_default_output_is_beside_the_input(tmp_path):
    source = save(tmp_path / "model.safetensors", {"W": low_rank(12, 10, 2)})
    result = cli("compress", source, "--rank", 2)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "model.lowrank.safetensors"
    assert out.is_file()
    assert set(load(out)) == {"W.B", "W.A"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.lowrank.safetensors", "model.safetensors"]


def test_input_is_unchanged(tmp_path):
    source = save(tmp_path / "m.safetensors", {"W": low_rank(12, 10, 3), "b": torch.randn(12)}, {"format": "pt"})
    before = sha256(source)
    assert cli("compress", source, "--energy", 0.9).exit_code == 0
    assert sha256(source) == before


@pytest.fixture
def model_file(tmp_path):
    """A small model-like checkpoint with tensors above 1,000 params, so thousands separators show."""
    tensors = {
        "layers.0.weight": with_spectrum(200, 120, geometric(120, 0.9), seed=10),
        "layers.0.bias": torch.randn(200),
        "layers.1.weight": with_spectrum(96, 64, geometric(64, 0.8), seed=11).to(torch.bfloat16),
        "layers.2.weight": low_rank(30, 30, 30, seed=12),  # energy 0.95 needs most of it: dense
        "position_ids": torch.arange(64, dtype=torch.int64),
        "conv.weight": low_rank(16, 8 * 3 * 3, 3, seed=13).reshape(16, 8, 3, 3),
    }
    return save(tmp_path / "model.safetensors", tensors, {"format": "pt"}), tensors


def test_json_totals_are_the_sums(model_file, tmp_path):
    source, tensors = model_file
    out = tmp_path / "out.safetensors"
    result = cli("compress", source, "--energy", 0.95, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # exactly one JSON document
    rows = by_name(report)
    assert set(rows) == set(tensors)
    stored = load(out)

    expected_after = {}
    for name, tensor in tensors.items():
        t = rows[name]
        for key in (
            "name",
            "shape",
            "dtype",
            "params",
            "status",
            "reason",
            "rank",
            "numerical_rank",
            "stable_rank",
            "rel_error",
            "params_after",
        ):
            assert key in t, key
        assert t["shape"] == list(tensor.shape)
        assert t["params"] == tensor.numel()
        if t["status"] == "factorized":
            m, n = as_matrix(tensor).shape
            b, a = stored[f"{name}.B"], stored[f"{name}.A"]
            assert b.numel() + a.numel() == t["rank"] * (m + n)
            expected_after[name] = b.numel() + a.numel()
            assert t["rel_error"] == pytest.approx(relative_error(tensor, b, a), rel=1e-6)
        else:
            assert name in stored
            expected_after[name] = tensor.numel()
        if t["status"] != "skipped":  # skipped tensors: see test_skipped_tensors_report_params_after
            assert t["params_after"] == expected_after[name], name
    assert rows["layers.2.weight"]["status"] == "dense"
    assert rows["position_ids"]["status"] == "skipped"
    assert {"layers.0.weight", "layers.1.weight", "conv.weight"} <= {
        n for n, t in rows.items() if t["status"] == "factorized"
    }

    params = sum(t.numel() for t in tensors.values())
    params_after = sum(expected_after.values())
    assert report["totals"]["params"] == params
    assert report["totals"]["params_after"] == params_after
    assert report["totals"]["savings"] == pytest.approx(1 - params_after / params, rel=1e-12)


def test_json_agrees_with_table(model_file, tmp_path):
    source, tensors = model_file
    report = cli_json("compress", source, "--energy", 0.95, "-o", tmp_path / "a.safetensors")
    result = cli("compress", source, "--energy", 0.95, "-o", tmp_path / "b.safetensors")
    assert result.exit_code == 0, result.stderr
    rows = table_rows(result.stdout)
    for t in report["tensors"]:
        row = rows[t["name"]]
        assert row["status"] == t["status"]
        assert row["dtype"] == t["dtype"]
        assert row["shape"] == "×".join(str(d) for d in tensors[t["name"]].shape)
        assert row["params"] == f"{tensors[t['name']].numel():,}"
        if t["status"] != "skipped":  # skipped tensors: see test_skipped_tensors_report_params_after
            assert row["params after"] == f"{t['params_after']:,}"
        if t["status"] == "factorized":
            assert row["rank"] == str(t["rank"])
            assert float(row["rel. error"]) == pytest.approx(t["rel_error"], rel=5e-3)
    total = rows["total"]
    assert total["params"] == f"{sum(x.numel() for x in tensors.values()):,}"
    assert total["params after"] == f"{report['totals']['params_after']:,}"
    assert math.isclose(float(total["saving"].rstrip("%")), 100 * report["totals"]["savings"], abs_tol=0.051)


def test_skipped_tensors_report_params_after(model_file, tmp_path):
    """A skipped tensor is copied, so it keeps its params: the JSON says so, like the table and totals."""
    source, tensors = model_file
    report = cli_json("compress", source, "--energy", 0.95, "-o", tmp_path / "a.safetensors")
    result = cli("compress", source, "--energy", 0.95, "-o", tmp_path / "b.safetensors")
    rows = table_rows(result.stdout)
    skipped = [t for t in report["tensors"] if t["status"] == "skipped"]
    assert {t["name"] for t in skipped} == {"layers.0.bias", "position_ids"}
    for t in skipped:
        numel = tensors[t["name"]].numel()
        assert rows[t["name"]]["params after"] == f"{numel:,}"
        assert t["params_after"] == numel, t


@pytest.mark.parametrize("policy", [["--max-error", "0.2"], ["--energy", "0.95"], ["--rank", "6"]], ids=" ".join)
def test_randomized_svd_is_reproducible_and_keeps_the_promise(tmp_path, policy):
    w = with_spectrum(120, 80, geometric(80, 0.93), seed=14)
    source = save(tmp_path / "w.safetensors", {"W": w})
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    options = ["--method", "randomized", "--seed", "7", *policy]
    t = by_name(cli_json("compress", source, *options, "-o", first))["W"]
    cli_json("compress", source, *options, "-o", second)
    assert raw_tensors(first) == raw_tensors(second)  # same seed, same factors

    assert t["status"] == "factorized"
    b, a = _assert_factors(first, "W", t["rank"], 120, 80)
    measured = relative_error(w, b, a)
    assert t["rel_error"] == pytest.approx(measured, rel=1e-6)
    assert t["params_after"] == t["rank"] * (120 + 80)
    s = singular_values(w)
    optimal = tail_errors(s)
    flag, value = policy[0], float(policy[1])
    assert measured >= optimal[t["rank"]] - 1e-6  # no rank-r factors beat the truncated SVD
    if flag == "--max-error":
        assert measured <= value
        assert t["rank"] >= next(r for r in range(len(optimal)) if optimal[r] <= value)
    elif flag == "--energy":
        assert measured <= math.sqrt(1 - value)
        assert t["rank"] >= energy_rank(s, value)
    else:
        assert t["rank"] == 6
        assert measured <= optimal[6] * 1.01


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_randomized_cannot_reach_the_target_below_break_even(tmp_path, method):
    """A flat spectrum needs nearly full rank for 1 % error: no factors pay off, the tensor stays dense."""
    w = low_rank(40, 30, 30, seed=15)
    source = save(tmp_path / "w.safetensors", {"W": w})
    out = tmp_path / "out.safetensors"
    t = by_name(cli_json("compress", source, "--max-error", 0.01, "--method", method, "-o", out))["W"]
    assert t["status"] == "dense" and t["reason"]
    assert t["params_after"] == 40 * 30
    assert raw_tensors(out)["W"] == raw_tensors(source)["W"]


def test_a_matrix_kept_whole_stays_in_its_dtype_when_the_cast_would_break_max_error(tmp_path):
    # no bfloat16 factors meet 0.001 on a full-rank 64×64 matrix, and its bfloat16 cast misses it too
    # (relative rounding ~2⁻⁹): it is written in float32, so the bound holds on what is written
    generator = torch.Generator().manual_seed(0)
    w, v = torch.randn(64, 64, generator=generator), torch.randn(48, 64, generator=generator)
    source = save(tmp_path / "m.safetensors", {"w": w, "v": v})
    out = tmp_path / "m.bf16.safetensors"
    result = cli(
        "compress", source, "-o", out, "--max-error", "0.001", "--dtype", "bfloat16", "--include", "w", "--json"
    )
    assert result.exit_code == 0, result.output
    cast_error = float((w - w.bfloat16().float()).norm() / w.norm())
    assert cast_error > 0.001  # what a bfloat16 copy would have broken
    written = load(out)
    assert written["w"].dtype == torch.float32 and torch.equal(written["w"], w)
    assert written["v"].dtype == torch.bfloat16  # not selected: no bound applies, cast as asked
    row = by_name(json.loads(result.stdout))["w"]
    recomputed = float((written["w"].double() - w.double()).norm() / w.double().norm())
    assert row["rel_error"] == recomputed == 0.0 and row["status"] == "dense"
    assert "kept in float32" in row["reason"] and "0.001" in row["reason"]


def test_compress_notes_the_factors_that_keep_too_many_params_to_run_faster(tmp_path):
    # 40×24: factors of rank r hold r·64 of the 960 params; more than 80 % from r = 13 (832 > 768) on
    w = low_rank(M, N, N, seed=3)
    path = save(tmp_path / "w.safetensors", {"fast": w, "slow": w.clone(), "slower": w.clone()})
    fast = cli_json("compress", path, "--rank", 12, "--exclude", "slow*", "-o", tmp_path / "a.safetensors")
    assert "notes" not in fast["options"]  # 768 = 80 %: not more
    result = cli("compress", path, "--rank", 13, "--json", "-o", tmp_path / "b.safetensors")
    assert result.exit_code == 0
    (note,) = json.loads(result.stdout)["options"]["notes"]
    assert note.startswith("3 factorized tensors ('fast', 'slow', 'slower') keep more than 80% of their params")
    assert f"(up to {13 * (M + N) / (M * N):.0%})" in note
    assert f"note: {note}" in result.stderr


def test_objective_speed_keeps_whole_the_matrices_whose_factors_would_run_hardly_faster(tmp_path):
    w = low_rank(M, N, N, seed=4)
    path = save(tmp_path / "w.safetensors", {"W": w})
    speed_rank = int(0.8 * M * N) // (M + N)  # 12: factors hold 768 ≤ 80 % of 960 params
    kept = cli_json("compress", path, "--rank", speed_rank, "--objective", "speed", "-o", tmp_path / "a.safetensors")
    assert by_name(kept)["W"]["status"] == "factorized" and kept["options"]["objective"] == "speed"
    report = cli_json(
        "compress", path, "--rank", speed_rank + 1, "--objective", "speed", "-o", tmp_path / "b.safetensors"
    )
    row = by_name(report)["W"]
    assert row["status"] == "dense" and row["params_after"] == M * N
    assert (
        row["reason"]
        == f"rank 13 keeps {13 * (M + N):,} of {M * N:,} params, more than 80%: factors would run hardly faster"
    )
    assert torch.equal(load(tmp_path / "b.safetensors")["W"], w)  # stored whole, unchanged
    plain = cli_json("compress", path, "--rank", speed_rank + 1, "-o", tmp_path / "c.safetensors")
    assert by_name(plain)["W"]["status"] == "factorized" and plain["options"]["objective"] == "params"
    # an error target that needs more than the speed rank: dense too, and said why
    target = float(tail_errors(singular_values(w))[speed_rank + 1])  # met at rank 13, not at 12
    report = cli_json("compress", path, "--max-error", target, "--objective", "speed", "-o", tmp_path / "d.safetensors")
    assert by_name(report)["W"]["status"] == "dense"
    assert by_name(report)["W"]["reason"] == row["reason"]


def test_objective_speed_budget_gives_no_rank_past_the_speed_rank(tmp_path):
    # decaying spectra, where a --budget 0.9 spends its params on ranks 13 and 14 of 24
    weights = {f"w{i}": with_spectrum(M, N, geometric(N, 0.8), seed=i) for i in range(3)}
    path = save(tmp_path / "m.safetensors", weights)
    plain = cli_json("compress", path, "--budget", 0.9, "-o", tmp_path / "a.safetensors")
    speed = cli_json("compress", path, "--budget", 0.9, "--objective", "speed", "-o", tmp_path / "b.safetensors")
    speed_rank = int(0.8 * M * N) // (M + N)
    assert max(t["rank"] for t in plain["tensors"] if t["status"] == "factorized") > speed_rank
    factorized = [t for t in speed["tensors"] if t["status"] == "factorized"]
    assert factorized and all(t["rank"] <= speed_rank for t in factorized)
    stored = load(tmp_path / "b.safetensors")
    held = sum(t.numel() for t in stored.values())
    assert held == speed["totals"]["params_after"] <= 0.9 * len(weights) * M * N
    assert "notes" not in speed["options"] and len(plain["options"]["notes"]) == 1


def test_objective_is_params_or_speed_and_speed_does_not_take_a_fidelity(tmp_path):
    path = save(tmp_path / "w.safetensors", {"W": low_rank(M, N, 4)})
    result = cli("compress", path, "--rank", 2, "--objective", "fast", "-o", tmp_path / "a.safetensors")
    assert result.exit_code == 2 and "fast" in result.stderr and not (tmp_path / "a.safetensors").exists()
    import lowrank_cli
    from lowrank_cli.errors import UsageError

    with pytest.raises(UsageError, match="objective speed does not combine with fidelity"):
        lowrank_cli.compress(path, tmp_path / "b", fidelity=0.9, eval_text=path, objective="speed")
