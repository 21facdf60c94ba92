"""The command line itself: help, version, entry points, and a torch-free import."""

from __future__ import annotations

import errno
import importlib
import os
import subprocess
import sys

import pytest
import typer
from conftest import ROOT, assert_clean_failure, cli

import lowrank_cli
from lowrank_cli import __version__
from lowrank_cli.cli.app import app
from lowrank_cli.errors import CheckpointError, Terminated, UsageError, arg

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)


def test_the_commands():
    assert COMMANDS == ["analyze", "calibrate", "compress", "evaluate", "expand", "extract", "heal", "resize"]


def test_top_level_help():
    result = cli("--help")
    assert result.exit_code == 0
    assert "Usage" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help(command, flag):
    click_command = typer.main.get_command(app).commands[command]
    assert click_command.help and click_command.help.strip()
    result = cli(command, flag)
    assert result.exit_code == 0, result.stderr
    assert "Usage" in result.stdout
    first_words = " ".join(click_command.help.split()[:3])
    assert first_words in " ".join(result.stdout.split())
    for option in click_command.params:
        if option.param_type_name == "option":
            assert option.help, f"{command} {option.opts} has no help text"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_help_speaks_of_that_command_only(command):
    # an option shared by several commands once described them all ("-o: the adapter folder (extract),
    # the resized adapter (resize), …" under calibrate); each command's help now says what it does there
    import re

    click_command = GROUP.commands[command]
    for option in click_command.params:
        if option.param_type_name != "option" or not option.help:
            continue
        named = re.findall(rf"[(;]\s*({'|'.join(COMMANDS)})\b", option.help)
        assert not named, f"{command} {option.opts[-1]}: its help qualifies by command {named}: {option.help!r}"
    outputs = [option for option in click_command.params if "--output" in option.opts]
    for option in outputs:  # what -o writes, in this command's words: no other command named
        others = [other for other in COMMANDS if other != command and re.search(rf"\b{other}\b", option.help)]
        assert not others, f"{command} -o names {others}: {option.help!r}"


def test_no_arguments_is_a_usage_error_that_shows_help():
    result = cli()
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: lowrank [OPTIONS] COMMAND")
    assert result.stdout == ""


def test_an_unknown_option_of_lowrank_itself_is_one_usage_line():
    assert_clean_failure(cli("--bogus"), 2, "No such option: --bogus", "(see lowrank --help)")


# --- the one error handler ------------------------------------------------------------------------

# each command's required arguments: enough to reach its library call, which the test replaces
ARGUMENTS = {
    "analyze": ["m.safetensors"],
    "calibrate": ["model", "-o", "stats.safetensors", "--text", "t.txt"],
    "compress": ["m.safetensors", "--rank", "2"],
    "evaluate": ["model", "candidate", "--text", "t.txt"],
    "expand": ["m.lowrank.safetensors"],
    "extract": ["base.safetensors", "tuned.safetensors", "-o", "adapter", "--rank", "2"],
    "heal": ["model", "candidate", "-o", "healed", "--text", "t.txt"],
    "resize": ["adapter", "-o", "small", "--rank", "2"],
}
# what the library raises -> the exit code and the words of the one line on stderr
ENDINGS = {
    "a disk full": (lambda: OSError(errno.ENOSPC, "No space left on device", "out.tmp"), 1, "out.tmp: No space"),
    "Ctrl-C": (KeyboardInterrupt, 130, "interrupted; no output was written"),
    "SIGTERM": (Terminated, 143, "terminated (SIGTERM); no output was written"),
    "a usage error": (lambda: UsageError(f"{arg('seq_len')} must be at least 1"), 2, "--seq-len must be at least 1"),
    "a bad input": (lambda: CheckpointError("m.safetensors: is not a safetensors file"), 1, "m.safetensors: is not"),
}


def test_every_command_is_in_the_table():
    assert sorted(ARGUMENTS) == COMMANDS


