"""lowrank: the low-rank structure of neural-network weights in safetensors files.

    import lowrank_cli

    B, A = lowrank_cli.factorize(W, max_error=0.01)                 # one tensor
    report = lowrank_cli.analyze("model.safetensors")                # spectra, ranks
    report = lowrank_cli.compress("model.safetensors", rank=64)      # factors NAME.B, NAME.A
    lowrank_cli.expand("model.lowrank.safetensors")                  # the dense checkpoint again
    lowrank_cli.extract("base.safetensors", "tuned.safetensors", "adapter", rank=16)  # PEFT LoRA
    lowrank_cli.extract("sd/", "sd-tuned/", "style.safetensors", rank=16, format="kohya")  # kohya LoRA
    lowrank_cli.resize("adapter", "adapter.r4", rank=4)               # a LoRA (PEFT or kohya) at new ranks
    lowrank_cli.evaluate("model/", "model.lowrank/", text="held-out.txt").fidelity  # what the model lost
    model = lowrank_cli.load_pretrained("model.lowrank/")            # run the factors as they are
    model = lowrank_cli.load_sentence_transformer("minilm.lowrank/") # the same, as a SentenceTransformer

Every checkpoint function returns a `Report` (`report.to_dict()` is the CLI's JSON document) and
raises a `LowrankError` subclass for anything the caller can fix. Importing this package imports
neither torch nor the CLI's libraries; torch loads when a function first needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lowrank_cli.errors import (
    CheckpointError,
    LowrankError,
    MissingExtraError,
    OutputError,
    TensorError,
    UsageError,
)
from lowrank_cli.ops.report import Report, Status, TensorReport, Totals
from lowrank_cli.ops.settings import AdapterFormat, Device, DType, Method, Objective, Split

__version__ = "0.1.0"

# name -> module; imported on first use, so `import lowrank_cli` stays free of torch.
_LAZY = {
    "factorize": "lowrank_cli.api",
    "analyze": "lowrank_cli.api",
    "plot_spectra": "lowrank_cli.api",
    "compress": "lowrank_cli.api",
    "expand": "lowrank_cli.api",
    "extract": "lowrank_cli.api",
    "resize": "lowrank_cli.api",
    "RankPolicy": "lowrank_cli.linalg.policy",
    "LowRankLinear": "lowrank_cli.nn.linear",
    "LowRankEmbedding": "lowrank_cli.nn.linear",
    "apply_factors": "lowrank_cli.nn.loading",
    "LoadResult": "lowrank_cli.nn.loading",
    "load_pretrained": "lowrank_cli.nn.loading",
    "load_sentence_transformer": "lowrank_cli.nn.loading",
    "save_factors": "lowrank_cli.nn.loading",
    "recording_published": "lowrank_cli.io.publish",
    "bound_native_memory": "lowrank_cli.ops.memory",
    "calibrate": "lowrank_cli.api",
    "evaluate": "lowrank_cli.api",
    "heal": "lowrank_cli.api",
    "Evaluation": "lowrank_cli.model.evaluate",
    "CalibrationReport": "lowrank_cli.model.calibrate",
    "Calibrator": "lowrank_cli.model.calibrate",
    "load_calibration": "lowrank_cli.io.calibration",
}

__all__ = [
    "factorize",
    "analyze",
    "plot_spectra",
    "compress",
    "expand",
    "extract",
    "resize",
    "LowRankLinear",
    "LowRankEmbedding",
    "apply_factors",
    "LoadResult",
    "load_pretrained",
    "load_sentence_transformer",
    "save_factors",
    "recording_published",
    "bound_native_memory",
    "calibrate",
    "evaluate",
    "heal",
    "Evaluation",
    "CalibrationReport",
    "Calibrator",
    "load_calibration",
    "Report",
    "TensorReport",
    "Totals",
    "Status",
    "RankPolicy",
    "DType",
    "Method",
    "Objective",
    "Device",
    "Split",
    "AdapterFormat",
    "LowrankError",
    "UsageError",
    "CheckpointError",
    "TensorError",
    "OutputError",
    "MissingExtraError",
]

if TYPE_CHECKING:
    from lowrank_cli.api import (
        analyze,
        calibrate,
        compress,
        evaluate,
        expand,
        extract,
        factorize,
        heal,
        plot_spectra,
    )
    from lowrank_cli.io.calibration import load_calibration
    from lowrank_cli.io.publish import recording_published
    from lowrank_cli.linalg.policy import RankPolicy
    from lowrank_cli.model.calibrate import CalibrationReport, Calibrator
    from lowrank_cli.model.evaluate import Evaluation
    from lowrank_cli.nn.linear import LowRankEmbedding, LowRankLinear
    from lowrank_cli.nn.loading import (
        LoadResult,
        apply_factors,
        load_pretrained,
        load_sentence_transformer,
        save_factors,
    )
    from lowrank_cli.ops.memory import bound_native_memory


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowrank_cli' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
