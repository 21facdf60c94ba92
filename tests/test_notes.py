"""Notes are data: the library returns them with its result, the CLI prints them on stderr.

For every command, a run that has something to note: its --json stdout is one JSON document that
parses whole and carries the notes, and stderr says each of them as a `note:` line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, low_rank, save
from safetensors.torch import save_file

import lowrank_cli
from lowrank_cli.io.calibration import write_calibration


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _killed_runs_temporary(folder: Path) -> Path:
    """What a lowrank run killed by SIGKILL leaves beside its output: the next run removes it, and says so."""
    stale = folder / f".out.lowrank-tmp-{_dead_pid()}-k1ll3d.tmp"
    stale.write_bytes(b"half a file")
    return stale


def _removed(stale: Path) -> str:
    return f"removed {stale}, left by a lowrank run that was killed"


def _twins(tmp_path: Path) -> tuple[Path, Path]:
    """Two 16×12 weights with the same input, and statistics for them made without sensitivities."""
    weights = {"a.weight": torch.randn(16, 12), "b.weight": torch.randn(16, 12)}
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    x = torch.randn(200, 12, dtype=torch.float64)
    stats = tmp_path / "stats.safetensors"
    write_calibration(stats, {"x": x.T @ x / len(x)}, {"a.weight": "x", "b.weight": "x"}, tokens=200)
    return path, stats


def _analyze(tmp_path):
    path, stats = _twins(tmp_path)
    return ["analyze", path, "--budget", 0.5, "--calibration", stats], [f"{stats} has no sensitivities"]


def _compress(tmp_path):
    path, _ = _twins(tmp_path)
    stale = _killed_runs_temporary(tmp_path)
    return ["compress", path, "--rank", 2, "-o", tmp_path / "out.safetensors"], [_removed(stale)]


def _expand(tmp_path):
    source = save(tmp_path / "w.safetensors", {"w": low_rank(12, 10, 2)})
    lowrank_cli.compress(source, tmp_path / "w.lowrank.safetensors", rank=2)
    stale = _killed_runs_temporary(tmp_path)
    return ["expand", tmp_path / "w.lowrank.safetensors"], [_removed(stale)]


def _extract(tmp_path):
    """ΔW of full rank 10 kept at rank 10: 10·(12 + 10) params for 120, the adapter saves nothing."""
    base = {"w.weight": torch.randn(12, 10)}
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "tuned.safetensors", {"w.weight": base["w.weight"] + torch.randn(12, 10)})
    args = ["extract", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-o", tmp_path / "adapter"]
    return [*args, "--rank", 10], ["the adapter is half the size of the tensors it adapts or more"]


def _resize(tmp_path):
    base = {"w.weight": torch.randn(12, 10)}
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "tuned.safetensors", {"w.weight": base["w.weight"] + low_rank(12, 10, 4)})
    lowrank_cli.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "adapter", rank=4)
    stale = _killed_runs_temporary(tmp_path)
    return ["resize", tmp_path / "adapter", "-o", tmp_path / "small", "--rank", 2], [_removed(stale)]


def _calibrate(tmp_path):
    from test_calibration import tiny_model_folder

    folder, text = tiny_model_folder(tmp_path, head=False)
    args = ["calibrate", folder, "-o", tmp_path / "stats.safetensors", "--text", text, "--seq-len", 16]
    return [*args, "--samples", 4, "--no-sensitivity", "--device", "cpu"], [f"{text.name}: split windows"]


def _evaluate(tmp_path):
    from test_evaluate import compressed, line_text, tiny_folder

    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "eval.txt")
    args = ["evaluate", folder, compressed(folder, tmp_path), "--text", text, "--device", "cpu"]
    return args, [f"{text.name}: split lines"]


def _heal(tmp_path):
    from test_evaluate import compressed, line_text, tiny_folder

    folder = tiny_folder(tmp_path, "encoder")
    text = line_text(tmp_path / "train.txt")
    args = ["heal", folder, compressed(folder, tmp_path), "--text", text, "-o", tmp_path / "healed", "--steps", 1]
    return [*args, "--device", "cpu"], [f"{text.name}: split lines"]


CASES = {
    "analyze": _analyze,
    "calibrate": _calibrate,
    "compress": _compress,
    "evaluate": _evaluate,
    "expand": _expand,
    "extract": _extract,
    "heal": _heal,
    "resize": _resize,
}


def test_every_command_has_a_case():
    from test_cli import COMMANDS as ALL

    assert sorted(CASES) == ALL


@pytest.mark.parametrize("command", sorted(CASES))
def test_json_stdout_parses_while_notes_go_to_stderr(tmp_path, command):
    if command in ("calibrate", "evaluate", "heal"):
        pytest.importorskip("transformers")
    args, expected = CASES[command](tmp_path)
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # the whole of stdout: no note, no table, no progress
    assert document["command"] == command
    notes = document["notes"] if "notes" in document else document["options"]["notes"]
    said = [line.removeprefix("note: ") for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes and said == notes
    for text in expected:
        assert any(note.startswith(text) for note in notes), (text, notes)
    if command in ("calibrate", "evaluate", "heal"):  # the library's argument, spelled as the CLI's flag
        assert any(note.endswith("; --split windows|lines to choose") for note in notes), notes
