"""What a new user meets first (issue #10): model folders, -o folders, foreign formats, narrow
terminals, help text, the quality gate in a pipe, globs that match nothing, the singular values."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    assert_clean_failure,
    by_name,
    cli,
    cli_json,
    listing,
    load,
    low_rank,
    raw_tensors,
    relative_error,
    save,
    sha256,
    singular_values,
    table_rows,
    with_spectrum,
)

import lowrank_cli
from lowrank_cli.io.checkpoint import natural_key

CONFIG = '{"model_type": "toy"}\n'


def _model_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The usual layout of a small model: one model.safetensors beside config and tokenizer files."""
    folder.mkdir()
    tensors = {
        "layers.0.mlp.weight": low_rank(24, 16, 3, seed=1),
        "layers.0.mlp.bias": torch.randn(24),
        "layers.1.mlp.weight": low_rank(24, 16, 3, seed=2),
    }
    save(folder / "model.safetensors", tensors, {"format": "pt"})
    (folder / "config.json").write_text(CONFIG)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (folder / "generation_config.json").write_text("{}\n")
    return tensors


# --- 1. folders in, folders out ------------------------------------------------------------------


def test_a_folder_with_one_file_gives_a_folder_with_the_same_names(tmp_path):
    tensors = _model_folder(tmp_path / "m")
    assert cli("compress", tmp_path / "m", "--rank", 3).exit_code == 0
    compressed, dense = tmp_path / "m.lowrank", tmp_path / "m.dense"
    # no index: the input had none; weights named so that transformers refuses the folder, and a README
    renamed = [name.replace("model.safetensors", "model.lowrank.safetensors") for name in listing(tmp_path / "m")]
    assert listing(compressed) == sorted(["README.md", *renamed])
    assert (compressed / "config.json").read_text() == CONFIG
    assert "layers.0.mlp.weight.B" in raw_tensors(compressed / "model.lowrank.safetensors")

    result = cli("expand", compressed)
    assert result.exit_code == 0, result.stderr
    assert listing(tmp_path) == ["m", "m.dense", "m.lowrank"]
    assert listing(dense) == listing(tmp_path / "m")
    restored = load(dense / "model.safetensors")
    for name, tensor in tensors.items():  # rank-3 matrices at rank 3: float32 rounding only
        torch.testing.assert_close(restored[name], tensor, rtol=1e-4, atol=1e-4 * float(tensor.abs().max()))


def test_the_expanded_folder_loads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "gpt")
    assert cli("compress", tmp_path / "gpt", "--rank", 8).exit_code == 0
    assert cli("expand", tmp_path / "gpt.lowrank").exit_code == 0

    model, info = transformers.AutoModel.from_pretrained(tmp_path / "gpt.dense", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    written = load(tmp_path / "gpt.dense" / "model.safetensors")
    state = model.state_dict()
    for name, tensor in written.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("exists", [False, True], ids=["new folder", "existing folder"])
def test_output_with_a_trailing_slash_is_a_folder(tmp_path, exists):
    source = save(tmp_path / "model.safetensors", {"W": low_rank(12, 10, 2)})
    (tmp_path / "out").mkdir()
    if exists:
        (tmp_path / "out" / "model_r64").mkdir()
    result = cli("compress", source, "--rank", 2, "-o", f"{tmp_path}/out/model_r64/")
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "out" / "model_r64"
    assert folder.is_dir()
    assert listing(folder) == ["model.safetensors"]  # the input's own file name
    assert listing(tmp_path / "out") == ["model_r64"]  # nothing temporary left beside it
    assert {"W.B", "W.A"} <= set(raw_tensors(folder / "model.safetensors"))


def test_output_folder_must_have_a_parent(tmp_path):
    source = save(tmp_path / "model.safetensors", {"W": low_rank(12, 10, 2)})
    result = cli("compress", source, "--rank", 2, "-o", f"{tmp_path}/no/such/")
    assert_clean_failure(result, 1, "does not exist")
    assert listing(tmp_path) == ["model.safetensors"]


# --- 1. formats that are not safetensors ---------------------------------------------------------


def _torch_zip(path: Path) -> None:
    torch.save({"w": torch.ones(2, 3)}, path)


def _torch_legacy(path: Path) -> None:
    torch.save({"w": torch.ones(2, 3)}, path, _use_new_zipfile_serialization=False)


def _gguf(path: Path) -> None:
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(32))


