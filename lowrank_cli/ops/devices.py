"""Where the maths runs."""

from __future__ import annotations

import re

import torch

from lowrank_cli.errors import UsageError, arg

_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: object) -> str:
    """auto → cuda when a GPU is visible, else cpu; cuda or cuda:N must name a GPU torch sees."""
    name = getattr(name, "value", name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    cuda = _CUDA.fullmatch(name) if isinstance(name, str) else None
    if cuda is None:
        raise UsageError(f"{arg('device')} {name} is not one of auto, cpu, cuda, cuda:N (N a GPU's index)")
    if not torch.cuda.is_available():
        raise UsageError(f"{arg('device')} {name}: no CUDA device is visible to torch; use {arg('device')} cpu")
    count = torch.cuda.device_count()
    if cuda[1] is not None and int(cuda[1]) >= count:
        raise UsageError(f"{arg('device')} {name}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return name
