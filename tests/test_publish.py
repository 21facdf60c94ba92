"""Publishing outputs (issue 19): two runs on one OUT never both say they wrote it, and a killed
run's temporaries are removed by the next run that writes beside them.

Races are made deterministic: the "other run" writes OUT between this run's up-front check
(outputs.check_output) and its publish, through a monkeypatched check.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure, cli, cli_json, listing, load, low_rank, save
from faults import FullDisk
from torch import nn

import lowrank_cli
import lowrank_cli.io.outputs as outputs
from lowrank_cli.errors import OutputError
from lowrank_cli.io import publish as publishing
from lowrank_cli.io.calibration import read_calibration, write_calibration
from lowrank_cli.io.writer import SafetensorsWriter
from lowrank_cli.nn import LowRankLinear, save_factors

OTHER = b"written by the other run"


def _single(folder: Path) -> Path:
    return save(folder / "model.safetensors", {f"layers.{i}.weight": low_rank(24, 20, 2, seed=i) for i in range(2)})


def _folder(folder: Path) -> Path:
    source = folder / "ckpt"
    source.mkdir()
    save(source / "model.safetensors", {"a.weight": low_rank(24, 20, 2, seed=1), "a.bias": torch.randn(24)})
    (source / "config.json").write_text("{}")
    return source


def _other_run_writes(monkeypatch, make) -> None:
    """After this run's check that OUT is free, another run's output appears there (made by `make`)."""
    check = outputs.check_output

    def check_then_lose_the_race(checkpoint, out, *, force, **options):
        checked = check(checkpoint, out, force=force, **options)
        make(Path(out))
        return checked

    monkeypatch.setattr(outputs, "check_output", check_then_lose_the_race)


def _other_file(out: Path) -> None:
    out.write_bytes(OTHER)


def _other_folder(out: Path) -> None:
    out.mkdir()
    (out / "model.safetensors").write_bytes(OTHER)


def _other_empty_folder(out: Path) -> None:
    out.mkdir()  # a plain rename onto an empty folder would succeed on Linux


# --- two runs, one OUT --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_input, out_name, other",
    [
        (_single, "out.safetensors", _other_file),
        (_folder, "out", _other_folder),
        (_folder, "out", _other_empty_folder),
    ],
    ids=["file", "folder", "empty folder"],
)
def test_the_run_that_loses_the_race_fails_and_the_other_output_stays(
    tmp_path, monkeypatch, make_input, out_name, other
):
    source = make_input(tmp_path)
    out = tmp_path / out_name
    _other_run_writes(monkeypatch, other)
    result = cli("compress", source, "--rank", 2, "-o", out)
    assert_clean_failure(result, 1, str(out), "already exists", "--force")
    assert "wrote" not in result.output
    if out.is_file():
        assert out.read_bytes() == OTHER
    else:
        expected = [] if other is _other_empty_folder else ["model.safetensors"]
        assert listing(out) == expected
        if expected:
            assert (out / "model.safetensors").read_bytes() == OTHER
    assert listing(tmp_path) == sorted([source.name, out_name])  # no temporary of the loser is left


@pytest.mark.parametrize(
    "make_input, out_name, other", [(_single, "out.safetensors", _other_file), (_folder, "out", _other_folder)]
)
def test_with_force_the_last_run_replaces_the_output(tmp_path, monkeypatch, make_input, out_name, other):
    source = make_input(tmp_path)
    out = tmp_path / out_name
    _other_run_writes(monkeypatch, other)
    cli_json("compress", source, "--rank", 2, "-o", out, "--force")
    weights = out if out.is_file() else out / "model.lowrank.safetensors"
    assert "a.weight.B" in load(weights) or "layers.0.weight.B" in load(weights)
    assert listing(tmp_path) == sorted([source.name, out_name])
    if out.is_dir():
        assert listing(out) == ["README.md", "config.json", "model.lowrank.safetensors"]


def test_expand_loses_the_race_like_compress(tmp_path, monkeypatch):
    source = _single(tmp_path)
    compressed = tmp_path / "model.lowrank.safetensors"
    cli_json("compress", source, "--rank", 2, "-o", compressed)
    out = tmp_path / "dense.safetensors"
    _other_run_writes(monkeypatch, _other_file)
    assert_clean_failure(cli("expand", compressed, "-o", out), 1, str(out), "already exists")
    assert out.read_bytes() == OTHER
    assert listing(tmp_path) == sorted([source.name, compressed.name, out.name])


def test_calibration_statistics_never_replace_a_file_without_force(tmp_path):
    """calibrate checks OUT up front; a file that appears later is not replaced at publish time either."""
    out = tmp_path / "stats.safetensors"
    out.write_bytes(OTHER)
    moment = torch.eye(4)
    with pytest.raises(OutputError, match="already exists") as caught:
        write_calibration(out, {"x": moment}, {"w": "x"}, tokens=10)
    assert str(out) in str(caught.value)
    assert out.read_bytes() == OTHER
    assert listing(tmp_path) == ["stats.safetensors"]
    write_calibration(out, {"x": moment}, {"w": "x"}, tokens=10, force=True)
    assert torch.equal(read_calibration(out).moments["w"], moment)
    assert listing(tmp_path) == ["stats.safetensors"]


def _factored() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(LowRankLinear.from_linear(nn.Linear(6, 5), rank=2))


@pytest.mark.parametrize("name", ["model.safetensors", "saved"])
def test_save_factors_never_overwrites_without_force(tmp_path, name):
    path = tmp_path / name
    _other_folder(path) if name == "saved" else _other_file(path)
    with pytest.raises(OutputError, match="already exists"):
        save_factors(_factored(), path)
    if path.is_file():
        assert path.read_bytes() == OTHER
    else:
        assert listing(path) == ["model.safetensors"]
    written = save_factors(_factored(), path, force=True)
    assert set(load(written)) == {"0.weight.B", "0.weight.A", "0.bias"}
    assert listing(tmp_path) == [name]  # replaced whole, no temporary or old copy left
    if path.is_dir():
        assert listing(path) == ["README.md", "model.lowrank.safetensors"]


@pytest.mark.parametrize("name", ["model.safetensors", "saved"])
@pytest.mark.parametrize("failure", ["full disk", "interrupt"])
def test_save_factors_that_fails_midway_leaves_nothing(tmp_path, monkeypatch, name, failure):
    path = tmp_path / name
    if failure == "full disk":
        FullDisk(tmp_path, budget=64).install(monkeypatch)
        expected = pytest.raises(OutputError, match="No space left on device")
    else:
        added = SafetensorsWriter.add_tensor

        def interrupted_on_second_tensor(writer, tensor_name, tensor):
            if writer.tensor_names:
                raise KeyboardInterrupt
            added(writer, tensor_name, tensor)

        monkeypatch.setattr(SafetensorsWriter, "add_tensor", interrupted_on_second_tensor)
        expected = pytest.raises(KeyboardInterrupt)
    with expected:
        save_factors(_factored(), path)
    assert listing(tmp_path) == []  # no partial file or folder, no temporary


def _record_publishing(monkeypatch) -> list[tuple[Path, set[Path], set[Path]]]:
    """Each publish as (target, the files and folders of the temporary, those of them fsynced by then)."""
    synced: set[Path] = set()
    published = []
    real_fsync, real_publish = os.fsync, publishing.publish

    def fsync(fd):
        synced.add(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def publish(temporary, target, *, force):
        temporary = Path(temporary).resolve()
        inside = {temporary, *temporary.rglob("*")} if temporary.is_dir() else {temporary}
        published.append((Path(target), inside, inside & synced))
        real_publish(temporary, target, force=force)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(publishing, "publish", publish)
    monkeypatch.setattr(outputs, "publish", publish)
    return published


def _compress_to_file(folder: Path) -> Path:
    cli_json("compress", _single(folder), "--rank", 2, "-o", folder / "out.safetensors")
    return folder / "out.safetensors"


def _compress_to_folder(folder: Path) -> Path:
    cli_json("compress", _folder(folder), "--rank", 2, "-o", folder / "out")  # shards, config.json, README.md
    return folder / "out"


def _statistics(folder: Path) -> Path:
    write_calibration(folder / "stats.safetensors", {"x": torch.eye(4)}, {"w": "x"}, tokens=10)
    return folder / "stats.safetensors"


def _plot(folder: Path) -> Path:
    pytest.importorskip("matplotlib")
    lowrank_cli.plot_spectra(lowrank_cli.analyze(_single(folder), rank=2), folder / "spectra.png")
    return folder / "spectra.png"


def _saved_factors(folder: Path) -> Path:
    save_factors(_factored(), folder / "saved")  # model.lowrank.safetensors and README.md
    return folder / "saved"


@pytest.mark.parametrize("write", [_compress_to_file, _compress_to_folder, _statistics, _plot, _saved_factors])
def test_every_output_is_on_disk_before_its_name_appears(tmp_path, monkeypatch, write):
    """fsync of each file (and folder) of the temporary before the rename that publishes it: after a
    crash the name holds the old output or the new one, never a file whose data was still in memory."""
    published = _record_publishing(monkeypatch)
    out = write(tmp_path)
    assert out in [target for target, _, _ in published]
    for target, inside, synced in published:
        assert synced == inside, f"{target}: not synced before publishing: {sorted(inside - synced)}"


@pytest.mark.parametrize("folder", [False, True])
@pytest.mark.parametrize("filesystem", ["renameat2", "hard links", "neither"])
def test_publish_never_replaces_whatever_the_filesystem_offers(tmp_path, monkeypatch, folder, filesystem):
    """Where renameat2(RENAME_NOREPLACE) is missing: a hard link (a file), else the name claimed first."""
    if filesystem != "renameat2":
        monkeypatch.setattr(publishing, "_renameat2", lambda temporary, target: False)
    if filesystem == "neither":

        def no_links(*args):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(publishing.os, "link", no_links)
    target = tmp_path / "out"
    for attempt in ("first", "second"):
        temporary = publishing.make_temp(target, folder=folder)
        (temporary / "f").write_text(attempt) if folder else temporary.write_text(attempt)
        if attempt == "first":
            publishing.publish(temporary, target, force=False)
        else:
            with pytest.raises(OutputError, match="already exists"):
                publishing.publish(temporary, target, force=False)
    assert (target / "f" if folder else target).read_text() == "first"
    assert listing(tmp_path) == ["out"]


# --- temporaries of killed runs -----------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_runs_temporaries_are_removed_and_said_and_a_live_ones_are_kept(tmp_path):
    source = _single(tmp_path)
    out = tmp_path / "out.safetensors"
    dead = _dead_pid()
    stale_file = tmp_path / f".out.safetensors.lowrank-tmp-{dead}-k1ll3d.tmp"
    stale_spill = tmp_path / f".out.safetensors.lowrank-tmp-{dead}-k1ll3d.data.tmp"
    stale_folder = tmp_path / f".ckpt.lowrank.lowrank-tmp-{dead}-0om.tmp"
    live = tmp_path / f".other.safetensors.lowrank-tmp-{os.getpid()}-w0rk.tmp"
    stale_file.write_bytes(b"half a file")
    stale_spill.write_bytes(b"data")
    stale_folder.mkdir()
    (stale_folder / "model.safetensors").write_bytes(b"half a shard")
    live.write_bytes(b"another run, still working")
    not_ours = tmp_path / ".notes.tmp"
    not_ours.write_text("a user's hidden file")

    result = cli("compress", source, "--rank", 2, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert listing(tmp_path) == sorted([source.name, out.name, live.name, not_ours.name])
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: removed {path}, left by a lowrank run that was killed (pid {dead})"
        for path in sorted([stale_file, stale_spill, stale_folder], key=lambda p: p.name)
    ]
    assert json.loads(result.stdout)["output"] == str(out)  # stdout stayed one JSON document: notes go to stderr


def test_temporaries_carry_the_pid_and_the_name_they_are_for(tmp_path):
    temporary = publishing.make_temp(tmp_path / "model.safetensors", kind="data")
    try:
        assert temporary.name.startswith(f".model.safetensors.lowrank-tmp-{os.getpid()}-")
        assert temporary.name.endswith(".data.tmp")
        assert publishing.sweep_stale_temps(tmp_path) == []  # this process is alive
    finally:
        publishing.remove_temp(temporary)
