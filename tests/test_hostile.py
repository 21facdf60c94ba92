"""Hostile input: broken, odd and random safetensors files, shard folders and lowrank files.

Whatever it is given, every command ends with a correct result, or with exit 1 and
one line on stderr naming the file and the problem: no traceback, no output or temporary file
left, the input's bytes unchanged. The official loader (safetensors.safe_open) is the judge of
which files are valid: what it reads, lowrank must read too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import subprocess
import tempfile
from pathlib import Path

import hostile
import numpy as np
import pytest
import torch
from conftest import TORCH_DTYPE, assert_clean_failure, assert_no_crash, cli, listing, load, save, sha256
from hypothesis import HealthCheck, Phase, given, settings
from safetensors import safe_open

COMMANDS = {"analyze": ["--json"], "compress": ["--rank", "2", "--json"], "expand": ["--json"]}
RESCUE_S = 60  # a FIFO's writer comes after this, so that a lowrank blocked on it ends the test
TORCH_OF = {**TORCH_DTYPE, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}


def run(command: str, path: Path):
    return cli(command, path, *COMMANDS[command])


def assert_refused(result, path: Path, problem: str | None = None) -> None:
    """Exit 1, one line naming the file (and matching `problem`), no traceback, nothing on stdout."""
    assert_no_crash(result)
    assert_clean_failure(result, 1, str(path))
    if problem is not None:
        assert re.search(problem, result.stderr, re.IGNORECASE), (problem, result.stderr)


def assert_untouched(folder: Path, before: list[str], path: Path, digest: str) -> None:
    assert listing(folder) == before, "an output or temporary file was left"
    assert sha256(path) == digest, "the input changed"


def official_verdict(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """("refused" | "unreadable" | "readable", tensors): what safetensors' own loader makes of the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())  # noqa: SIM118
            try:
                return "readable", {name: handle.get_tensor(name) for name in names}
            except Exception:  # noqa: BLE001 - a header it accepts, data it cannot turn into torch
                return "unreadable", {}
    except Exception:  # noqa: BLE001 - SafetensorError, OSError, …: refused
        return "refused", {}


def has_non_finite_matrix(tensors: dict[str, torch.Tensor]) -> bool:
    """A float tensor of two or more dimensions holding NaN or Inf: the one thing lowrank may refuse."""
    return any(
        t.dtype in FLOAT_DTYPES and t.dim() >= 2 and t.numel() and not bool(torch.isfinite(t.float()).all())
        for t in tensors.values()
    )


def assert_compressed_correctly(source: bytes, out: Path, report: dict) -> None:
    """Every input tensor is in OUT bit for bit, or as factors whose error is the one reported."""
    before, after = hostile.entries(source), hostile.entries(out.read_bytes())
    rows = {t["name"]: t for t in report["tensors"]}
    assert sorted(rows) == sorted(before)
    expected_names = set()
    for name, (dtype, shape, raw) in before.items():
        if rows[name]["status"] == "factorized":
            expected_names |= {f"{name}.B", f"{name}.A"}
            stored = load(out)
            w = torch.frombuffer(bytearray(raw), dtype=TORCH_OF[dtype]).reshape(shape)
            b, a = stored[f"{name}.B"].double().numpy(), stored[f"{name}.A"].double().numpy()
            w64 = w.double().reshape(shape[0], -1).numpy()
            error = np.linalg.norm(w64 - b @ a) / np.linalg.norm(w64)  # (m, r) @ (r, n) -> (m, n)
            assert math.isclose(rows[name]["rel_error"], error, rel_tol=1e-6, abs_tol=1e-12), name
        else:
            expected_names.add(name)
            assert after[name] == (dtype, shape, raw), f"{name} not copied bit for bit"
    assert set(after) == expected_names


