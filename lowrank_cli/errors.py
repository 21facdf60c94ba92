"""One error hierarchy: the library raises, the CLI maps each class to a line and an exit code.

This module is the base layer: every other part of lowrank may import it, and it imports nothing.
A message that names an argument writes it as `arg("rank")`; the library spells it as the Python
keyword (`rank must be ≥ 1`), the CLI as its flag (`--rank must be ≥ 1`), so each speaks its
caller's language. The mark arg() leaves holds a token chosen when this module loads, so a path or
tensor name in the same message (`runs/{rank}/model.safetensors`) is never mistaken for one.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_QUALITY_GATE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

# The arguments a message may name.
ARGUMENTS = (
    "rank", "energy", "max_error", "budget", "dtype", "method", "seed", "device", "include", "exclude",
    "force", "out", "embeddings", "conv", "base_model", "lora_only", "rtol", "calibration", "top", "text", "seq_len",
    "samples", "batch_size", "split", "sensitivity", "tokens", "probe_tokens", "other_model", "fidelity",
    "eval_text", "steps", "epochs", "lr", "plot", "diff", "format", "objective",
)  # fmt: skip
# What no file name, tensor name or other user text can hold: NUL cannot be in a path, and no
# checkpoint can know the token.
_MARK = f"\0{secrets.token_hex(8)}:"
_ARGUMENT = re.compile(re.escape(_MARK) + r"(" + "|".join(ARGUMENTS) + r")\0")


def arg(name: str) -> str:
    """A mark for the argument `name` in an error message, which each front end spells its own way."""
    if name not in ARGUMENTS:
        raise ValueError(f"unknown argument {name!r}; add it to ARGUMENTS")
    return f"{_MARK}{name}\0"


class LowrankError(Exception):
    """A failure the user can fix; its message names the file or tensor and the fix.

    `template` may name arguments with `arg(name)`; `str(error)` spells them as Python keywords and
    `worded(spell)` lets a front end spell them its own way. Any other text, `{rank}` in a path
    included, is left as it is.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.worded(lambda name: name))

    def worded(self, spell: Callable[[str], str]) -> str:
        """The message with every `arg(argument)` mark replaced by spell(argument)."""
        return _ARGUMENT.sub(lambda match: spell(match.group(1)), self.template)


class Note(str):
    """A line of a result's notes that may name arguments with `arg(name)`: as a str it spells them
    as Python keywords, as LowrankError does, and `worded(spell)` lets a front end spell them."""

    template: str

    def __new__(cls, template: str) -> Note:
        note = super().__new__(cls, _ARGUMENT.sub(lambda match: match.group(1), template))
        note.template = template
        return note

    def worded(self, spell: Callable[[str], str]) -> str:
        """The note with every `arg(argument)` mark replaced by spell(argument)."""
        return _ARGUMENT.sub(lambda match: spell(match.group(1)), self.template)


def worded(note: str, spell: Callable[[str], str]) -> str:
    """Any note as a front end shows it: a Note spelled its way, a plain str as it is."""
    return note.worded(spell) if isinstance(note, Note) else note


class UsageError(LowrankError, ValueError):
    """Arguments that do not fit together or are out of range."""

    exit_code = EXIT_USAGE


class CheckpointError(LowrankError):
    """An input (checkpoint, shard, index, statistics, text) that is missing, is not a regular file,
    cannot be read, or does not fit the model (statistics of another model)."""


class TensorError(LowrankError):
    """A tensor whose values cannot be factorized (NaN, Inf, …)."""


class OutputError(LowrankError):
    """An output that cannot or must not be written."""


class MissingExtraError(LowrankError):
    """An optional dependency (transformers, …) that this call needs is not installed."""


def require_extra(module: str, extra: str, feature: str):
    """`module`, imported now: an optional dependency, so when it is missing say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{feature} needs {module}, which is not installed; pip install 'lowrank[{extra}]'"
        ) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that it unwinds through every cleanup (and no `except Exception`);
    the CLI ends with EXIT_TERMINATED for it, EXIT_INTERRUPTED for Ctrl-C."""
