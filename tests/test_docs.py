"""The docs name only commands and options that exist (as sqlite-utils' test_docs does).

Every command line in README.md and docs/*.md, in a code block or an inline code span, that runs
`lowrank COMMAND …` (or is written `COMMAND --option`, as prose does) must name a command of the
app, and each of its options must be one of that command's; a span that is a bare `--option` must
be an option of some command. A README that still shows a renamed or removed option fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from conftest import ROOT

from lowrank_cli.cli.app import app

GROUP = typer.main.get_command(app)
HELP = {"-h", "--help"}


def _options(command) -> set[str]:
    return HELP | {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


OPTIONS = {name: _options(command) for name, command in GROUP.commands.items()}
TOP_LEVEL = _options(GROUP)
ANY = set.union(*OPTIONS.values())
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SPAN = re.compile(r"`([^`\n]+)`")
_SEPARATOR = re.compile(r"\s(?:\|\|?|&&|;)\s|\n")  # a pipe and `a|b` in a value are told apart by spaces
_OPTION = re.compile(r"^(--[a-z][a-z0-9-]*|-[a-zA-Z])(?:=.*)?$")
_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


def _code(text: str) -> list[str]:
    """The fenced blocks (continuation lines joined) and the inline spans of the text outside them."""
    blocks = [block.replace("\\\n", " ") for block in _FENCE.findall(text)]
    return blocks + _SPAN.findall(_FENCE.sub("", text))


def command_lines(text: str) -> list[tuple[str, list[str]]]:
    """(command, its options) for each `lowrank COMMAND …` in the text's code; "" for lowrank itself,
    the placeholder (COMMAND) as written; `COMMAND --option` spans as if lowrank came first."""
    found = []
    for code in _code(text):
        for line in _SEPARATOR.split(code):
            words = line.split("#")[0].split()
            while words and (words[0] == "$" or _ASSIGNMENT.match(words[0])):
                words = words[1:]
            if words and words[0] in OPTIONS and len(words) > 1 and words[1].startswith("-") and code == line:
                words = ["lowrank", *words]  # a span such as `compress --fidelity`
            if len(words) < 1 or words[0] != "lowrank":
                continue
            name = "" if len(words) == 1 or words[1].startswith("-") else words[1]
            found.append((name, [m[1] for w in words[1:] if (m := _OPTION.match(w))]))
    return found


def bare_options(text: str) -> list[str]:
    """The spans that are an option alone, with or without its value: `--budget 0.5`, `--top K`."""
    return [m[1] for span in _SPAN.findall(_FENCE.sub("", text)) if (m := _OPTION.match(span.split()[0]))]


def test_the_reader_finds_commands_options_and_placeholders():
    text = (
        "Run `lowrank compress m.safetensors --rank 2 -o out/` or `analyze --json`; `--top K`; `lowrank --help`;\n"
        "```bash\n$ LOWRANK_DEBUG=1 lowrank extract a b -o ad \\\n  --rank 4 | jq .totals  # --not-this\n"
        "lowrank COMMAND --help\npip install 'lowrank[plot]' --upgrade\n```\n"
    )
    assert sorted(command_lines(text)) == sorted(
        [
            ("compress", ["--rank", "-o"]),
            ("analyze", ["--json"]),
            ("", ["--help"]),
            ("extract", ["-o", "--rank"]),
            ("COMMAND", ["--help"]),
        ]
    )
    assert sorted(bare_options(text)) == ["--top"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_option_in_the_docs_exists(path: Path):
    text = path.read_text(encoding="utf-8")
    stale = []
    for name, options in command_lines(text):
        if name.isupper():  # a placeholder: what it shows must hold for every command
            known = set.intersection(*OPTIONS.values())
        elif name:
            known = OPTIONS.get(name)
            if known is None:
                stale.append(f"lowrank {name}: no such command")
                continue
        else:
            known = TOP_LEVEL
        stale += [f"lowrank {name} {option}: no such option" for option in options if option not in known]
    stale += [f"{option}: no command has it" for option in bare_options(text) if option not in ANY | TOP_LEVEL]
    assert stale == [], stale


def test_the_docs_show_every_command():
    shown = {name for path in DOCS for name, _ in command_lines(path.read_text(encoding="utf-8"))}
    assert set(OPTIONS) <= shown, set(OPTIONS) - shown
