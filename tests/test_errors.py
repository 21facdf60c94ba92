"""Every failure: its exit code, one line on stderr naming the file or tensor, no traceback,
no output and no temporary files left behind, and the input untouched."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    assert_clean_failure,
    cli,
    listing,
    load,
    low_rank,
    save,
    sha256,
    temp_files,
)

from lowrank_cli.errors import CheckpointError, TensorError


@pytest.fixture
def good(tmp_path):
    return save(tmp_path / "good.safetensors", {"W": low_rank(12, 10, 2), "b": torch.randn(12)}, {"format": "pt"})


def _assert_nothing_written(folder, before: list[str]) -> None:
    assert listing(folder) == before
    assert temp_files(folder) == []


# --- inputs that are not (valid) safetensors ------------------------------------------------------


def _broken_files(folder, good):
    data = good.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    not_json = b"{not json" + b" " * (header_len - len(b"{not json"))
    files = {
        "random.safetensors": os.urandom(4096),
        "empty.safetensors": b"",
        "short.safetensors": b"\x05\x00",
        "truncated.safetensors": data[:-17],  # the data cut short
        "badheader.safetensors": data[:8] + not_json + data[8 + header_len :],
        "hugeheader.safetensors": (10**12).to_bytes(8, "little") + data[8:],
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return list(files)


COMMANDS = [["analyze"], ["compress", "--rank", "2"], ["expand"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_missing_path(tmp_path, command):
    missing = tmp_path / "missing.safetensors"
    before = listing(tmp_path)
    result = cli(command[0], missing, *command[1:])
    assert_clean_failure(result, 1, str(missing))
    _assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("broken", ["random", "empty", "short", "truncated", "badheader", "hugeheader"])
def test_not_a_safetensors_file(tmp_path, good, command, broken):
    _broken_files(tmp_path, good)
    path = tmp_path / f"{broken}.safetensors"
    before, digest = listing(tmp_path), sha256(path)
    result = cli(command[0], path, *command[1:])
    assert_clean_failure(result, 1, str(path))
    _assert_nothing_written(tmp_path, before)
    assert sha256(path) == digest


@pytest.mark.parametrize("command", [["compress", "--rank", "2"], ["expand"]], ids=lambda c: c[0])
def test_output_exists_needs_force(tmp_path, good, command):
    source = good
    if command[0] == "expand":
        assert cli("compress", good, "--rank", 2, "-o", tmp_path / "c.safetensors").exit_code == 0
        source = tmp_path / "c.safetensors"
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    before, digest = listing(tmp_path), sha256(source)

    result = cli(command[0], source, *command[1:], "-o", out)
    assert_clean_failure(result, 1, str(out))
    assert out.read_bytes() == b"precious"
    _assert_nothing_written(tmp_path, before)

    result = cli(command[0], source, *command[1:], "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert set(load(out)) == ({"W.B", "W.A", "b"} if command[0] == "compress" else {"W", "b"})
    assert listing(tmp_path) == before and temp_files(tmp_path) == []
    assert sha256(source) == digest


@pytest.mark.parametrize("command", [["compress", "--rank", "2"], ["expand"]], ids=lambda c: c[0])
@pytest.mark.parametrize("spelling", ["same", "dotted", "force", "symlink"])
def test_output_that_is_the_input(tmp_path, good, command, spelling):
    source = good
    if command[0] == "expand":
        assert cli("compress", good, "--rank", 2, "-o", tmp_path / "c.safetensors").exit_code == 0
        source = tmp_path / "c.safetensors"
    (tmp_path / "sub").mkdir()
    out = {"dotted": tmp_path / "sub" / ".." / source.name, "symlink": tmp_path / "link.safetensors"}.get(
        spelling, source
    )
    if spelling == "symlink":
        out.symlink_to(source)
    before, digest = listing(tmp_path), sha256(source)
    extra = ["--force"] if spelling == "force" else []
    result = cli(command[0], source, *command[1:], "-o", out, *extra)
    assert_clean_failure(result, 2, str(out))
    assert sha256(source) == digest
    _assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("command", ["analyze", "compress"])
@pytest.mark.parametrize(
    "options",
    [
        ["--rank", "0"],
        ["--rank", "-3"],
        ["--energy", "0"],
        ["--energy", "1.5"],
        ["--energy", "-0.5"],
        ["--max-error", "1"],
        ["--max-error", "-0.1"],
        ["--max-error", "2"],
        ["--rank", "2", "--energy", "0.9"],
        ["--energy", "0.9", "--max-error", "0.1"],
        ["--rank", "2", "--energy", "0.9", "--max-error", "0.1"],
        ["--rank", "2", "--fail-above", "-1"],
    ],
    ids=lambda o: " ".join(o),
)
def test_invalid_policy_is_a_usage_error(tmp_path, good, command, options):
    before, digest = listing(tmp_path), sha256(good)
    result = cli(command, good, *options)
    flag = next(o for o in options if o.startswith("--") and o != "--rank") if "--fail-above" in options else options[0]
    assert_clean_failure(result, 2, flag)
    _assert_nothing_written(tmp_path, before)
    assert sha256(good) == digest


def test_compress_needs_a_policy(tmp_path, good):
    before = listing(tmp_path)
    result = cli("compress", good)
    assert_clean_failure(result, 2, "--rank")
    _assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("compress", ["--dtype", "int8"]),
        ("compress", ["--dtype", "float8"]),
        ("compress", ["--method", "magic"]),
        ("compress", ["--device", "tpu"]),
        ("analyze", ["--device", "tpu"]),
    ],
)
def test_bad_option_values(tmp_path, good, command, options):
    before = listing(tmp_path)
    result = cli(command, good, "--rank", 2, *options)
    assert_clean_failure(result, 2, options[0])
    _assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize(
    "command", [["analyze"], ["compress", "--rank", "2"], ["compress", "--energy", "0.9"]], ids=" ".join
)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_or_inf_names_the_tensor(tmp_path, command, bad, dtype):
    poisoned = low_rank(10, 8, 2).to(dtype)
    poisoned[3, 4] = float(bad)
    # a.weight is written before the bad tensor is reached: its spill must go too
    source = save(
        tmp_path / "m.safetensors",
        {"a.weight": low_rank(10, 8, 2), "b.weight": poisoned, "c.weight": low_rank(9, 8, 3)},
    )
    before, digest = listing(tmp_path), sha256(source)
    result = cli(command[0], source, *command[1:])
    assert_clean_failure(result, 1, "'b.weight'", "NaN" if bad == "nan" else "Inf", str(source))
    _assert_nothing_written(tmp_path, before)
    assert sha256(source) == digest


def test_excluding_the_bad_tensor_lets_compress_run(tmp_path):
    poisoned = low_rank(10, 8, 2)
    poisoned[0, 0] = float("nan")
    source = save(tmp_path / "m.safetensors", {"a.weight": low_rank(10, 8, 2), "b.weight": poisoned})
    result = cli("compress", source, "--rank", 2, "--exclude", "b.weight", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 0, result.stderr
    assert torch.isnan(load(tmp_path / "o.safetensors")["b.weight"]).sum() == 1


def test_compress_of_a_lowrank_file(tmp_path, good):
    compressed = tmp_path / "c.safetensors"
    assert cli("compress", good, "--rank", 2, "-o", compressed).exit_code == 0
    before, digest = listing(tmp_path), sha256(compressed)
    result = cli("compress", compressed, "--rank", 2, "-o", tmp_path / "again.safetensors")
    assert_clean_failure(result, 1, str(compressed), "expand")
    _assert_nothing_written(tmp_path, before)
    assert sha256(compressed) == digest


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_expand_of_a_plain_file(tmp_path, metadata):
    source = save(tmp_path / "plain.safetensors", {"W": low_rank(12, 10, 2)}, metadata)
    before, digest = listing(tmp_path), sha256(source)
    result = cli("expand", source, "-o", tmp_path / "out.safetensors")
    assert_clean_failure(result, 1, str(source))
    _assert_nothing_written(tmp_path, before)
    assert sha256(source) == digest


def test_output_folder_missing(tmp_path, good):
    out = tmp_path / "nowhere" / "out.safetensors"
    before = listing(tmp_path)
    result = cli("compress", good, "--rank", 2, "-o", out)
    assert_clean_failure(result, 1, str(out))
    _assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda folder: folder / "missing.safetensors", CheckpointError),
        (lambda folder: folder / "empty.safetensors", CheckpointError),
        (lambda folder: folder / "nan.safetensors", TensorError),
    ],
    ids=["missing", "empty", "nan"],
)
def test_lowrank_debug_lets_the_exception_through(tmp_path, make, expected):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save(tmp_path / "nan.safetensors", {"W": torch.full((4, 4), float("nan"))})
    path = make(tmp_path)
    result = cli("compress", path, "--rank", 1, env={"LOWRANK_DEBUG": "1"})
    assert isinstance(result.exception, expected), repr(result.exception)
    assert result.exit_code == 1  # CliRunner's code for an exception that escaped
    assert temp_files(tmp_path) == []
    assert not (tmp_path / f"{path.stem}.lowrank.safetensors").exists()

    result = cli("compress", path, "--rank", 1)  # and without it, a clean failure
    assert_clean_failure(result, 1, str(path))


@pytest.mark.parametrize("folder", ["run[v2]", "run[/v2]"])
def test_message_shows_paths_with_brackets_verbatim(tmp_path, folder):
    """Paths are data, not rich markup: the message must show them as they are."""
    missing = tmp_path / folder / "model.safetensors"
    result = cli("analyze", missing)
    assert_clean_failure(result, 1, str(missing))


def test_tensor_name_with_brackets_in_message(tmp_path):
    poisoned = torch.ones(4, 4)
    poisoned[1, 1] = float("inf")
    source = save(tmp_path / "m.safetensors", {"experts[gate].weight": poisoned})
    result = cli("analyze", source)
    assert_clean_failure(result, 1, "'experts[gate].weight'")


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "folder"])
def test_interrupt_leaves_no_output(tmp_path, monkeypatch, sharded):
    """Ctrl-C (or SIGTERM) while the second tensor is factorized: exit 130, nothing written."""
    import lowrank_cli.ops.compress

    tensors = {"a.weight": low_rank(12, 10, 2, seed=1), "b.weight": low_rank(12, 10, 2, seed=2)}
    if sharded:
        source = tmp_path / "ckpt"
        source.mkdir()
        save(source / "model-00001-of-00002.safetensors", {"a.weight": tensors["a.weight"]})
        save(source / "model-00002-of-00002.safetensors", {"b.weight": tensors["b.weight"]})
        out = tmp_path / "ckpt.lowrank"
    else:
        source = save(tmp_path / "m.safetensors", tensors)
        out = tmp_path / "m.lowrank.safetensors"
    measure = lowrank_cli.ops.factoring.relative_error
    calls = []

    def interrupted_on_second_call(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args)

    monkeypatch.setattr(lowrank_cli.ops.factoring, "relative_error", interrupted_on_second_call)
    before = listing(tmp_path)
    result = cli("compress", source, "--rank", 2)
    assert len(calls) == 2
    assert_clean_failure(result, 130)
    assert not out.exists()
    _assert_nothing_written(tmp_path, before)


# --- user text is never rewritten as a flag -------------------------------------------------------


def test_braces_in_a_path_or_tensor_name_are_printed_as_they_are(tmp_path):
    """The CLI spells the core's argument marks as flags; `{rank}` typed by a user is data, not a mark."""
    folder = tmp_path / "runs" / "{rank}-{force}"
    missing = folder / "model.safetensors"
    result = cli("compress", missing, "--rank", 2)
    assert_clean_failure(result, 1, str(missing))
    assert "--rank" not in result.stderr and "--force" not in result.stderr

    folder.mkdir(parents=True)
    poisoned = torch.ones(4, 4)
    poisoned[0, 0] = float("nan")
    source = save(folder / "model.safetensors", {"w{exclude}.{rank}": poisoned})
    result = cli("compress", source, "--rank", 2)
    assert_clean_failure(result, 1, str(source), "'w{exclude}.{rank}'", "leave it out with --exclude 'w{exclude}")
    assert result.stderr.count("--exclude") == 1 and "--rank" not in result.stderr


