"""`analyze --plot` (the spectra as a picture) and `analyze --csv`."""

from __future__ import annotations

import csv
import io
import re
import struct
import sys

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, by_name, cli, cli_json, geometric, load, save, with_spectrum

import lowrank_cli
from lowrank_cli.ops.plot import layer_kind


def _llama_like(tmp_path, *, embeddings: bool = False):
    """Two layers of attention and MLP projections (and, if asked, an embedding table) with decaying spectra."""
    tensors = {}
    for layer in range(2):
        for i, name in enumerate(("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")):
            seed = 10 * layer + i
            tensors[f"model.layers.{layer}.{name}.weight"] = with_spectrum(48, 32, geometric(32, 0.8), seed=seed)
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(32)
    if embeddings:
        tensors["model.embed_tokens.weight"] = with_spectrum(100, 32, geometric(32, 0.9), seed=99)
    return save(tmp_path / "model.safetensors", tensors)


def _png_size(path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk, the first after the 8-byte signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize(
    ("embeddings", "size"),
    [(False, (1200, 400)), (True, (1200, 800))],  # panels of 6 × 4 inches at 100 dpi, two a row
)
def test_the_png_has_the_declared_size(tmp_path, embeddings, size):
    pytest.importorskip("matplotlib")
    source = _llama_like(tmp_path, embeddings=embeddings)
    out = tmp_path / "spectra.png"
    result = cli("analyze", source, "--energy", "0.9", "--plot", out)
    assert result.exit_code == 0, result.stderr
    assert _png_size(out) == size
    assert f"wrote {out}" in result.stderr
    assert "model.layers.0.mlp.up_proj.weight" in result.stdout  # the table still goes to stdout
    assert lowrank_cli.plot_spectra(lowrank_cli.analyze(source), tmp_path / "again.png") == size


@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_two_runs_write_the_same_bytes(tmp_path, suffix):
    pytest.importorskip("matplotlib")
    source = _llama_like(tmp_path, embeddings=True)
    first, second = tmp_path / f"a.{suffix}", tmp_path / f"b.{suffix}"
    assert cli("analyze", source, "--rank", "4", "--plot", first).exit_code == 0
    assert cli("analyze", source, "--rank", "4", "--plot", second).exit_code == 0
    assert first.read_bytes() == second.read_bytes()
    data = first.read_bytes()
    if suffix == "svg":  # 12 × 8 inches = 864 × 576 points
        assert re.search(rb'width="864pt" height="576pt"', data)
    elif suffix == "pdf":
        assert data.startswith(b"%PDF") and re.search(rb"/MediaBox \[ ?0 0 864 576 ?\]", data)


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    source = _llama_like(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "spectra.png"
    result = cli("analyze", source, "--plot", out)
    assert_clean_failure(result, 1, "--plot", "pip install 'lowrank[plot]'")
    assert not out.exists()
    with pytest.raises(lowrank_cli.MissingExtraError, match=r"^plot needs matplotlib"):
        lowrank_cli.analyze(source, plot=out)


def test_a_plot_file_of_another_kind_is_refused_before_any_work(tmp_path):
    source = _llama_like(tmp_path)
    assert_clean_failure(cli("analyze", source, "--plot", tmp_path / "spectra.jpg"), 2, "--plot", ".png")
    assert_clean_failure(cli("analyze", source, "--plot", tmp_path / "no" / "s.png"), 1, "--plot", "does not exist")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "attention"),
        ("model.layers.3.mlp.gate_proj.weight", "MLP"),
        ("model.embed_tokens.weight", "embedding"),
        ("encoder.layer.0.attention.self.query.weight", "attention"),
        ("encoder.layer.0.attention.output.dense.weight", "attention"),
        ("encoder.layer.0.intermediate.dense.weight", "MLP"),
        ("encoder.layer.0.output.dense.weight", "MLP"),
        ("embeddings.word_embeddings.weight", "embedding"),
        ("transformer.h.0.attn.c_attn.weight", "attention"),
        ("transformer.h.0.mlp.c_fc.weight", "MLP"),
        ("transformer.wte.weight", "embedding"),
        ("pooler.dense.weight", "other"),
    ],
)
def test_layer_kinds_from_names(name, kind):
    assert layer_kind(name) == kind


def test_csv_rows_are_the_json_rows(tmp_path):
    source = _llama_like(tmp_path)
    result = cli("analyze", source, "--energy", "0.9", "--csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = by_name(cli_json("analyze", source, "--energy", "0.9"))
    assert [row["name"] for row in rows] == list(expected)
    for row in rows:
        t = expected[row["name"]]
        assert row["shape"] == "x".join(str(d) for d in t["shape"])
        assert row["status"] == t["status"]
        if t["alpha"] is None:
            assert row["alpha"] == "" and row["rank_99"] == ""
        else:
            assert float(row["alpha"]) == t["alpha"]
            assert int(row["rank_99"]) == t["rank_99"]
            assert float(row["rel_error"]) == t["rel_error"]
    assert "singular_values" not in rows[0]
    sigma = np.asarray(expected["model.layers.0.mlp.up_proj.weight"]["singular_values"])
    assert sigma[:3] == pytest.approx(geometric(3, 0.8), rel=1e-5)


def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_quoted(tmp_path):
    """OWASP's CSV injection advice: a text cell starting with = + - @ tab or CR gets a ' in front."""
    names = ["=cmd|' /C calc'!A0.weight", "+1.weight", "-2.weight", "@SUM(A1).weight", "\tt.weight", "\rr.weight"]
    tensors = {name: torch.randn(6, 4) for name in [*names, "plain.weight"]}
    source = save(tmp_path / "m.safetensors", tensors)
    result = cli("analyze", source, "--rank", "2", "--csv")
    assert result.exit_code == 0, result.stderr
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(result.stdout, newline=""))}
    assert set(rows) == {"'" + name for name in names} | {"plain.weight"}
    for row in rows.values():
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row.values()), row
    assert rows["plain.weight"]["file"] == str(source)


def test_json_and_csv_together_are_refused(tmp_path):
    assert_clean_failure(cli("analyze", _llama_like(tmp_path), "--json", "--csv"), 2, "--json", "--csv")


def test_diff_plots_the_changes_that_are_not_zero(tmp_path):
    """analyze --diff --plot: one curve per changed matrix, so a change to attention alone is one panel."""
    matplotlib_image = pytest.importorskip("matplotlib.image")
    base = _llama_like(tmp_path)
    tuned = {name: value.clone() for name, value in load(base).items()}
    for layer in range(2):
        tuned[f"model.layers.{layer}.self_attn.q_proj.weight"] += with_spectrum(48, 32, [1.0, 0.5, 0.2], seed=layer)
    tuned_path = save(tmp_path / "tuned.safetensors", tuned)
    out = tmp_path / "change.png"
    result = cli("analyze", base, tuned_path, "--diff", "--energy", "0.9", "--plot", out)
    assert result.exit_code == 0, result.stderr
    assert _png_size(out) == (600, 400)  # one panel: the unchanged MLP and v_proj have no curve
    assert matplotlib_image.imread(out).shape[:2] == (400, 600)  # and it decodes as an image
    report = lowrank_cli.analyze([base, tuned_path], diff=True, energy=0.9)
    assert lowrank_cli.plot_spectra(report, tmp_path / "again.png") == (600, 400)
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
