"""The command line itself: help, version, entry points, and a torch-free import."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import typer
from conftest import ROOT, cli

from lowrank_cli import __version__
from lowrank_cli.cli.app import app

COMMANDS = sorted(typer.main.get_command(app).commands)


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


def test_no_arguments_is_a_usage_error_that_shows_help():
    result = cli()
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: lowrank [OPTIONS] COMMAND")
    assert result.stdout == ""


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
