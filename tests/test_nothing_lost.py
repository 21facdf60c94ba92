"""Issue 19, "Nothing lost, nothing false": no reported number the files on disk do not bear out,
no value written that the input did not hold, and a one-line refusal where lowrank cannot keep either promise.

Every hostile input is made here in tmp_path; every expected number is recomputed from the files as written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TORCH_DTYPE, cli_json, geometric, load, relative_error, save, with_spectrum

# --- 6: --max-error is met by the factors as stored, in every dtype --------------------------------


def _tail_errors(w: torch.Tensor) -> np.ndarray:
    """tail[r]: the optimal rank-r relative error of W, in float64."""
    s = np.linalg.svd(w.to(torch.float64).numpy(), compute_uv=False)
    return np.sqrt(np.cumsum((s**2)[::-1])[::-1] / (s**2).sum())


@pytest.mark.parametrize(("dtype", "ratio", "target"), [("bfloat16", 0.9, 0.005), ("float16", 0.8, 0.0004)])
def test_max_error_is_met_on_the_stored_factors(tmp_path, dtype, ratio, target):
    """The spectrum's rank misses the target once B and A are rounded to 16 bits: more terms, measured."""
    w = with_spectrum(128, 96, geometric(96, ratio))
    source = save(tmp_path / "w.safetensors", {"w": w})
    out = tmp_path / "w.lowrank.safetensors"
    row = cli_json("compress", source, "--max-error", target, "--dtype", dtype, "-o", out)["tensors"][0]
    factors = load(out)
    assert factors["w.B"].dtype == TORCH_DTYPE["BF16" if dtype == "bfloat16" else "F16"]
    measured = relative_error(w, factors["w.B"], factors["w.A"])
    assert row["status"] == "factorized"
    assert measured <= target
    assert row["rel_error"] == pytest.approx(measured, rel=1e-5)
    spectral_rank = int(np.argmax(_tail_errors(w) <= target))  # what the spectrum alone would keep
    assert row["rank"] > spectral_rank  # the float32 rank would have missed; lowrank added terms


def test_max_error_below_the_dtypes_floor_keeps_the_tensor_dense(tmp_path):
    """bfloat16 rounding alone costs ~2e-3 of ‖W‖: no rank meets 1e-3, so W is stored whole, its cast error printed."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 8, generator=gen) @ torch.randn(8, 256, generator=gen)
    w += 1e-4 * torch.randn(256, 256, generator=gen)
    source = save(tmp_path / "w.safetensors", {"w": w})
    out = tmp_path / "w.lowrank.safetensors"
    row = cli_json("compress", source, "--max-error", 0.001, "--dtype", "bfloat16", "-o", out)["tensors"][0]
    assert row["status"] == "dense"
    assert "bfloat16" in row["reason"] and "0.001" in row["reason"]
    written = load(out)
    assert set(written) == {"w"}
    assert written["w"].dtype == torch.bfloat16
    w64 = w.to(torch.float64)
    cast_error = float(torch.linalg.norm(w64 - written["w"].to(torch.float64)) / torch.linalg.norm(w64))
    assert row["rel_error"] == pytest.approx(cast_error, rel=1e-6)
