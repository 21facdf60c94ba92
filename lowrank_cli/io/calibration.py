"""The calibration statistics file (docs/calibration.md): a layer input's second moment per weight.

    tensors:  KEY -> float32 (n, n), E[x xᵀ] over every token of the layer's input x (n features)
    __metadata__["lowrank_calibration"] = JSON {
        "format_version": 1,
        "tokens": N,                      # tokens each moment averages over
        "text_sha256": "…" | null,        # the calibration text's hash (lowrank calibrate)
        "inputs": {WEIGHT_NAME: KEY, …},  # weights that read the same input share one KEY
        "transposed": [WEIGHT_NAME, …],   # weights stored (in, out), GPT-2's Conv1D
        "sensitivity": {WEIGHT_NAME: s, …},  # optional: the model's output error per unit of this
                                          # weight's squared error (ops.calibrate.measure_sensitivity)
        "probe_tokens": N                 # optional: the tokens the sensitivity was measured on
    }

WEIGHT_NAME is the checkpoint's own tensor name, so `--calibration` finds each tensor's moment by name.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError
from lowrank_cli.io.paths import require_file
from lowrank_cli.io.writer import current_umask

METADATA_KEY = "lowrank_calibration"
FORMAT_VERSION = 1


@dataclass
class Calibration:
    """Moments by weight name (shared inputs share one tensor), and where they came from."""

    moments: dict[str, torch.Tensor]
    tokens: int = 0
    text_sha256: str | None = None
    transposed: set[str] = field(default_factory=set)
    source: str = ""
    sensitivity: dict[str, float] = field(default_factory=dict)  # weight name -> s (docs/calibration.md)

    def moment_for(self, name: str) -> torch.Tensor | None:
        return self.moments.get(name)


def write_calibration(
    path: str | Path,
    moments: dict[str, torch.Tensor],
    keys: dict[str, str],
    *,
    tokens: int,
    text_sha256: str | None = None,
    transposed: set[str] | None = None,
    sensitivity: dict[str, float] | None = None,
    probe_tokens: int = 0,
) -> None:
    """Save moments (KEY -> (n, n)) with the weight-name -> KEY map; atomic (a temporary, then rename)."""
    from safetensors.torch import save_file

    payload = {
        "format_version": FORMAT_VERSION,
        "tokens": int(tokens),
        "text_sha256": text_sha256,
        "inputs": keys,
        "transposed": sorted(transposed or ()),
    }
    if sensitivity:
        payload["sensitivity"] = {name: float(value) for name, value in sorted(sensitivity.items())}
        payload["probe_tokens"] = int(probe_tokens)
    tensors = {key: moment.to(torch.float32).contiguous() for key, moment in moments.items()}
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(payload)})
        os.chmod(temporary, 0o666 & ~current_umask())  # a normal file's mode, as every other output
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def read_calibration(path: str | Path) -> Calibration:
    """The statistics of a file written by `lowrank calibrate` (or Calibrator.save)."""
    from safetensors import SafetensorError, safe_open

    require_file(path, "give the statistics file lowrank calibrate wrote")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if METADATA_KEY not in metadata:
                raise CheckpointError(
                    f"{path}: has no '{METADATA_KEY}' metadata; make calibration statistics with lowrank calibrate"
                )
            payload = json.loads(metadata[METADATA_KEY])
            if payload.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(f"{path}: calibration format {payload.get('format_version')!r} is not supported")
            stored = {key: handle.get_tensor(key) for key in set(payload["inputs"].values())}
    except CheckpointError:
        raise
    except SafetensorError as exc:  # not an OSError: a JSON or text file given as STATS lands here
        reason = str(exc).removeprefix("Error while deserializing header: ")
        raise CheckpointError(
            f"{path}: not a safetensors file ({reason}); make calibration statistics with lowrank calibrate"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path}: cannot be read as calibration statistics ({problem})") from None
    for key, moment in stored.items():
        if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
            raise CheckpointError(f"{path}: moment '{key}' has shape {tuple(moment.shape)}, not (n, n)")
    return Calibration(
        moments={name: stored[key] for name, key in payload["inputs"].items()},
        tokens=int(payload.get("tokens", 0)),
        text_sha256=payload.get("text_sha256"),
        transposed=set(payload.get("transposed", ())),
        source=str(path),
        sensitivity=_sensitivity(payload.get("sensitivity") or {}, path),
    )


def _sensitivity(values: dict, path: str | Path) -> dict[str, float]:
    if not isinstance(values, dict) or not all(
        isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values.values()
    ):
        raise CheckpointError(f"{path}: its sensitivities are not finite non-negative numbers; rerun lowrank calibrate")
    return {str(name): float(value) for name, value in values.items()}


def load_calibration(path: str | Path) -> dict[str, torch.Tensor]:
    """Weight name -> E[x xᵀ] of that weight's input (float32, n×n), from a calibration statistics file."""
    return read_calibration(path).moments