@pytest.mark.parametrize("ending", sorted(ENDINGS))
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_ends_through_the_one_handler(monkeypatch, command, ending):
    make, code, words = ENDINGS[ending]

    def fail(*args, **kwargs):
        raise make()

    monkeypatch.setattr(lowrank_cli, command, fail)
    assert_clean_failure(cli(command, *ARGUMENTS[command]), code, words)


def test_lowrank_debug_lets_an_os_error_through(monkeypatch):
    disk_full = OSError(errno.ENOSPC, "No space left on device", "out.tmp")

    def fail(*args, **kwargs):
        raise disk_full

    monkeypatch.setattr(lowrank_cli, "analyze", fail)
    result = cli("analyze", "m.safetensors", env={"LOWRANK_DEBUG": "1"})
    assert result.exception is disk_full


def test_a_command_added_later_ends_through_the_same_handler(capsys):
    """Nothing to add to a new command: the handler is the app's, not each command's."""

    @app.command("probe")
    def probe() -> None:
        raise lowrank_cli.OutputError(f"out.safetensors: exists; pass {arg('force')}")

    try:
        with pytest.raises(SystemExit) as ended:
            typer.main.get_command(app).main(["probe"], prog_name="lowrank")
    finally:
        app.registered_commands.pop()
    assert ended.value.code == 1
    assert capsys.readouterr().err == "error: out.safetensors: exists; pass --force\n"


def test_ctrl_c_while_the_command_line_is_parsed_is_one_line(monkeypatch, capsys):
    """Before any command runs (the group's own options), typer turns Ctrl-C into a bare exit 130;
    the handler words it as it does a command's."""
    group = typer.main.get_command(app)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(group), "parse_args", interrupted)
    with pytest.raises(SystemExit) as ended:
        group.main(["analyze", "m.safetensors"], prog_name="lowrank")
    assert ended.value.code == 130
    assert capsys.readouterr().err == "error: interrupted; no output was written\n"


WITH_DEVICE = [name for name in COMMANDS if any("--device" in p.opts for p in GROUP.commands[name].params)]


def test_every_command_that_computes_takes_a_device():
    assert [name for name in COMMANDS if name != "expand"] == WITH_DEVICE


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:", "gpu:0"])
@pytest.mark.parametrize("command", WITH_DEVICE)
def test_a_device_that_is_none_of_the_choices_is_one_usage_line(command, device):
    result = cli(command, *ARGUMENTS[command], "--device", device)
    assert_clean_failure(result, 2, f"--device {device} is not one of auto, cpu, cuda, cuda:N")


def test_cuda_n_names_one_of_the_gpus_torch_sees(monkeypatch):
    """The rule, on a machine made to show two GPUs: cuda, cuda:0 and cuda:1 are theirs, cuda:2 is not."""
    import torch

    from lowrank_cli.ops.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device(name) for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:1")] == [
        "cuda", "cpu", "cuda", "cuda:0", "cuda:1",
    ]  # fmt: skip
    with pytest.raises(UsageError, match=r"^device cuda:2: torch sees 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        resolve_device("cuda:2")


def test_version():
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"lowrank {__version__}"


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_module_does_not_import_torch():
    done = _python("-c", "import lowrank_cli.cli.app, sys; assert 'torch' not in sys.modules, 'torch imported'")
    assert done.returncode == 0, done.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lowrank_cli.cli.app import app\n"
        "for args in (['--help'], ['analyze', '--help'], ['compress', '--help'], ['expand', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr


def test_python_dash_m():
    done = _python("-m", "lowrank_cli", "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout
    assert all(command in done.stdout for command in COMMANDS)


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_main_makes_openmp_threads_sleep_unless_the_user_chose(monkeypatch, given, expected):
    cli_app = importlib.import_module("lowrank_cli.cli.app")  # the module (the package's `app` is the Typer app)

    if given is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    seen = []
    monkeypatch.setattr(cli_app, "app", lambda **kwargs: seen.append(os.environ.get("OMP_WAIT_POLICY")))
    monkeypatch.setattr(cli_app.signal, "signal", lambda *args: None)
    with pytest.raises(SystemExit):
        cli_app.main()
    assert seen == [expected]
