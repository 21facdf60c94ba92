"""Shell completion: Typer's own --install-completion and --show-completion, and the protocol behind them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
# what a shell's completion function runs: the CLI with _LOWRANK_COMPLETE set, then checks torch stayed out
_COMPLETE = (
    "import sys\n"
    "from lowrank_cli.cli.app import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit:\n"
    "    pass\n"
    "assert 'torch' not in sys.modules, 'torch imported'\n"
)


def _complete(words: str) -> list[str]:
    env = {**os.environ, "_LOWRANK_COMPLETE": "complete_bash", "COMP_WORDS": words}
    env["COMP_CWORD"] = str(len(words.split()) - 1)
    done = subprocess.run(
        [sys.executable, "-c", _COMPLETE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_help_offers_completion():
    result = cli("--help")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_commands_and_options_complete_without_torch():
    assert _complete("lowrank ana") == ["analyze"]
    assert _complete("lowrank ex") == ["expand", "extract"]
    assert _complete("lowrank analyze --pl") == ["--plot"]


def test_show_completion_prints_a_bash_script():
    result = cli("--show-completion", "bash")
    assert result.exit_code == 0, result.stderr
    assert "_lowrank_completion" in result.stdout and "_LOWRANK_COMPLETE=complete_bash" in result.stdout
