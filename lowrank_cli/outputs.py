"""Where outputs go, and the checks that keep inputs and existing files safe."""

from __future__ import annotations

import os
from pathlib import Path

from lowrank_cli.checkpoint import Checkpoint
from lowrank_cli.errors import OutputError, UsageError


def default_output(checkpoint: Checkpoint, suffix: str) -> Path:
    """`<input stem><suffix>` beside the input, e.g. model.lowrank.safetensors."""
    source = checkpoint.source
    if source.is_dir():
        return source.with_name(source.name + suffix.removesuffix(".safetensors"))
    return source.with_name(source.stem + suffix)


def check_output(checkpoint: Checkpoint, out: Path, *, force: bool) -> Path:
    """Refuse an output that is an input, exists (without force) or has no folder."""
    out = Path(out)
    resolved = out.resolve()
    for path in [checkpoint.source, *checkpoint.paths]:
        if resolved == path.resolve() or (out.exists() and path.exists() and os.path.samefile(out, path)):
            raise UsageError(f"{out}: this is an input of the command; choose another -o")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to overwrite it or choose another -o")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name with -o")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist; create it first")
    return out
