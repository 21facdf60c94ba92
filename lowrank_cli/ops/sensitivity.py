"""The sensitivity probe: what a model's output loses per unit of one weight's squared error.

Each weight is cut in place to the rank that keeps half its params, as `compress --calibration`
would cut it (of W·S with its input's moment, D^½·W with an embedding's lookups, else W), the
model is run on the same inputs, and the weight is put back:

    s = mean over the output tensors of ‖y′ − y‖² / ‖y‖²  /  Σ_{i>r} σ_i²,

σ the singular values of what was cut: the same squared error the budget's spectra measure, so
s·tail(r) estimates what any cut costs the model (linalg.budget). Calibrator.measure_sensitivity
runs it over a calibrated model's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from lowrank_cli.io.hfconfig import is_conv1d
from lowrank_cli.linalg.whiten import RowWeights
from lowrank_cli.linalg.whiten import whitener as make_whitener

Moment = torch.Tensor | RowWeights | None  # a Linear's input moment, an embedding's row weights, or none


@torch.no_grad()
def sensitivities(
    run: Callable[[], object], weights: Iterable[tuple[str, torch.nn.Module, Moment]]
) -> Iterator[tuple[str, float | None]]:
    """(name, s) for each (name, module, moment) of `weights`, one at a time; s is None for a weight
    with nothing to cut (already of low rank).

    run() must run the model on the same inputs each time and return its output (a tensor, or a
    tuple, list or dict of them); it runs once first for the reference output. `weights` is read
    lazily, so a moment is made only when its weight's turn comes.
    """
    reference = output_floats(run())
    for name, module, moment in weights:
        yield name, weight_sensitivity(module, moment, run, reference)


def weight_sensitivity(
    module: torch.nn.Module, moment: Moment, run: Callable[[], object], reference: list[torch.Tensor]
) -> float | None:
    """One weight's sensitivity: cut it in place, run the probe, put it back."""
    weight = module.weight
    transposed = is_conv1d(module)  # stored (in, out)
    cut, tail = half_cut(weight.T if transposed else weight, moment)
    if cut is None or not tail > 0:
        return None
    original = weight.data.clone()
    try:
        weight.data.copy_(cut.T if transposed else cut)
        loss = relative_change(reference, output_floats(run()))
    finally:
        weight.data.copy_(original)
    return loss / tail


def half_cut(weight: torch.Tensor, moment: Moment) -> tuple[torch.Tensor | None, float]:
    """W′ at the rank keeping half of W's (m, n) params, and the squared error Σ_{i>r} σ_i² the cut leaves.

    With a moment, the SVD is of W·S and W′ = U_r·Σ_r·V_rᵀ·S⁻¹ (linalg.whiten), as compress makes it;
    with an embedding's row weights, of D^½·W and W′ = D^-½·U_r·Σ_r·V_rᵀ.
    """
    m, n = weight.shape
    rank = max(1, m * n // (2 * (m + n)))
    if rank >= min(m, n):
        return None, 0.0
    dtype = torch.float64 if weight.device.type == "cpu" else torch.float32
    w = weight.detach().to(dtype)
    if isinstance(moment, RowWeights):
        whitener = moment if moment.weights.shape[0] == m else None
    else:
        whitener = make_whitener(moment.to(w.device)) if moment is not None and moment.shape[0] == n else None
    target = w if whitener is None else whitener.whiten(w)
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    b, a = u[:, :rank] * sigma[:rank], vh[:rank]
    if whitener is not None:
        b, a = whitener.unwhiten_factors(b, a)
    cut = b @ a  # (m, r) @ (r, n)
    if not bool(torch.isfinite(cut).all()):
        return None, 0.0
    return cut.to(weight.dtype), float((sigma[rank:].to(torch.float64) ** 2).sum())


def output_floats(output: object) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, or a tuple, list or dict of them)."""
    if isinstance(output, torch.Tensor):
        return [output.detach()] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return [tensor for item in output for tensor in output_floats(item)]
    return []  # anything else (a key-value cache object, None) is not an output to compare


def relative_change(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """The mean over output tensors of ‖y′ − y‖² / ‖y‖² (tensors that are all zero are left out)."""
    changes = []
    for y, y2 in zip(reference, outputs, strict=True):
        y, y2 = y.to(torch.float32), y2.to(torch.float32)  # a float32 temporary, float64 sums: logits can be large
        total = float(y.square().sum(dtype=torch.float64))
        if total > 0:
            changes.append(float((y2 - y).square().sum(dtype=torch.float64)) / total)
    return sum(changes) / len(changes) if changes else 0.0
