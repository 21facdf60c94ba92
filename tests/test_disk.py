"""Destinations that cannot take the output: read-only, missing, or a disk that fills up.

Every such run ends with exit 1 and one line naming OUT and the problem; nothing partial is left
beside OUT, and the input is unchanged. The full disk is simulated at the raw-file level
(tests/faults.py) at many fill levels, and, where the tests may mount a small tmpfs, made real.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure, assert_no_crash, cli, listing, load, low_rank, save, sha256
from faults import FullDisk

INDEX = "model.safetensors.index.json"
LOWRANK_INDEX = "model.lowrank.safetensors.index.json"  # a compressed folder's, which transformers does not read
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
SPACE = "No space left on device"


def _single(folder: Path) -> Path:
    tensors = {f"layers.{i}.weight": low_rank(48, 40, 3, seed=i) for i in range(4)}
    tensors["layers.norm"] = torch.ones(48)
    return save(folder / "model.safetensors", tensors, {"format": "pt"})


def _sharded(folder: Path) -> Path:
    """Two shards, an index and a config.json (a companion file the output copies)."""
    folder.mkdir()
    shards = {
        SHARD_1: {"a.weight": low_rank(48, 40, 3, seed=1), "a.bias": torch.randn(48)},
        SHARD_2: {"b.weight": low_rank(40, 48, 2, seed=2), "b.table": torch.arange(3000, dtype=torch.int64)},
    }
    for shard, tensors in shards.items():
        save(folder / shard, tensors)
    weight_map = {name: shard for shard, tensors in shards.items() for name in tensors}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 48, "notes": "x" * 6000}))
    return folder


def _compressed(folder: Path, sharded: bool) -> Path:
    """A lowrank file (or folder) to expand, made by compress into `folder`."""
    folder.mkdir()
    source = _sharded(folder / "ckpt") if sharded else _single(folder)
    out = folder / ("ckpt.lowrank" if sharded else "model.lowrank.safetensors")
    assert cli("compress", source, "--rank", 3, "-o", out).exit_code == 0
    return out


def _inputs_digest(path: Path) -> dict[str, str]:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return {p.name: sha256(p) for p in files}


SCENARIOS = {
    "compress to a file": (lambda folder: _single(folder), ["compress", "--rank", "3"], "out.safetensors"),
    "compress to a folder": (lambda folder: _sharded(folder / "ckpt"), ["compress", "--rank", "3"], "ckpt.lowrank"),
    "expand to a file": (lambda folder: _compressed(folder / "in", False), ["expand"], "out.safetensors"),
    "expand to a folder": (lambda folder: _compressed(folder / "in", True), ["expand"], "ckpt.dense"),
}


def _run(source: Path, command: list[str], out: Path):
    return cli(command[0], source, *command[1:], "-o", out)


def _assert_refused(result, out: Path, *problem: str) -> None:
    assert_no_crash(result)
    assert_clean_failure(result, 1, str(out))
    message = result.stderr
    assert any(word.lower() in message.lower() for word in problem), (problem, message)


# --- a disk that fills up (simulated) ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_full_disk_at_every_fill_level(tmp_path, monkeypatch, scenario):
    make, command, out_name = SCENARIOS[scenario]
    source = make(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / out_name
    digest = _inputs_digest(source)

    with monkeypatch.context() as patch:  # how many bytes a successful run writes under dest
        disk = FullDisk(dest, budget=1 << 40).install(patch)
        assert _run(source, command, out).exit_code == 0
    needed = disk.written
    assert needed > 0
    expected = {p.name: sha256(p) for p in ([out] if out.is_file() else sorted(out.iterdir()))}
    cleanup = [out] if out.is_file() else [*out.iterdir(), out]
    for path in cleanup:
        path.rmdir() if path.is_dir() else path.unlink()

    budgets = sorted({0, 1, 8, 4095, 4096, 4097, needed - 1} | {needed * k // 12 for k in range(1, 12)})
    for budget in budgets:
        with monkeypatch.context() as patch:
            disk = FullDisk(dest, budget).install(patch)
            result = _run(source, command, out)
        assert disk.refused > 0, f"budget {budget} of {needed}: the disk never filled"
        _assert_refused(result, out, SPACE)
        assert listing(dest) == [], f"budget {budget} of {needed}: left {listing(dest)}"
        assert _inputs_digest(source) == digest

    with monkeypatch.context() as patch:  # exactly enough space: the same output as before
        FullDisk(dest, needed).install(patch)
        assert _run(source, command, out).exit_code == 0
    assert {p.name: sha256(p) for p in ([out] if out.is_file() else sorted(out.iterdir()))} == expected


@pytest.mark.parametrize("fails_in", ["index", "config.json"])
def test_full_disk_while_the_index_or_a_companion_is_written(tmp_path, monkeypatch, fails_in):
    """A folder output: the shards fit, then the disk fills while the index or config.json is written."""
    make, command, out_name = SCENARIOS["compress to a folder"]
    source = make(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / out_name
    with monkeypatch.context() as patch:
        disk = FullDisk(dest, budget=1 << 40).install(patch)
        assert _run(source, command, out).exit_code == 0
    index_size, config_size = (out / LOWRANK_INDEX).stat().st_size, (out / "config.json").stat().st_size
    readme_size = (out / "README.md").stat().st_size  # how to load the compressed folder, written last
    # shards are written first, then the index, then companions
    shards_size = disk.written - index_size - config_size - readme_size
    for path in out.iterdir():
        path.unlink()
    out.rmdir()
    digest = _inputs_digest(source)

    budget = shards_size + (index_size if fails_in == "config.json" else 0) + 10
    with monkeypatch.context() as patch:
        disk = FullDisk(dest, budget).install(patch)
        result = _run(source, command, out)
    assert disk.refused > 0
    _assert_refused(result, out, SPACE)
    assert listing(dest) == []
    assert _inputs_digest(source) == digest


def test_the_simulated_disk_fails_like_a_real_one(tmp_path, monkeypatch):
    """The fault injector itself: short write, then ENOSPC; buffered bytes fail on close."""
    disk = FullDisk(tmp_path, budget=10).install(monkeypatch)
    with pytest.raises(OSError) as raised, open(tmp_path / "f.bin", "wb") as handle:
        handle.write(b"x" * 6)  # buffered: nothing reaches the disk yet
        handle.write(b"y" * 6)
    assert raised.value.errno == 28
    assert (tmp_path / "f.bin").read_bytes() == b"x" * 6 + b"y" * 4
    assert disk.written == 10 and disk.refused >= 1
    with pytest.raises(OSError):
        (tmp_path / "g.txt").write_text("more")
    with open(tmp_path / "f.bin", "rb") as handle:  # reading is not affected
        assert handle.read(3) == b"xxx"


# --- a real small disk, and a read-only one ----------------------------------------------------------


@pytest.fixture
def mount(tmp_path):
    """mount(size_kib, read_only=False) -> an empty tmpfs folder; skips where mounting is not allowed."""
    points = []

    def make(size_kib: int, read_only: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"disk{len(points)}"
        point.mkdir()
        options = f"size={size_kib}k" + (",ro" if read_only else "")
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        points.append(point)
        return point

    yield make
    for point in points:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("scenario", ["compress to a file", "compress to a folder"])
def test_real_full_disk(tmp_path, mount, scenario):
    """A tmpfs of 4 KiB to 64 KiB: every size either takes the whole output or none of it; the smallest
    none, the largest all (so both outcomes are met)."""
    make, command, out_name = SCENARIOS[scenario]
    source = make(tmp_path)
    digest = _inputs_digest(source)
    codes = []
    for size_kib in range(4, 68, 4):
        dest = mount(size_kib)
        out = dest / out_name
        result = _run(source, command, out)
        codes.append(result.exit_code)
        if result.exit_code == 0:
            assert listing(dest) == [out_name]
            assert load(out if out.is_file() else out / SHARD_1.replace(".safetensors", ".lowrank.safetensors"))
        else:
            _assert_refused(result, out, SPACE)
            assert listing(dest) == [], f"{size_kib} KiB: left {listing(dest)}"
        assert _inputs_digest(source) == digest
    assert codes[0] == 1 and codes[-1] == 0, codes


@pytest.fixture
def read_only_folder(tmp_path, mount):
    """A folder no file can be created in: chmod 0o555 for a user, a read-only tmpfs for root."""
    if os.geteuid() == 0:
        folder = mount(64, read_only=True)  # root ignores permission bits
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        pass
    else:
        pytest.skip(f"{folder} is writable after all")
    yield folder
    if os.geteuid() != 0:
        folder.chmod(0o755)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_read_only_destination(tmp_path, read_only_folder, scenario):
    make, command, out_name = SCENARIOS[scenario]
    source = make(tmp_path)
    digest = _inputs_digest(source)
    out = read_only_folder / out_name
    _assert_refused(_run(source, command, out), out, "read-only", "permission")
    assert listing(read_only_folder) == []
    assert _inputs_digest(source) == digest


# --- a destination folder that does not exist -------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("where", ["missing folder", "missing folders", "a file as folder"])
def test_missing_destination_folder(tmp_path, scenario, where):
    make, command, out_name = SCENARIOS[scenario]
    source = make(tmp_path)
    (tmp_path / "notes.txt").write_text("not a folder")
    parent = {"missing folder": "missing", "missing folders": "missing/deeper", "a file as folder": "notes.txt"}[where]
    out = tmp_path / parent / out_name
    before, digest = listing(tmp_path), _inputs_digest(source)
    _assert_refused(_run(source, command, out), out, "does not exist", "not a directory", "no such")
    assert listing(tmp_path) == before
    assert _inputs_digest(source) == digest
