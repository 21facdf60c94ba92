"""SIGINT and SIGTERM in the middle of compress and expand, sent to a real `python -m lowrank_cli`.

The signal goes out as soon as the run's temporary file (or folder) appears beside OUT, i.e. while
it is working. Then: the exit code says interrupted, stderr has one line and no traceback, neither
OUT nor any temporary file is left, and the input is unchanged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, listing, save, sha256

INDEX = "model.safetensors.index.json"
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, the shell's convention


def _dense_tensors(count: int, seed: int) -> dict[str, torch.Tensor]:
    """count 256×256 float32 matrices: exact SVDs of ~25 ms each on one thread."""
    gen = torch.Generator().manual_seed(seed)
    return {f"layers.{seed}.{i}.weight": torch.randn(256, 256, generator=gen) for i in range(count)}


def _lowrank_tensors(count: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """count 512×512 float32 tensors as rank-16 factors, with their lowrank metadata (format v1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, records = {}, {}
    for i in range(count):
        name = f"layers.{seed}.{i}.weight"
        tensors[f"{name}.B"] = torch.randn(512, 16, generator=gen)
        tensors[f"{name}.A"] = torch.randn(16, 512, generator=gen)
        records[name] = {"shape": [512, 512], "dtype": "F32", "rank": 16, "rel_error": 0.5, "split": "us"}
    metadata = {"lowrank": json.dumps({"format_version": 1, "input_metadata": False, "tensors": records})}
    return tensors, metadata


def _single(folder: Path, command: str) -> Path:
    if command == "compress":
        return save(folder / "big.safetensors", _dense_tensors(48, 0))
    return save(folder / "big.safetensors", *_lowrank_tensors(96, 0))


def _sharded(folder: Path, command: str) -> Path:
    source = folder / "ckpt"
    source.mkdir()
    weight_map = {}
    for seed, shard in enumerate((SHARD_1, SHARD_2)):
        if command == "compress":
            tensors, metadata = _dense_tensors(24, seed), None
        else:
            tensors, metadata = _lowrank_tensors(48, seed)
        save(source / shard, tensors, metadata)
        weight_map.update({name: shard for name in tensors})
    (source / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (source / "config.json").write_text("{}")
    return source


def _hashes(path: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in (sorted(path.iterdir()) if path.is_dir() else [path])}


def _run_and_interrupt(args: list[str], out: Path, sig: signal.Signals) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"  # as in the suite: one thread, predictable timing
    process = subprocess.Popen(
        [sys.executable, "-m", "lowrank_cli", *args, "-o", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        prefix = f".{out.name}."
        while not any(name.startswith(prefix) and name.endswith(".tmp") for name in os.listdir(out.parent)):
            assert process.poll() is None, f"exited {process.returncode} before writing: {process.stderr.read()}"
            assert time.monotonic() < deadline, "no temporary output appeared within 60 s"
            time.sleep(0.005)
        assert process.poll() is None, "finished before the signal; make the input bigger"
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stdout, stderr


@pytest.mark.parametrize(
    ("command", "layout", "sig"),
    [
        ("compress", "file", signal.SIGINT),
        ("compress", "file", signal.SIGTERM),
        ("compress", "folder", signal.SIGINT),
        ("compress", "folder", signal.SIGTERM),
        ("expand", "file", signal.SIGINT),
        ("expand", "folder", signal.SIGTERM),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v,
)
def test_signal_mid_run_leaves_nothing(tmp_path, command, layout, sig):
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = (_single if layout == "file" else _sharded)(inputs, command)
    dest = tmp_path / "out"
    dest.mkdir()
    out = dest / ("out.safetensors" if layout == "file" else "out")
    digest = _hashes(source)
    args = [command, str(source)] + (["--rank", "8", "--method", "exact"] if command == "compress" else [])

    code, stdout, stderr = _run_and_interrupt(args, out, sig)

    assert code == EXIT_CODES[sig], (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and re.search("interrupt|terminat", lines[0]), stderr
    assert stdout == ""
    assert listing(dest) == [], f"left behind: {listing(dest)}"
    assert _hashes(source) == digest
    assert listing(inputs) == [source.name]