def check_any_file(folder: Path, path: Path) -> None:
    """The whole contract, for one file on disk in an otherwise empty folder."""
    data = path.read_bytes()
    verdict, tensors = official_verdict(path)
    poisoned = has_non_finite_matrix(tensors)
    before, digest = listing(folder), sha256(path)
    results = {}
    for command in COMMANDS:
        result = results[command] = run(command, path)
        assert_no_crash(result)
        if result.exit_code == 0:
            assert result.exception is None, repr(result.exception)
            report = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
            if command == "compress":
                out = folder / (path.stem + ".lowrank.safetensors")
                assert_compressed_correctly(data, out, report)
                out.unlink()
        else:
            assert_refused(result, path)
        assert_untouched(folder, before, path, digest)

    if verdict == "refused":
        for command, result in results.items():
            assert result.exit_code == 1, f"{command} accepted a file safetensors refuses"
    if verdict == "readable":
        for command in ("analyze", "compress"):
            result = results[command]
            if result.exit_code != 0:  # only NaN / Inf (or a name clash of factors) may stop it
                allowed = "NaN|Inf" if poisoned else r"two tensors would be named"
                assert re.search(allowed, result.stderr), f"{command} refused a file safetensors reads: {result.stderr}"
        assert results["expand"].exit_code == 1 and "lowrank" in results["expand"].stderr


# --- named broken files -----------------------------------------------------------------------------

