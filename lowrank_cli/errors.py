"""One error hierarchy: the core raises, the CLI maps each class to a line and an exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_QUALITY_GATE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class LowrankError(Exception):
    """A failure the user can fix; its message names the file or tensor and the fix."""

    exit_code = EXIT_FAILURE


class UsageError(LowrankError):
    """Options that do not fit together or are out of range."""

    exit_code = EXIT_USAGE


class CheckpointError(LowrankError):
    """An input file, shard or index that cannot be read as safetensors."""


class TensorError(LowrankError):
    """A tensor whose values cannot be factorized (NaN, Inf, …)."""


class OutputError(LowrankError):
    """An output that cannot or must not be written."""


class Interrupted(LowrankError):
    """SIGINT or SIGTERM arrived; partial output has been removed."""

    exit_code = EXIT_INTERRUPTED


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that it unwinds through every cleanup (and no `except Exception`)."""
