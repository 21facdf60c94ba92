"""The CLI's options, declared once and shared by the commands (typer `Annotated` aliases).

Choices come from the library's enums, so typer validates them and `--help` lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli import Device, DType, Method, Split

# How the library's argument names read on the command line, where they differ from --name.
FLAGS = {"out": "-o/--output", "paths": "PATHS"}


def flag(argument: str) -> str:
    return FLAGS.get(argument, "--" + argument.replace("_", "-"))


Include = Annotated[
    Optional[list[str]],
    typer.Option("--include", help="Only tensors whose name matches this glob (repeatable).", metavar="GLOB"),
]
Exclude = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", help="Leave out tensors whose name matches this glob (repeatable).", metavar="GLOB"),
]
Rank = Annotated[
    Optional[int], typer.Option("--rank", help="Policy: keep R singular values (clamped to min(m, n)).", metavar="R")
]
Energy = Annotated[
    Optional[float],
    typer.Option("--energy", help="Policy: smallest rank keeping fraction F of Σσ², 0 < F ≤ 1.", metavar="F"),
]
MaxError = Annotated[
    Optional[float],
    typer.Option("--max-error", help="Policy: smallest rank with ‖W−BA‖/‖W‖ ≤ E, 0 ≤ E < 1.", metavar="E"),
]
Budget = Annotated[
    Optional[float],
    typer.Option(
        "--budget",
        help="Policy: 0 < F < 1; a rank per matrix, or kept whole, chosen jointly so that factors plus whole"
        " matrices hold ≤ F·Σ m·n of the selected matrices' params (extract: LoRA ranks only).",
        metavar="F",
    ),
]
FailAbove = Annotated[
    Optional[float], typer.Option("--fail-above", help="Exit 3 if any tensor's relative error exceeds E.", metavar="E")
]
Rtol = Annotated[
    Optional[float],
    typer.Option("--rtol", help="Numerical rank counts σ > σ_max·RTOL (default max(m, n)·ε).", metavar="RTOL"),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite OUT if it exists.")]
DTypeOption = Annotated[
    DType,
    typer.Option(
        "--dtype",
        help="Store factors and every other float16/bfloat16/float32/float64 tensor in DTYPE: keep"
        " (each tensor's own), float32, float16, bfloat16 or float64. Errors include the cast.",
        case_sensitive=False,
        metavar="DTYPE",
    ),
]
FactorDTypeOption = Annotated[
    DType,
    typer.Option(
        "--dtype",
        help="Store the factors in DTYPE: keep (each tensor's own), float32, float16, bfloat16 or float64.",
        case_sensitive=False,
        metavar="DTYPE",
    ),
]
MethodOption = Annotated[
    Method,
    typer.Option(
        "--method",
        help="SVD method: auto, exact or randomized (seeded by --seed).",
        case_sensitive=False,
        metavar="METHOD",
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD; same seed, same factors.", metavar="N")]
DeviceOption = Annotated[
    Device,
    typer.Option(
        "--device",
        help="Where the maths runs: auto (cuda if present), cpu or cuda.",
        case_sensitive=False,
        metavar="DEVICE",
    ),
]
# A str, not a Path: Path() drops the trailing "/" that means "into this folder".
Output = Annotated[
    Optional[str],
    typer.Option(
        "--output",
        "-o",
        help="Output file or folder (default: beside the input). A folder in gives a folder out;"
        " OUT/ or an existing folder takes a file input under its own name.",
        metavar="OUT",
        show_default=False,
    ),
]
Calibration = Annotated[
    Optional[Path],
    typer.Option(
        "--calibration",
        help="Statistics from lowrank calibrate: factor W·S so errors are of the layer's output (docs/calibration.md).",
        metavar="STATS",
    ),
]
SplitOption = Annotated[
    Split,
    typer.Option(
        "--split",
        help="How the text is cut into samples: windows of --seq-len tokens; lines, one per line (sentences,"
        " prompts); auto: lines when the file is one short sample per line, else windows.",
        case_sensitive=False,
    ),
]
OtherModel = Annotated[
    bool,
    typer.Option(
        "--other-model",
        help="Use --calibration statistics made on another model of the same shapes (refused by default).",
    ),
]
