"""Where the maths runs."""

from __future__ import annotations

import torch

from lowrank_cli.errors import UsageError, arg


def resolve_device(name: object) -> str:
    """auto → cuda when a GPU is visible, else cpu; cuda (or cuda:N) without a GPU is an error."""
    name = getattr(name, "value", name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if isinstance(name, str) and (name == "cuda" or name.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise UsageError(f"{arg('device')} {name}: no CUDA device is visible to torch; use {arg('device')} cpu")
        return name
    raise UsageError(f"{arg('device')} {name} is not one of auto, cpu, cuda")
