"""Inputs checked before they are opened: every file lowrank reads goes through `require_file`.

open() on a FIFO waits for a writer that may never come, and a character device or socket is no
file to read a model from; so a path is asked what it is (stat, which never blocks) first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lowrank_cli.errors import CheckpointError

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def require_file(path: str | os.PathLike, fix: str) -> Path:
    """`path`, checked to be an existing regular file (or a link to one); else a CheckpointError ending in `fix`."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; {fix}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a folder, not a file; {fix}")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a regular file; {fix}")
    return path


def require_files_in(folder: str | os.PathLike, fix: str) -> None:
    """Every visible entry of `folder` that is not a folder, checked to be a regular file: what a
    loader that reads the folder by itself (transformers' from_pretrained) may open."""
    for path in sorted(Path(folder).iterdir()):
        if not path.name.startswith(".") and not path.is_dir():
            require_file(path, fix)
