"""The CLI's options, declared once and shared by the commands (typer `Annotated` aliases).

Choices come from the library's enums, so typer validates them and `--help` lists them; defaults
that are not the obvious one (a number of tokens, a batch size) are the library's own constants.
Where an option means something else in one command, that command has its own alias, so each
command's --help speaks of that command only (tests/test_cli.py checks every one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import lowrank_cli.ops.settings as defaults  # torch-free: the library's own default values
from lowrank_cli import Device, DType, Method, Objective, Split

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
        " matrices hold ≤ F·Σ m·n of the selected matrices' params.",
        metavar="F",
    ),
]
AdapterBudget = Annotated[
    Optional[float],
    typer.Option(
        "--budget",
        help="Policy: 0 < F < 1; a LoRA rank per module, chosen jointly so that the adapter's factors hold"
        " ≤ F·Σ m·n of the selected modules' params.",
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
ObjectiveOption = Annotated[
    Objective,
    typer.Option(
        "--objective",
        help="params: factors wherever they hold fewer params than the matrix; speed: only where they hold"
        " ≤ 80 % of them, where they can gain speed too (others stay whole; a budget's ranks stop there).",
        case_sensitive=False,
        metavar="OBJECTIVE",
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
Seed = Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD; same seed, same result.", metavar="N")]
HealSeed = Annotated[
    int,
    typer.Option("--seed", help="Seed of the order the batches are taken in; same seed, same result.", metavar="N"),
]
HealBlockwise = Annotated[
    bool,
    typer.Option(
        "--blockwise",
        help="Train each block toward the reference's block, one block in memory at a time (--steps, --epochs"
        " per block).",
    ),
]
# A str, not the Device enum: cuda:N names one GPU of several. The library checks it (a one-line usage error).
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where the maths runs: auto (cuda if present), cpu, cuda, or cuda:N for the Nth GPU.",
        metavar="DEVICE",
        callback=lambda value: value.lower(),
        autocompletion=lambda: [device.value for device in Device],
    ),
]
DEFAULT_DEVICE = Device.auto.value
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
# A str, not a Path, as Output; for the commands that must be told where to write, each of its own output.
StatisticsOutput = Annotated[
    str,
    typer.Option(
        "--output", "-o", help="The statistics file to write (.safetensors).", metavar="OUT", show_default=False
    ),
]
HealedOutput = Annotated[
    str,
    typer.Option(
        "--output",
        "-o",
        help="Where the healed model goes: a folder or file like COMPRESSED (its names, ranks and format).",
        metavar="OUT",
        show_default=False,
    ),
]
Reference = Annotated[
    Path,
    typer.Argument(help="The original Hugging Face model folder.", show_default=False, metavar="REFERENCE"),
]

# The text a model runs over (calibrate, evaluate, heal), and how it is sampled.
Text = Annotated[Path, typer.Option("--text", help="The UTF-8 text the model runs over.", metavar="FILE")]
TrainingText = Annotated[
    Path, typer.Option("--text", help="The UTF-8 text the factors are trained on.", metavar="FILE")
]
EvalText = Annotated[
    Optional[Path],
    typer.Option("--eval-text", help="The UTF-8 text --fidelity is measured on.", metavar="FILE"),
]
HealEvalText = Annotated[
    Optional[Path],
    typer.Option(
        "--eval-text", help="Also measure the fidelity before and after healing on this UTF-8 text.", metavar="FILE"
    ),
]
SeqLen = Annotated[
    int,
    typer.Option("--seq-len", help="Tokens per sample at most: a window's length, where a line is cut.", metavar="N"),
]
Tokens = Annotated[
    int, typer.Option("--tokens", help="Tokens the samples hold, taken evenly over the text.", metavar="N")
]
Samples = Annotated[Optional[int], typer.Option("--samples", help="Samples to run at most.", metavar="N")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.", metavar="N")]
HealBatchSize = Annotated[int, typer.Option("--batch-size", help="Samples per optimizer step.", metavar="N")]

# compress --fidelity: how its --eval-text is sampled (None: evaluate's defaults, shown in the help).
EvalSeqLen = Annotated[
    Optional[int],
    typer.Option(
        "--seq-len",
        help=f"With --fidelity: tokens per --eval-text sample at most [default: {defaults.SEQ_LEN}].",
        metavar="N",
    ),
]
EvalTokens = Annotated[
    Optional[int],
    typer.Option(
        "--tokens",
        help=f"With --fidelity: tokens the --eval-text samples hold [default: {defaults.EVALUATE_TOKENS}].",
        metavar="N",
    ),
]
EvalSplit = Annotated[
    Optional[Split],
    typer.Option(
        "--split",
        help="With --fidelity: how --eval-text is cut into samples (as evaluate cuts --text) [default: auto].",
        case_sensitive=False,
        metavar="[" + "|".join(split.value for split in Split) + "]",  # as a plain Split option shows it
        show_default=False,
    ),
]
EvalBatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size",
        help=f"With --fidelity: samples per forward pass [default: {defaults.EVALUATE_BATCH_SIZE}].",
        metavar="N",
    ),
]