def _npy(path: Path) -> None:
    np.save(path, np.ones((2, 3), dtype=np.float32))


@pytest.mark.parametrize(
    ("make", "name", "what"),
    [
        (_torch_zip, "model.pt", "PyTorch checkpoint"),
        (_torch_legacy, "pytorch_model.bin", "pickle"),
        (_gguf, "model.gguf", "GGUF"),
        (_npy, "w.npy", "NumPy"),
    ],
    ids=["torch zip", "legacy pickle", "gguf", "npy"],
)
def test_a_foreign_format_is_named(tmp_path, make, name, what):
    path = tmp_path / name
    make(path)
    digest = sha256(path)
    result = cli("compress", path, "--rank", 2)
    assert_clean_failure(result, 1, name, what)
    assert "header too large" not in result.stderr
    assert sha256(path) == digest and listing(tmp_path) == [name]


@pytest.mark.parametrize("make", [_torch_zip, _torch_legacy], ids=["torch zip", "legacy pickle"])
def test_the_conversion_the_message_gives_works(tmp_path, monkeypatch, make):
    """The one-liner in the message converts without unpickling arbitrary objects, and the result compresses."""
    folder = tmp_path / "hf-model"
    folder.mkdir()
    make(folder / "pytorch_model.bin")
    result = cli("analyze", folder)  # a folder with no safetensors, only the pickle
    assert_clean_failure(result, 1, "pytorch_model.bin", "weights_only=True")
    command = re.search(r'python -c "(.*)"', result.stderr).group(1)
    monkeypatch.chdir(tmp_path)  # run from the folder's parent: the file must still land in the folder
    exec(command, {})  # the same code python -c would run
    assert listing(tmp_path) == ["hf-model"]
    assert cli("compress", folder, "--rank", 1, "-o", tmp_path / "small").exit_code == 0
    torch.testing.assert_close(load(folder / "model.safetensors")["w"], torch.ones(2, 3))


# --- 2. narrow terminals -------------------------------------------------------------------------


def _long_names(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {}
    for i in range(2):
        for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            tensors[f"model.decoder.layers.{i}.{part}.weight"] = with_spectrum(40, 32, [8, 4, 2, 1, 0.5], seed=i)
        tensors[f"model.decoder.layers.{i}.input_layernorm.weight"] = torch.ones(40)
    tensors["model.decoder.layers.0.tiny.weight"] = torch.randn(3, 2)  # stays dense at any rank
    return save(tmp_path / "m.safetensors", tensors), tensors


def _assert_fits(text: str, width: int) -> None:
    long = [line for line in text.splitlines() if len(line) > width]
    assert not long, "\n".join(long)


@pytest.mark.parametrize(
    "command",
    [["analyze"], ["analyze", "--rank", "2"], ["compress", "--rank", "2"]],
    ids=" ".join,
)
def test_tables_fit_80_columns_with_the_key_numbers(tmp_path, command):
    source, tensors = _long_names(tmp_path)
    result = cli(command[0], source, *command[1:], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    _assert_fits(result.stdout, 80)
    rows = table_rows(result.stdout)
    name = "0.mlp.gate_proj.weight"  # "model.decoder.layers." is shared by every name, shown once in the title
    assert "model.decoder.layers." in result.stdout and name in rows
    s = singular_values(tensors["model.decoder.layers." + name])
    if len(command) == 1:
        assert rows[name]["r@99%"] == str(int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.99) + 1))
        return
    params = sum(t.numel() for t in tensors.values())
    matrices = [t for t in tensors.values() if t.ndim == 2 and t.shape[0] > 3]
    after = params - sum(t.numel() - 2 * sum(t.shape) for t in matrices)
    assert rows["total"]["saving"] == f"{100 * (1 - after / params):.1f}%"
    assert rows[name]["rank"] == "2"
    error = float(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s**2)))
    assert float(rows[name]["rel. error"]) == pytest.approx(error, rel=1e-2)
    assert "tiny.weight: dense" in result.stdout  # why it stays dense, below the table