def test_the_library_spells_arguments_as_keywords():
    from lowrank_cli.errors import UsageError, arg

    error = UsageError(f"runs/{{rank}}/m.safetensors: lower {arg('max_error')}")
    assert str(error) == "runs/{rank}/m.safetensors: lower max_error"
    assert error.worded(lambda name: "--" + name.replace("_", "-")) == "runs/{rank}/m.safetensors: lower --max-error"


# --- a selection that leaves nothing to factor ----------------------------------------------------


@pytest.mark.parametrize(
    "selection",
    [["--exclude", "*"], ["--include", "*LayerNorm*"], ["--include", "*.weight", "--exclude", "*proj*"]],
    ids=["exclude everything", "norms only", "include minus exclude"],
)
@pytest.mark.parametrize("command", ["analyze", "compress", "extract"])
def test_a_selection_without_a_matrix_is_a_usage_error(tmp_path, command, selection):
    tensors = {
        "layer.q_proj.weight": low_rank(12, 10, 2),
        "layer.LayerNorm.weight": torch.ones(12),
        "layer.LayerNorm.bias": torch.zeros(12),
        "ids": torch.arange(4),
    }
    base = save(tmp_path / "base.safetensors", tensors)
    tuned = save(tmp_path / "tuned.safetensors", {**tensors, "layer.q_proj.weight": low_rank(12, 10, 2, seed=1)})
    before = listing(tmp_path)
    args = {
        "analyze": ["analyze", base],
        "compress": ["compress", base, "--rank", 2],
        "extract": ["extract", base, tuned, "-o", tmp_path / "adapter", "--rank", 2],
    }[command]
    result = cli(*args, *selection)
    patterns = [f"{flag} '{pattern}'" for flag, pattern in zip(selection[::2], selection[1::2], strict=True)]
    assert_clean_failure(result, 2, *patterns, "no weight matrix")
    _assert_nothing_written(tmp_path, before)
