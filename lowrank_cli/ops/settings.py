"""The choices of the commands that compute (declared once: the library checks them, the CLI lists them).

Nothing here imports torch, so the CLI can build its options from these types at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lowrank_cli.errors import UsageError, arg


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
