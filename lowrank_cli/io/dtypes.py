"""The safetensors dtype codes lowrank knows, and their torch equivalents."""

from __future__ import annotations

import torch

# code -> (torch dtype, bytes per element). Every dtype safetensors writes that torch can hold.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
CODE_OF = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}


def torch_dtype(code: str) -> torch.dtype:
    return DTYPES[code][0]


def compute_dtype(code: str) -> torch.dtype:
    """SVDs run in float32, or in float64 for float64 tensors."""
    return torch.float64 if code == "F64" else torch.float32
