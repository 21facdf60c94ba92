"""`lowrank analyze`: numerical and stable rank, energy ranks, policies, the quality gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    TORCH_DTYPE,
    by_name,
    cli,
    cli_json,
    energy_rank,
    geometric,
    low_rank,
    numerical_rank,
    save,
    sha256,
    singular_values,
    table_rows,
    tail_errors,
    with_spectrum,
)


@pytest.fixture
def spectra_file(tmp_path):
    tensors = {
        "geo": with_spectrum(40, 24, geometric(24), seed=1),
        "gauss": low_rank(30, 20, 20, seed=2),
        "rank3": low_rank(25, 35, 3, seed=3),
        "wide64": low_rank(8, 50, 5, seed=4, dtype=torch.float64),
        "half": with_spectrum(32, 16, geometric(16, 0.5), seed=5, dtype=torch.float16),
        "brain": low_rank(20, 12, 4, seed=6, dtype=torch.bfloat16),
        "conv": low_rank(16, 8 * 3 * 3, 6, seed=7).reshape(16, 8, 3, 3),
    }
    return save(tmp_path / "spectra.safetensors", tensors), tensors


def test_numerical_rank_matches_numpy_matrix_rank(spectra_file):
    source, tensors = spectra_file
    report = by_name(cli_json("analyze", source))
    for name, tensor in tensors.items():
        assert report[name]["numerical_rank"] == numerical_rank(tensor), name
        assert report[name]["status"] == "analyzed"


def test_stable_rank_and_energy_ranks_match_numpy(spectra_file):
    source, tensors = spectra_file
    report = by_name(cli_json("analyze", source))
    for name, tensor in tensors.items():
        s = singular_values(tensor)
        t = report[name]
        frobenius_squared = float(np.sum(tensor.to(torch.float64).numpy() ** 2))
        assert t["stable_rank"] == pytest.approx(frobenius_squared / s[0] ** 2, rel=1e-4), name
        assert t["rank_90"] == energy_rank(s, 0.9), name
        assert t["rank_99"] == energy_rank(s, 0.99), name
        assert t["rank_999"] == energy_rank(s, 0.999), name


def test_energy_ranks_of_a_known_spectrum(tmp_path):
    # σ² = 50, 30, 15, 4, 0.9, 0.1 (Σ = 100): 90 % at r = 3, 99 % at r = 4, 99.9 % at r = 5
    sigma = np.sqrt([50, 30, 15, 4, 0.9, 0.1])
    source = save(tmp_path / "k.safetensors", {"W": with_spectrum(20, 10, sigma, seed=8, dtype=torch.float64)})
    t = by_name(cli_json("analyze", source))["W"]
    assert (t["rank_90"], t["rank_99"], t["rank_999"]) == (3, 4, 5)
    assert t["numerical_rank"] == 6
    assert t["stable_rank"] == pytest.approx(100 / 50, rel=1e-9)


def test_rtol_sets_the_numerical_rank_threshold(tmp_path):
    sigma = [1.0, 1e-2, 1e-3, 1e-5, 1e-7]
    w = with_spectrum(12, 9, sigma, seed=9, dtype=torch.float64)
    source = save(tmp_path / "r.safetensors", {"W": w})
    s = singular_values(w)
    for rtol in (1e-1, 5e-3, 1e-4, 1e-6):
        t = by_name(cli_json("analyze", source, "--rtol", rtol))["W"]
        assert t["numerical_rank"] == int(np.count_nonzero(s > s[0] * rtol)), rtol
    assert by_name(cli_json("analyze", source))["W"]["numerical_rank"] == numerical_rank(w) == 5


@pytest.mark.parametrize("policy", [["--rank", "3"], ["--energy", "0.9"], ["--max-error", "0.1"]])
def test_policy_reports_optimal_error_and_params(spectra_file, policy):
    source, tensors = spectra_file
    report = by_name(cli_json("analyze", source, *policy))
    for name, tensor in tensors.items():
        t = report[name]
        m, n = tensor.shape[0], tensor.numel() // tensor.shape[0]
        s = singular_values(tensor)
        errors = tail_errors(s)
        flag, value = policy
        if flag == "--rank":
            rank = min(int(value), min(m, n))
        elif flag == "--energy":
            rank = energy_rank(s, float(value))
        else:
            rank = next(r for r in range(len(errors)) if errors[r] <= float(value))
        assert t["rank"] == rank, name
        if rank * (m + n) < m * n:
            assert t["status"] == "factorized", name
            assert t["params_after"] == rank * (m + n), name
            assert t["rel_error"] == pytest.approx(errors[rank], rel=1e-4, abs=1e-6), name
        else:
            assert t["status"] == "dense", name
            assert t["params_after"] == m * n, name


def test_analyze_does_not_write_anything(spectra_file, tmp_path):
    source, _ = spectra_file
    before = sha256(source)
    assert cli("analyze", source, "--rank", 2).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == [source.name]
    assert sha256(source) == before


def test_fail_above(tmp_path):
    w = with_spectrum(12, 10, [4.0, 3.0, 1.0, 0.5, 0.25], seed=10)
    source = save(tmp_path / "w.safetensors", {"W": w, "exact": low_rank(12, 10, 2, seed=11)})
    error = tail_errors(singular_values(w))[2]

    result = cli("analyze", source, "--rank", 2, "--fail-above", error * 0.9)
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert "'W'" in result.stderr
    assert cli("analyze", source, "--rank", 2, "--fail-above", error * 1.1).exit_code == 0

    result = cli("analyze", source, "--rank", 2, "--fail-above", error * 0.9, "--json")
    assert result.exit_code == 3
    json.loads(result.stdout)  # the data still comes out, as one document


def test_fail_above_needs_a_policy(tmp_path):
    source = save(tmp_path / "w.safetensors", {"W": low_rank(12, 10, 2)})
    result = cli("analyze", source, "--fail-above", 0.1)
    assert result.exit_code == 2
    assert "--fail-above" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("options", "selected"),
    [
        (["--include", "enc.*"], {"enc.0.weight", "enc.1.weight"}),
        (["--exclude", "enc.1.*"], {"enc.0.weight", "dec.0.weight"}),
        (["--include", "*.0.*", "--exclude", "dec.*"], {"enc.0.weight"}),
    ],
)
def test_include_exclude(tmp_path, options, selected):
    names = ["enc.0.weight", "enc.1.weight", "dec.0.weight"]
    source = save(tmp_path / "m.safetensors", {name: low_rank(12, 10, 3 + i, seed=i) for i, name in enumerate(names)})
    report = by_name(cli_json("analyze", source, *options))
    analyzed = {name for name, t in report.items() if t["status"] == "analyzed"}
    assert analyzed == selected
    for name in selected:
        assert report[name]["numerical_rank"] == 3 + names.index(name)


def test_several_files_in_one_report(tmp_path):
    a = save(tmp_path / "a.safetensors", {"x.weight": low_rank(12, 10, 2, seed=1)})
    b = save(tmp_path / "b.safetensors", {"y.weight": low_rank(9, 7, 4, seed=2), "y.bias": torch.randn(9)})
    report = cli_json("analyze", a, b)
    rows = by_name(report)
    assert set(rows) == {"x.weight", "y.weight", "y.bias"}
    assert rows["x.weight"]["numerical_rank"] == 2 and rows["y.weight"]["numerical_rank"] == 4
    assert report["totals"]["params"] == 120 + 63 + 9


def test_json_agrees_with_table(spectra_file):
    source, tensors = spectra_file
    report = cli_json("analyze", source, "--rank", 4)
    result = cli("analyze", source, "--rank", 4)
    assert result.exit_code == 0, result.stderr
    rows = table_rows(result.stdout)
    for t in report["tensors"]:
        row = rows[t["name"]]
        assert row["params"] == f"{tensors[t['name']].numel():,}"
        assert row["num. rank"] == str(numerical_rank(tensors[t["name"]])) == str(t["numerical_rank"])
        assert float(row["stable rank"]) == pytest.approx(t["stable_rank"], abs=0.051)
        assert (row["r@90%"], row["r@99%"], row["r@99.9%"]) == tuple(
            str(t[k]) for k in ("rank_90", "rank_99", "rank_999")
        )
        assert row["rank"] == str(t["rank"])
        assert row["params after"] == f"{t['params_after']:,}"
    assert rows["total"]["params"] == f"{sum(x.numel() for x in tensors.values()):,}"
    assert rows["total"]["params after"] == f"{report['totals']['params_after']:,}"


@pytest.mark.parametrize("scale", [2.0**-560, 2.0**530], ids=["tiny", "huge"])
def test_float64_spectra_do_not_depend_on_scale(tmp_path, scale):
    """Scaling a float64 matrix by a power of two changes no rank; tiny or huge but finite values are valid input."""
    w = with_spectrum(12, 9, [3.0, 2.0, 1.0, 0.5], seed=12, dtype=TORCH_DTYPE["F64"])
    source = save(tmp_path / "s.safetensors", {"W": w * scale})
    result = cli("analyze", source, "--rank", 2, "--json")
    assert result.exception is None, repr(result.exception)
    t = by_name(json.loads(result.stdout))["W"]
    s = singular_values(w)
    assert t["numerical_rank"] == numerical_rank(w * scale) == 4
    assert t["stable_rank"] == pytest.approx(float(np.sum(s**2) / s[0] ** 2), rel=1e-9)
    assert (t["rank_90"], t["rank_99"], t["rank_999"]) == tuple(energy_rank(s, f) for f in (0.9, 0.99, 0.999))
    assert t["status"] == "factorized" and t["rank"] == 2
    assert t["rel_error"] == pytest.approx(tail_errors(s)[2], rel=1e-9)


def test_names_with_brackets_are_shown_verbatim(tmp_path):
    """Tensor names are data, not rich markup, in tables and on stderr."""
    w = with_spectrum(12, 10, [4.0, 3.0, 1.0, 0.5], seed=13)
    source = save(tmp_path / "m.safetensors", {"experts[gate].weight": w, "experts[/up].weight": w.clone()})
    result = cli("analyze", source, "--rank", 1, "--fail-above", 0.01)
    assert result.exit_code == 3, (result.exception, result.stderr)
    rows = table_rows(result.stdout)
    assert {"experts[gate].weight", "experts[/up].weight"} <= set(rows)
    assert "experts[gate].weight" in result.stderr or "experts[/up].weight" in result.stderr
