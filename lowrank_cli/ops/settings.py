"""The choices and defaults of the commands that compute (declared once: the library checks and uses them,
the CLI lists them and shows the defaults in --help).

Nothing here imports torch, so the CLI can build its options from these at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lowrank_cli.errors import UsageError, arg

# How calibrate, evaluate and heal (and compress's fidelity search) sample a text, unless told otherwise.
SEQ_LEN = 128  # tokens per sample at most: a window's length, where a line is cut
CALIBRATE_TOKENS = 32768  # tokens calibrate's samples hold (256 windows of 128)
CALIBRATE_BATCH_SIZE = 8  # samples per forward pass
PROBE_TOKENS = 2048  # tokens the sensitivity probe runs each time a weight is cut (16 windows of 128)
EVALUATE_TOKENS = 16384  # tokens evaluated (128 windows of 128, or some 800 sentences)
EVALUATE_BATCH_SIZE = 16
HEAL_TOKENS = 262144  # training tokens
HEAL_EPOCHS = 1  # passes over the samples
HEAL_LR = 3e-4  # AdamW's learning rate, decaying linearly to 0
HEAL_BATCH_SIZE = 16  # samples per optimizer step
HEAL_MAX_GRAD_NORM = 1.0  # the factors' gradient norm is clipped to this, as transformers' Trainer does


class DType(str, Enum):
    """The dtype factors are stored in; `keep` stores them in the tensor's own dtype."""

    keep = "keep"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float64 = "float64"


class Method(str, Enum):
    """How the SVD is computed: `auto` picks exact for small or high-rank cases, randomized otherwise."""

    auto = "auto"
    exact = "exact"
    randomized = "randomized"


class Device(str, Enum):
    """Where the maths runs: `auto` is cuda when torch sees a GPU, else cpu."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Objective(str, Enum):
    """What compress stores factors for: `params`, wherever they hold fewer numbers than the matrix;
    `speed`, only where they hold at most SPEED_SHARE (80 %) of them, where a layer running them can
    gain speed too (linalg.spectrum.speed_rank): any other matrix stays whole."""

    params = "params"
    speed = "speed"


class AdapterFormat(str, Enum):
    """How a LoRA adapter is written: a PEFT folder, or one kohya (sd-scripts) .safetensors file."""

    peft = "peft"
    kohya = "kohya"


class Split(str, Enum):
    """How a text is cut into samples: `windows` of --seq-len tokens, one sample per `lines` line, or `auto`
    (lines when the file is one short sample per line, else windows)."""

    auto = "auto"
    windows = "windows"
    lines = "lines"


def choice(kind: type[Enum], value: object, argument: str) -> Enum:
    """`value` as a member of `kind`, or a UsageError that lists the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise UsageError(f"{arg(argument)} {value} is not one of {choices}") from None


@dataclass(frozen=True)
class Settings:
    """How factors are computed and stored."""

    dtype: DType = DType.keep
    method: Method = Method.auto
    seed: int = 0
    device: str = "cpu"  # resolved: "cpu", "cuda" or "cuda:N"
    rtol: float | None = None  # numerical rank counts σ > σ_max·rtol (default max(m, n)·ε)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", choice(DType, self.dtype, "dtype"))
        object.__setattr__(self, "method", choice(Method, self.method, "method"))
        if self.rtol is not None and not self.rtol >= 0:
            raise UsageError(f"{arg('rtol')} must be ≥ 0, got {self.rtol}")

    def as_dict(self) -> dict[str, str | int]:
        return {"dtype": self.dtype.value, "method": self.method.value, "seed": self.seed}