@pytest.mark.parametrize("adapter", ["", "base_layer."], ids=["plain", "peft-wrapped"])
def test_shortened_names_keep_their_layer_at_80_columns(tmp_path, adapter):
    """Rows of different layers never look alike: the layer number and the part that names the
    matrix survive shortening (a name cut from the left loses `0.` first)."""
    parts = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    parts += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = {f"model.layers.{layer}.{part}.{adapter}weight": layer for layer in range(12) for part in parts}
    source = save(tmp_path / "m.safetensors", {name: low_rank(8, 6, 2, seed=i) for i, name in enumerate(names)})
    result = cli("compress", source, "--rank", 1, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    _assert_fits(result.stdout, 80)
    shown = [name for name in table_rows(result.stdout) if name != "total"]
    assert len(shown) == len(names) == len(set(shown))
    for cell, name in zip(shown, sorted(names, key=natural_key), strict=True):  # rows in natural order
        assert re.search(rf"(^|\.){names[name]}\.", cell), (cell, name)  # its layer
        assert name.split(".")[4] in cell, (cell, name)  # and which matrix: q_proj, down_proj…


def test_expand_and_extract_tables_fit_80_columns(tmp_path):
    source, tensors = _long_names(tmp_path)
    assert cli("compress", source, "--rank", 2).exit_code == 0
    result = cli("expand", tmp_path / "m.lowrank.safetensors", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    _assert_fits(result.stdout, 80)
    assert table_rows(result.stdout)["1.mlp.down_proj.weight"]["status"] == "expanded"

    tuned = save(
        tmp_path / "t.safetensors",
        {n: t + 0.01 * low_rank(*t.shape, 1) if t.ndim == 2 else t for n, t in tensors.items()},
    )
    result = cli("extract", source, tuned, "-o", tmp_path / "adapter", "--rank", 1, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    _assert_fits(result.stdout, 80)


def test_wide_terminals_keep_every_column(tmp_path):
    source, _ = _long_names(tmp_path)
    result = cli("compress", source, "--rank", 2)  # COLUMNS=250
    header = next(line for line in result.stdout.splitlines() if line.startswith("┃"))
    assert [c.strip() for c in header.strip("┃").split("┃")] == [
        "tensor", "shape", "dtype", "status", "params", "rank", "rel. error", "params after", "saving", "note",
    ]  # fmt: skip
    assert "model.decoder.layers.0.mlp.gate_proj.weight" in table_rows(result.stdout)


def test_relative_errors_share_one_format(tmp_path):
    """1.95e-07 and 0.742 in one column: both written with three significant digits in scientific form."""
    w = with_spectrum(16, 12, [4.0, 3.0, 2.0, 1.0], seed=3)
    source = save(tmp_path / "w.safetensors", {"exact": low_rank(16, 12, 2, seed=4), "lossy": w})
    result = cli("compress", source, "--rank", 2)
    rows = table_rows(result.stdout)
    cells = [rows["exact"]["rel. error"], rows["lossy"]["rel. error"], rows["total"]["rel. error"].removeprefix("max ")]
    assert all(re.fullmatch(r"\d\.\d\de[+-]\d\d", cell) for cell in cells), cells
    expected = float(np.sqrt((1 + 4) / (16 + 9 + 4 + 1)))
    assert float(rows["lossy"]["rel. error"]) == pytest.approx(expected, rel=1e-2)


def test_analyze_says_dense_and_why(tmp_path):
    source = save(tmp_path / "w.safetensors", {"small": torch.randn(6, 5), "big": low_rank(40, 30, 2)})
    result = cli("analyze", source, "--rank", 4)
    rows = table_rows(result.stdout)
    assert rows["small"]["rank"] == "dense"  # rank 4 needs 4·11 = 44 ≥ 30 params
    assert rows["small"]["rel. error"] == "" and rows["small"]["saving"] == "0.0%"
    assert "44" in rows["small"]["note"] and "30" in rows["small"]["note"]
    assert by_name(cli_json("analyze", source, "--rank", 4))["small"]["status"] == "dense"


def test_sizes_are_in_binary_units(tmp_path, monkeypatch):
    from rich.console import Console

    from lowrank_cli.cli import render

    stream = io.StringIO()
    monkeypatch.setattr(render, "_stderr", lambda: Console(file=stream, force_terminal=True, width=120))
    with render.progress("compress") as tick:
        tick(3 << 20, 6 << 20)
    assert "3.0/6.0 MiB" in stream.getvalue(), stream.getvalue()
    assert render._bytes(6 << 20) == "6.0 MiB"


# --- 2. help -------------------------------------------------------------------------------------

COMMANDS = ["analyze", "compress", "expand", "extract"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example_and_no_type_names(command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert f"lowrank {command} " in result.stdout.split("Examples:")[1]
    assert not re.search(r"<[\w|\[\]]+>|\{\w+\}", result.stdout), result.stdout  # <path>, <list[Path]>, {PATH}
    _assert_fits(result.stdout, 80)


def test_command_summaries_are_whole():
    result = cli("--help")
    summaries = result.stdout.split("Commands:")[1]
    assert "..." not in summaries and "…" not in summaries, summaries


# --- 2. the quality gate in a pipe ---------------------------------------------------------------


def test_a_tripped_gate_exits_3_and_still_writes_out(tmp_path):
    w = with_spectrum(12, 10, [4.0, 3.0, 1.0, 0.5], seed=5)
    source = save(tmp_path / "w.safetensors", {"W": w})
    out = tmp_path / "out.safetensors"
    result = cli("compress", source, "--rank", 1, "-o", out, "--json", "--fail-above", 0.05)
    assert result.exit_code == 3
    report = json.loads(result.stdout)  # the report still reaches the pipe
    factors = load(out)  # and OUT holds what it describes
    assert report["tensors"][0]["rel_error"] == pytest.approx(
        relative_error(w, factors["W.B"], factors["W.A"]), rel=1e-4
    )


def test_the_readme_gate_fails_the_pipe_with_pipefail(tmp_path):
    source = save(tmp_path / "w.safetensors", {"W": with_spectrum(12, 10, [4.0, 3.0, 1.0, 0.5], seed=5)})
    reader = f'{sys.executable} -c \'import json, sys; print(json.load(sys.stdin)["totals"]["savings"])\''
    gate = f"{sys.executable} -m lowrank_cli compress {source} --rank 1 --json --fail-above 0.05 | {reader}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for pipefail, code in (("", 0), ("set -o pipefail; ", 3)):
        done = subprocess.run(["bash", "-c", pipefail + gate], env=env, capture_output=True, text=True)
        assert done.returncode == code, (pipefail, done.stderr)
        (tmp_path / "w.lowrank.safetensors").unlink()


# --- 2. globs that match nothing -----------------------------------------------------------------


@pytest.mark.parametrize("command", [["analyze"], ["compress", "--rank", "2"]], ids=" ".join)
@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_a_glob_that_matches_nothing_is_a_usage_error(tmp_path, command, flag):
    source = save(tmp_path / "m.safetensors", {"enc.weight": low_rank(12, 10, 2), "dec.weight": low_rank(12, 10, 2)})
    result = cli(command[0], source, *command[1:], flag, "encoder.*")
    assert_clean_failure(result, 2, flag, "encoder.*", "enc.weight")
    assert listing(tmp_path) == ["m.safetensors"]


def test_the_library_names_the_argument(tmp_path):
    source = save(tmp_path / "m.safetensors", {"enc.weight": low_rank(12, 10, 2)})
    with pytest.raises(lowrank_cli.UsageError, match=r"^include 'x\*' matches no tensor"):
        lowrank_cli.compress(source, rank=2, include=["x*"])


# --- 2. the singular values in analyze --json ----------------------------------------------------


def test_analyze_json_lists_the_singular_values_of_w(tmp_path):
    w = with_spectrum(20, 14, [3e3, 2e3, 1e3, 5.0], seed=6)  # large values: the scale must be applied
    source = save(tmp_path / "w.safetensors", {"W": w, "b": torch.ones(20)})
    rows = by_name(cli_json("analyze", source))
    expected = singular_values(w)
    assert len(rows["W"]["singular_values"]) == 14
    np.testing.assert_allclose(rows["W"]["singular_values"], expected, rtol=1e-5, atol=1e-6 * expected[0])
    assert rows["b"]["singular_values"] is None

    top = by_name(cli_json("analyze", source, "--top", 3))["W"]["singular_values"]
    np.testing.assert_allclose(top, expected[:3], rtol=1e-5)
    report = lowrank_cli.analyze(source, top=2)
    values = next(t.singular_values for t in report.tensors if t.name == "W")
    np.testing.assert_allclose(values, expected[:2], rtol=1e-5)


def test_top_must_be_positive(tmp_path):
    source = save(tmp_path / "w.safetensors", {"W": low_rank(8, 6, 2)})
    assert_clean_failure(cli("analyze", source, "--top", 0), 2, "--top must be a whole number ≥ 1")
    with pytest.raises(lowrank_cli.UsageError, match="^top must"):
        lowrank_cli.analyze(source, top=0)


# --- 2. --dtype covers every float tensor --------------------------------------------------------


def test_a_bfloat16_run_stores_every_float_tensor_in_bfloat16(tmp_path):
    tensors = {
        "W": with_spectrum(64, 48, [4.0, 2.0, 1.0], seed=7),
        "small": torch.randn(4, 3, dtype=torch.float32),  # dense: factors would not save params
        "bias": torch.randn(64),
        "norm": torch.randn(48, dtype=torch.float64),
        "ids": torch.arange(10, dtype=torch.int64),
    }
    source = save(tmp_path / "m.safetensors", tensors)
    out = tmp_path / "bf16.safetensors"
    report = by_name(cli_json("compress", source, "--rank", 3, "--dtype", "bfloat16", "-o", out))
    raw = raw_tensors(out)
    assert {name: raw[name][0] for name in ("W.B", "W.A", "small", "bias", "norm")} == dict.fromkeys(
        ("W.B", "W.A", "small", "bias", "norm"), "BF16"
    )
    assert raw["ids"] == raw_tensors(source)["ids"]
    stored = load(out)
    for name in ("small", "bias", "norm"):  # the error is that of the cast, measured on what was written
        w = tensors[name].double()
        expected = float(torch.linalg.vector_norm(w - stored[name].double()) / torch.linalg.vector_norm(w))
        assert 0 < report[name]["rel_error"] == pytest.approx(expected, rel=1e-9), name
    assert report["small"]["status"] == "dense" and report["ids"]["rel_error"] is None
    # every float32 byte halves (float64: quarters); the int64 tensor and the header do not
    floats = sum(t.numel() for n, t in tensors.items() if n not in ("W", "ids")) + 3 * (64 + 48)
    assert sum(len(raw[n][2]) for n in raw if n != "ids") == 2 * floats


def test_a_cast_that_overflows_is_refused(tmp_path):
    source = save(tmp_path / "m.safetensors", {"W": low_rank(12, 10, 2), "scale": torch.tensor([1e5, 1.0])})
    result = cli("compress", source, "--rank", 2, "--dtype", "float16")
    assert_clean_failure(result, 1, "'scale'", "--dtype bfloat16")
    assert listing(tmp_path) == ["m.safetensors"]


def test_expand_gives_cast_tensors_their_own_dtype_back(tmp_path):
    tensors = {"W": low_rank(40, 30, 2), "bias": torch.randn(40), "norm": torch.randn(30, dtype=torch.float64)}
    source = save(tmp_path / "m.safetensors", tensors)
    assert cli("compress", source, "--rank", 2, "--dtype", "bfloat16").exit_code == 0
    report = by_name(cli_json("expand", tmp_path / "m.lowrank.safetensors"))
    dense = load(tmp_path / "m.dense.safetensors")
    for name in ("bias", "norm"):  # rounded once to bfloat16, then stored in the input's dtype again
        assert dense[name].dtype == tensors[name].dtype == getattr(torch, report[name]["dtype"].replace("F", "float"))
        torch.testing.assert_close(
            dense[name], tensors[name].to(torch.bfloat16).to(tensors[name].dtype), rtol=0, atol=0
        )


def test_a_valid_file_whose_header_length_reads_as_a_magic_is_still_read(tmp_path):
    """The header length is the first 8 bytes: 0x0280 begins with 80 02, a pickle's magic. safetensors wins."""
    path = tmp_path / "w.safetensors"
    w = low_rank(6, 5, 2)
    for pad in range(2000):
        save(path, {"w": w}, metadata={"x": "a" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    report = by_name(cli_json("analyze", path))
    assert report["w"]["numerical_rank"] == 2