BROKEN = hostile.broken_files()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_is_refused(tmp_path, case, command):
    data, problem = BROKEN[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert official_verdict(path)[0] == "refused"  # the case really is broken
    before, digest = listing(tmp_path), sha256(path)
    assert_refused(run(command, path), path, problem)
    assert_untouched(tmp_path, before, path, digest)


VALID = hostile.base_file()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("cut", hostile.truncations(VALID))
def test_truncated_file_is_refused(tmp_path, cut, command):
    path = tmp_path / "model.safetensors"
    path.write_bytes(VALID[:cut])
    before, digest = listing(tmp_path), sha256(path)
    assert_refused(run(command, path), path)
    assert_untouched(tmp_path, before, path, digest)


def test_the_base_file_is_valid(tmp_path):
    """The file the truncations cut is one every command reads."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(VALID)
    verdict, tensors = official_verdict(path)
    assert verdict == "readable" and sorted(tensors) == ["b", "ids", "w"]
    check_any_file(tmp_path, path)


# --- odd files that are valid ---------------------------------------------------------------------

ODD = hostile.odd_files()


@pytest.mark.parametrize("case", sorted(ODD))
def test_odd_but_valid_file_is_read(tmp_path, case):
    path = tmp_path / "model.safetensors"
    path.write_bytes(ODD[case])
    verdict, tensors = official_verdict(path)
    assert verdict == "readable"
    before, digest = listing(tmp_path), sha256(path)

    result = run("analyze", path)
    assert_no_crash(result)
    assert result.exit_code == 0, result.stderr
    assert sorted(t["name"] for t in json.loads(result.stdout)["tensors"]) == sorted(tensors)
    assert_untouched(tmp_path, before, path, digest)

    result = run("compress", path)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "model.lowrank.safetensors"
    assert_compressed_correctly(ODD[case], out, json.loads(result.stdout))
    assert sha256(path) == digest

    result = run("expand", out)  # and back: every tensor under its name, dtype and shape
    assert result.exit_code == 0, result.stderr
    dense = tmp_path / "model.dense.safetensors"
    restored = hostile.entries(dense.read_bytes())
    assert sorted(restored) == sorted(tensors)
    for name, (dtype, shape, _raw) in hostile.entries(ODD[case]).items():
        assert restored[name][:2] == (dtype, shape), name


# --- any file: valid or damaged by one mutation -----------------------------------------------------


# Derandomized: the same 150 files on every run. No shrinking: while a bug is open it would spend a
# minute minimizing; the named cases above are the minimal examples.
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=hostile.files())
def test_any_file_gets_a_result_or_a_clean_refusal(case):
    what, data = case
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        path = folder / "model.safetensors"
        path.write_bytes(data)
        check_any_file(folder, path)


# --- sharded checkpoints ----------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"


def _write_shards(folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict | None = None) -> None:
    folder.mkdir()
    for shard, tensors in shards.items():
        save(folder / shard, tensors, {"format": "pt"})
    if weight_map is not None:
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _shards() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {
        SHARD_1: {"a.weight": torch.randn(8, 6, generator=gen), "a.bias": torch.randn(8, generator=gen)},
        SHARD_2: {"b.weight": torch.randn(6, 8, generator=gen)},
    }


def _weight_map() -> dict[str, str]:
    return {name: shard for shard, tensors in _shards().items() for name in tensors}


def _index_text(text: str):
    def make(folder: Path) -> None:
        _write_shards(folder, _shards())
        (folder / INDEX).write_text(text)

    return make


def _index_bytes(raw: bytes):
    def make(folder: Path) -> None:
        _write_shards(folder, _shards())
        (folder / INDEX).write_bytes(raw)

    return make


def _weight_map_changed(**changes):
    def make(folder: Path) -> None:
        weight_map = {**_weight_map(), **changes}
        _write_shards(folder, _shards(), {k: v for k, v in weight_map.items() if v is not None})

    return make


def _in_both_shards(index: bool):
    def make(folder: Path) -> None:
        shards = _shards()
        shards[SHARD_2]["a.bias"] = torch.zeros(8)
        _write_shards(folder, shards, _weight_map() if index else None)

    return make


def _damaged_shard(damage):
    def make(folder: Path) -> None:
        _write_shards(folder, _shards(), _weight_map())
        shard = folder / SHARD_2
        shard.write_bytes(damage(shard.read_bytes()))

    return make


def _outside_shard(folder: Path) -> None:
    _write_shards(folder, _shards(), {**_weight_map(), "b.weight": f"../{SHARD_2}"})
    save(folder.parent / SHARD_2, _shards()[SHARD_2])


def _second_index(folder: Path) -> None:
    _write_shards(folder, _shards())
    for name in ("a.safetensors.index.json", "b.safetensors.index.json"):
        (folder / name).write_text(json.dumps({"weight_map": _weight_map()}))


# case -> (make the folder, what the message names (relative to the folder; "" for the folder), problem)
SHARDED = {
    "index names a missing shard": (
        _weight_map_changed(**{"b.weight": "model-00003-of-00003.safetensors"}),
        INDEX,
        "missing",
    ),
    "index names a shard outside the folder": (_outside_shard, INDEX, "missing"),
    "tensor in the index but in no shard": (_weight_map_changed(ghost=SHARD_1), INDEX, "'ghost'.*no shard"),
    "tensor in a shard but not in the index": (
        _weight_map_changed(**{"a.bias": None}),
        INDEX,
        "'a.bias'.*not in the index",
    ),
    "index names the wrong shard": (_weight_map_changed(**{"a.bias": SHARD_2}), INDEX, "'a.bias'"),
    "tensor in two shards": (_in_both_shards(index=False), "", "'a.bias'.*both"),
    "tensor in two shards, with an index": (_in_both_shards(index=True), "", "'a.bias'"),
    "index not JSON": (_index_text("{weight_map: nope"), INDEX, "index|weight_map"),
    "index not UTF-8": (_index_bytes(b'{"weight_map": {"\xff": "x"}}'), INDEX, "index|weight_map"),
    "index a list": (_index_text("[]"), INDEX, "index|weight_map"),
    "index without weight_map": (_index_text('{"metadata": {}}'), INDEX, "weight_map"),
    "weight_map a list": (_index_text('{"weight_map": []}'), INDEX, "weight_map"),
    "weight_map of numbers": (_index_text('{"weight_map": {"a.weight": 1}}'), INDEX, "weight_map"),
    "index deeply nested": (
        _index_text('{"weight_map": ' + "[" * 50_000 + "]" * 50_000 + "}"),
        INDEX,
        "index|weight_map",
    ),
    "a shard truncated": (_damaged_shard(lambda data: data[: len(data) // 2]), SHARD_2, "safetensors"),
    "a shard of random bytes": (
        _damaged_shard(lambda data: np.random.default_rng(0).bytes(len(data))),
        SHARD_2,
        "safetensors",
    ),
    "a shard empty": (_damaged_shard(lambda data: b""), SHARD_2, "safetensors"),
    "two index files": (_second_index, "", "index"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(SHARDED))
def test_broken_sharded_checkpoint_is_refused(tmp_path, case, command):
    make, named, problem = SHARDED[case]
    folder = tmp_path / "ckpt"
    make(folder)
    hashes = {p.name: sha256(p) for p in folder.iterdir()}
    before = listing(tmp_path)
    result = run(command, folder)
    assert_refused(result, folder / named if named else folder, problem)
    assert listing(tmp_path) == before
    assert {p.name: sha256(p) for p in folder.iterdir()} == hashes


@pytest.mark.parametrize("command", COMMANDS)
def test_index_with_an_empty_weight_map(tmp_path, command):
    """No tensors indexed, shards full of them beside it: the index is wrong, as when one tensor is missing
    from it ("tensor in a shard but not in the index"), so it is refused, naming the index."""
    folder = tmp_path / "ckpt"
    _index_text('{"weight_map": {}}')(folder)
    hashes = {p.name: sha256(p) for p in folder.iterdir()}
    before = listing(tmp_path)
    result = run(command, folder)
    assert_refused(result, folder / INDEX, "its weight_map lists no tensors")
    assert listing(tmp_path) == before
    assert {p.name: sha256(p) for p in folder.iterdir()} == hashes


# --- lowrank files with damaged records ------------------------------------------------------------


def _lowrank_file(path: Path, records: dict | list, *, extra: dict | None = None, raw: str | None = None) -> Path:
    """A lowrank file written by hand from the format's docstring: W (6×5) = B (6×2) · A (2×5)."""
    gen = torch.Generator().manual_seed(1)
    tensors = {"w.B": torch.randn(6, 2, generator=gen), "w.A": torch.randn(2, 5, generator=gen)}
    payload = {"format_version": 1, "input_metadata": False, "tensors": records, **(extra or {})}
    return save(path, tensors, {"lowrank": raw if raw is not None else json.dumps(payload)})


def _record(**changes) -> dict:
    return {"shape": [6, 5], "dtype": "F32", "rank": 2, "rel_error": 0.25, "split": "us", **changes}


def test_the_hand_written_lowrank_file_expands(tmp_path):
    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", {"w": _record()})
    result = run("expand", source)
    assert result.exit_code == 0, result.stderr
    factors = load(source)
    expected = (factors["w.B"].double() @ factors["w.A"].double()).float()  # (6, 2) @ (2, 5) -> (6, 5)
    torch.testing.assert_close(load(tmp_path / "w.dense.safetensors")["w"], expected)


LOWRANK_DAMAGE = {
    "zero rows": dict(records={"w": _record(shape=[0, 5])}),
    "no dimensions": dict(records={"w": _record(shape=[])}),
    "rank larger than the factors": dict(records={"w": _record(rank=3)}),
    "factor missing": dict(records={"w": _record(), "v": _record()}),
    "unknown dtype": dict(records={"w": _record(dtype="F128")}),
    "records a list": dict(records=[]),
    "record a number": dict(records={"w": 7}),
    "record without rank": dict(records={"w": {"shape": [6, 5], "dtype": "F32", "rel_error": 0.25}}),
    "newer format": dict(records={"w": _record()}, extra={"format_version": 2}),
    "metadata not JSON": dict(records={}, raw="{not json"),
    "metadata deeply nested": dict(records={}, raw="[" * 50_000 + "]" * 50_000),
}


@pytest.mark.parametrize("case", sorted(LOWRANK_DAMAGE))
def test_damaged_lowrank_file_is_refused(tmp_path, case):
    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", **LOWRANK_DAMAGE[case])
    before, digest = listing(tmp_path), sha256(source)
    assert_refused(run("expand", source), source)
    assert_untouched(tmp_path, before, source, digest)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_lowrank_record_with_an_impossible_error(tmp_path, value):
    """rel_error NaN, Inf or negative: no compress writes it, so the record is damaged and refused, as
    every other damaged record is (LOWRANK_DAMAGE)."""
    source = _lowrank_file(tmp_path / "w.lowrank.safetensors", {"w": _record(rel_error=value)})
    before, digest = listing(tmp_path), sha256(source)
    result = run("expand", source)
    assert_refused(result, source, rf"rel_error {value} is not a finite number ≥ 0")
    assert_untouched(tmp_path, before, source, digest)


# --- not a regular file ----------------------------------------------------------------------------


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    """A named pipe with no writer: opening it blocks until one comes; lowrank must answer at once."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    # If lowrank blocks, a writer comes after RESCUE_S and hangs up so that the test ends (and fails).
    # It must be another process: the blocked open() holds the GIL, no thread of ours would run.
    rescue = subprocess.Popen(["sh", "-c", f'sleep {RESCUE_S} && exec 3>"$0"', str(fifo)])
    try:
        result = cli("analyze", fifo)
        waited = rescue.poll() is not None  # the writer came: analyze returned only because of it
    finally:
        rescue.kill()
        rescue.wait()
    assert not waited, "analyze waited on a FIFO for a writer"
    assert_refused(result, fifo)


@contextlib.contextmanager
def fifo_at(path: Path):
    """A named pipe at `path` with no writer. Should lowrank open it, after LIMIT_S a writer comes and
    hangs up at each open, so a test of a blocking open ends (and fails on its message), not hangs."""
    os.mkfifo(path)
    rescue = subprocess.Popen(["sh", "-c", f'sleep {RESCUE_S}; while :; do exec 3>"$0"; exec 3>&-; done', str(path)])
    try:
        yield path
    finally:
        rescue.kill()
        rescue.wait()


def special_file(kind: str, path: Path) -> contextlib.AbstractContextManager[Path]:
    if kind == "fifo":
        return fifo_at(path)
    if kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))  # paths under tmp_path are short enough for AF_UNIX
        return _closing(server, path)
    raise ValueError(kind)


@contextlib.contextmanager
def _closing(server: socket.socket, path: Path):
    try:
        yield path
    finally:
        server.close()


PIPE = r"is a FIFO \(named pipe\), not a regular file"  # the test's name, in the path, holds "fifo" too
WHAT = {"fifo": PIPE, "socket": "is a socket, not a regular file"}


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_calibration_statistics_that_are_not_a_file(tmp_path, kind):
    model = save(tmp_path / "m.safetensors", {"w": torch.randn(8, 6)})
    with special_file(kind, tmp_path / "stats.safetensors") as stats:
        result = cli("compress", model, "--rank", "2", "--calibration", stats)
    assert_refused(result, stats, WHAT[kind])
    assert not (tmp_path / "m.lowrank.safetensors").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json"])
def test_a_fifo_inside_a_model_folder(tmp_path, name):
    folder = tmp_path / "m"
    folder.mkdir()
    if name.endswith(".json"):
        save(folder / "model-00001-of-00001.safetensors", {"w": torch.randn(8, 6)})
    with fifo_at(folder / name) as fifo:
        result = cli("analyze", folder)
    assert_refused(result, fifo, PIPE)


def test_a_fifo_modules_json_beside_the_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    save(folder / "model.safetensors", {"w": torch.randn(8, 6)})
    with fifo_at(folder / "modules.json") as fifo:
        result = cli("compress", folder, "--rank", "2")
    assert_refused(result, fifo, PIPE)
    assert listing(tmp_path) == ["m"]


@pytest.mark.parametrize("where", ["text", "config.json"])
def test_calibrate_refuses_a_fifo(tmp_path, where):
    """Checked before transformers loads: no model is needed to see the input is a pipe."""
    folder = tmp_path / "model"
    folder.mkdir()
    text = tmp_path / "calib.txt"
    text.write_text("some text\n")
    target = text if where == "text" else folder / "config.json"
    if where == "text":
        text.unlink()
    with fifo_at(target) as fifo:
        result = cli("calibrate", folder, "-o", tmp_path / "stats.safetensors", "--text", text)
    assert_refused(result, fifo, PIPE)
    assert not (tmp_path / "stats.safetensors").exists()


def test_missing_text_and_statistics_are_missing_inputs(tmp_path):
    """Exit 1, as for a missing model (README's table), not a usage error."""
    folder = tmp_path / "model"
    folder.mkdir()
    text = tmp_path / "absent.txt"
    result = cli("calibrate", folder, "-o", tmp_path / "stats.safetensors", "--text", text)
    assert_refused(result, text, "no such file")
    model = save(tmp_path / "m.safetensors", {"w": torch.randn(8, 6)})
    stats = tmp_path / "absent.safetensors"
    assert_refused(cli("compress", model, "--rank", "2", "--calibration", stats), stats, "no such file")
    assert_refused(cli("compress", model, "--rank", "2", "--calibration", tmp_path), tmp_path, "is a folder")
