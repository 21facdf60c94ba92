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

import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

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
    swap = CutSwap.of(module, moment)
    if swap is None:
        return None
    try:
        swap.cut()
        loss = relative_change(reference, output_floats(run()))
    finally:
        swap.restore()
    return loss / swap.tail


class CutSwap:
    """A weight's half cut (half_cut) put in its place and taken out again, as often as a probe needs.

    The parameter is pointed at the cut and back at its own tensor (never copied): besides the weight,
    memory holds one tensor of its size, the cut.
    """

    def __init__(self, weight: torch.Tensor, cut: torch.Tensor, tail: float) -> None:
        self.weight, self.tail = weight, tail
        self._cut, self._original = cut, weight.data

    @classmethod
    def of(cls, module: torch.nn.Module, moment: Moment) -> CutSwap | None:
        """The swap of module.weight; None when there is nothing to cut (already of low rank)."""
        weight = module.weight
        transposed = is_conv1d(module)  # stored (in, out)
        cut, tail = half_cut(weight.T if transposed else weight, moment)
        if cut is None or not tail > 0:
            return None
        return cls(weight, cut.T.contiguous() if transposed else cut, tail)

    def cut(self) -> None:
        self.weight.data = self._cut

    def restore(self) -> None:
        self.weight.data = self._original


GRAM_ROWS = 2048  # rows of the whitened weight made (float64) at a time


def half_cut(weight: torch.Tensor, moment: Moment) -> tuple[torch.Tensor | None, float]:
    """W′ at the rank keeping half of W's (m, n) params, and the squared error Σ_{i>r} σ_i² the cut leaves.

    With a moment, W′ is the best rank-r approximation of W·S, unwhitened: U_r·Σ_r·V_rᵀ·S⁻¹ (linalg.whiten),
    as compress makes it; with an embedding's row weights, of D^½·W: D^-½·U_r·Σ_r·V_rᵀ; else of W.

    The whitened matrix T is never made whole, nor its singular vectors: U_r·Σ_r·V_rᵀ = T·V_r·V_rᵀ (or
    U_r·U_rᵀ·T), with V_r the top eigenvectors of the Gram matrix Tᵀ·T (n×n, float64, summed GRAM_ROWS
    rows at a time), or U_r those of T·Tᵀ when T is wide, and σ_i² its eigenvalues. So

        W′ = (W·S·V_r)·(V_rᵀ·S⁻¹)      m ≥ n, a row block at a time (row weights cancel: W·V_r·V_rᵀ)
        W′ = D^-½·U_r·(U_rᵀ·D^½·W)     m < n (S cancels)

    and memory holds W′ (W's dtype), the n×n or m×m Gram in float64 and one row block: not the five
    copies of W an SVD and its factors make (a 50k-row LM head, 400 MB each in float32).
    """
    m, n = weight.shape
    rank = max(1, m * n // (2 * (m + n)))
    if rank >= min(m, n):
        return None, 0.0
    f64 = dict(dtype=torch.float64, device=weight.device)
    root = factor = None  # D^½ (m,), S (n, n) lower triangular
    if isinstance(moment, RowWeights):
        root = moment.weights.sqrt().to(**f64) if moment.weights.shape[0] == m else None
    elif moment is not None and moment.shape[0] == n:
        whitener = make_whitener(moment.to(weight.device))
        factor = whitener.factor.to(**f64) if whitener is not None else None
    w = weight.detach()

    def rows(start: int, end: int, *, weighted: bool = True) -> torch.Tensor:
        """Rows start:end of T = D^½·W·S (weighted=False: of W·S), float64."""
        block = w[start:end].to(torch.float64)
        if weighted and root is not None:
            block = root[start:end, None] * block
        return block @ factor if factor is not None else block

    if m >= n:
        gram = torch.zeros(n, n, **f64)
        for start in range(0, m, GRAM_ROWS):
            block = rows(start, start + GRAM_ROWS)
            gram.addmm_(block.T, block)  # += (n, rows) @ (rows, n)
        values, vectors = torch.linalg.eigh(gram)  # ascending
        del gram
        v = vectors[:, -rank:]  # (n, r): the top right singular vectors of T
        a = v.T if factor is None else torch.linalg.solve_triangular(factor, v.T.contiguous(), upper=False, left=False)
        cut = torch.empty(m, n, dtype=weight.dtype, device=weight.device)
        for start in range(0, m, GRAM_ROWS):  # (rows, n) @ (n, r) @ (r, n)
            cut[start : start + GRAM_ROWS] = (rows(start, start + GRAM_ROWS, weighted=False) @ v) @ a
    else:
        t = rows(0, m)  # (m, n), m < n
        values, vectors = torch.linalg.eigh(t @ t.T)  # (m, m), ascending
        del t
        u = vectors[:, -rank:]  # (m, r): the top left singular vectors of T
        left = w.to(torch.float64) if root is None else root[:, None] * w.to(torch.float64)  # D^½·W
        cut = u @ (u.T @ left)  # (m, r) @ (r, n)
        del left
        cut = (cut if root is None else cut / root[:, None]).to(weight.dtype)
    tail = float(values[: values.shape[0] - rank].clamp(min=0).sum())  # the σ_i² left out
    if not bool(torch.isfinite(cut).all()):
        return None, 0.0
    return cut, tail


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


# --- the estimate in one backward pass, block by block -------------------------------------------------------

HEAD_TOKENS = 256  # tokens whose outputs (an LM's logits) the probe makes at a time
PROJECTIONS = 4  # random directions per probe batch: the estimate's relative spread is about √(2 / (4 · samples))


class ProjectedProbe:
    """Every weight's sensitivity from the block runner, for a few dense forwards in all (not one per weight).

    The definition is the reference's (`sensitivities`): the half-param cut's relative change of the
    model's outputs, per unit of the whitened squared error it leaves. Two things make it cheap:

    - the cut's effect on its block is exact but local: the block in hand is rerun on the probe
      batches' stored inputs with the cut in place, giving the change δh of the block's output;
    - the rest of the model is linearized: δy ≈ J·δh, and ‖J·δh‖² is estimated with random
      projections, E_v[(vᵀJδh)²] = ‖Jδh‖² for v ~ N(0, I) on the outputs. vᵀJ = (Jᵀv)ᵀ is one gradient,
      which a single backward pass carries from the outputs to every block's output (each block is
      loaded again, in reverse, and rerun with its stored input requiring grad). Samples do not
      interact, so each sample's projection is squared separately: PROJECTIONS directions per batch
      and S samples give an estimate of relative spread about √(2 / (PROJECTIONS·S)).

    The outputs are what the model's forward returns (the logits of an LM; an encoder's last hidden
    state and pooler output), each relative to its own norm over the probe's real tokens, averaged
    over them as the reference averages. The stem's and head's weights (embedding tables, an untied
    LM head, a pooler) are cut in place, the stem and head rerun, and their change projected the same way.

    Use: `forward(block, probe)` in the forward pass over the blocks (it keeps each block's probe
    inputs), then `backward(final, moment_of)` once, after the last block.
    """

    def __init__(
        self,
        runner,
        names: dict[str, str],
        *,
        projections: int = PROJECTIONS,
        seed: int = 0,
        spill: str | Path | None = None,
    ) -> None:
        self.runner = runner
        self.names = names  # module name in the model -> the checkpoint's weight name
        self.projections = projections
        self.seed = seed
        self.inputs: list = []  # per block: the probe batches (Hidden) entering it
        # spill: a folder where each block's probe inputs wait on disk (an unnamed file) until backward
        # reads them back, last block first: L·T_p·d numbers (a 7B model's: 1 GB) not held in memory
        self._spill = _StateSpill(spill) if spill is not None else None

    # --- which weights --------------------------------------------------------------------------------------

    def _inside(self, name: str) -> bool:
        stack = self.runner.blocks_name
        return name == stack or name.startswith(stack + ".")

    def outside_weights(self) -> list[tuple[str, torch.nn.Module]]:
        """The stem's and head's 2-D weights, each tensor once, embeddings first (a tied head counts as its table)."""
        modules = [(n, m) for n, m in self.runner.model.named_modules() if not self._inside(n)]
        ordered = [(n, m) for n, m in modules if isinstance(m, torch.nn.Embedding)]
        ordered += [(n, m) for n, m in modules if isinstance(m, torch.nn.Linear) or is_conv1d(m)]
        return _once(ordered)

    @staticmethod
    def block_weights(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        return _once([(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)])

    def count(self) -> int:
        """How many weights backward() probes."""
        stack = self.runner.model.get_submodule(self.runner.blocks_name)
        return sum(len(self.block_weights(block)) for block in stack) + len(self.outside_weights())

    # --- the passes -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, block, probe: list) -> list:
        """Keep the probe batches entering `block` (on disk with a spill) and return them after it."""
        self.inputs.append(self._spill.keep(probe) if self._spill is not None else probe)
        return [self.runner.run_block(block, hidden) for hidden in probe]

    def _inputs(self, index: int) -> list:
        kept = self.inputs[index]
        return self._spill.back(kept) if self._spill is not None else kept

    def backward(
        self, final: list, moment_of: Callable[[str], Moment], *, on_weight: Callable[[str], None] | None = None
    ) -> dict[str, float]:
        """name -> s for every weight (None-cut weights, already of low rank, left out).

        final: the probe batches after the last block; moment_of(name): the weight's input moment
        (a Linear's) or row weights (an embedding's), or None.
        """
        runner = self.runner
        norms = self._norms(final)
        grads = [self._output_gradients(b, hidden, norms) for b, hidden in enumerate(final)]
        result: dict[str, float] = {}
        scale = self.projections * len(norms)
        outputs = final
        for index in reversed(range(len(runner))):
            inputs = self._inputs(index)
            with runner.load_block(index) as block:
                for module_name, module in self.block_weights(block.module):
                    name = self.names.get(f"{block.name}.{module_name}", f"{block.name}.{module_name}.weight")
                    value = self._local(block, module, moment_of(name), inputs, outputs, grads)
                    if value is not None:
                        result[name] = value / scale
                    if on_weight:
                        on_weight(name)
                grads = [self._through(block, hidden, g) for hidden, g in zip(inputs, grads, strict=True)]
            outputs, self.inputs[index] = inputs, None  # block index's inputs: the next one's outputs
        if self._spill is not None:
            self._spill.close()
        for module_name, module in self.outside_weights():
            name = self.names.get(module_name, f"{module_name}.weight")
            value = self._outside(module, moment_of(name), outputs, final, grads, norms)
            if value is not None:
                result[name] = value / scale
            if on_weight:
                on_weight(name)
        return result

    # --- pieces ---------------------------------------------------------------------------------------------

    def _outputs(self, hidden) -> list[torch.Tensor]:
        """The floating-point tensors the model's forward returns for these final states (grad kept)."""
        captured = []
        handle = self.runner.model.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            self.runner.head(hidden)
        finally:
            handle.remove()
        return _floats(captured[-1])

    @staticmethod
    def _pieces(hidden) -> list[tuple[int, int, object]]:
        """The batch's samples in groups of about HEAD_TOKENS tokens (at least one sample): the head's outputs
        (an LM's logits over the vocabulary) are made for one group at a time, to bound their memory."""
        size, length = hidden.states.shape[:2]
        step = max(1, HEAD_TOKENS // max(1, length))
        pieces = []
        for start in range(0, size, step):
            end = min(size, start + step)
            part = replace(
                hidden,
                states=hidden.states[start:end],
                input_ids=hidden.input_ids[start:end],
                attention_mask=hidden.attention_mask[start:end],
            )
            pieces.append((start, end, part))
        return pieces

    @torch.no_grad()
    def _norms(self, final: list) -> list[float]:
        totals: list[float] = []
        for hidden in final:
            for _, _, piece in self._pieces(hidden):
                outputs = self._outputs(piece)
                totals = totals or [0.0] * len(outputs)
                for j, y in enumerate(outputs):
                    totals[j] += _square_sum(_real(y, piece.attention_mask))
        return [max(total, 1e-300) ** 0.5 for total in totals]

    def _directions(self, b: int, start: int, k: int, outputs: list[torch.Tensor], mask: torch.Tensor, norms):
        """v of batch b's samples from `start`, projection k: Gaussian on each output's real tokens, over its norm."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (b * 4099 + start) * 131 + k)
        directions = []
        for y, norm in zip(outputs, norms, strict=True):
            v = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device, y.dtype)
            directions.append(_real(v, mask).div_(norm))
        return directions

    def _output_gradients(self, b: int, hidden, norms: list[float]) -> list[torch.Tensor]:
        """Jᵀv at the final states for each projection of batch b."""
        grads = [torch.zeros_like(hidden.states) for _ in range(self.projections)]
        for start, end, piece in self._pieces(hidden):
            states = piece.states.detach().requires_grad_(True)
            with torch.enable_grad():
                outputs = self._outputs(replace(piece, states=states))
                for k in range(self.projections):
                    directions = self._directions(b, start, k, outputs, piece.attention_mask, norms)
                    scalar = sum(
                        torch.dot(v.reshape(-1), y.reshape(-1)) for v, y in zip(directions, outputs, strict=True)
                    )
                    (grad,) = torch.autograd.grad(scalar, states, retain_graph=k < self.projections - 1)
                    grads[k][start:end] = grad.detach()
                    del directions, scalar
            del outputs
        return grads

    def _through(self, block, hidden, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients at the block's output carried to its input (the block rerun with grad)."""
        states = hidden.states.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.runner.run_block(block, replace(hidden, states=states)).states
            result = []
            for k, grad in enumerate(grads):
                (back,) = torch.autograd.grad(out, states, grad.to(out.dtype), retain_graph=k < len(grads) - 1)
                result.append(back.detach())
        return result

    @staticmethod
    def _projected(delta: torch.Tensor, grads: list[torch.Tensor]) -> float:
        """Σ_k Σ_samples ⟨Jᵀv_k, δ⟩², each sample's projection squared on its own."""
        total = 0.0
        for grad in grads:
            per_sample = (grad.to(torch.float64) * delta.to(torch.float64)).reshape(delta.shape[0], -1).sum(1)
            total += float(per_sample.square().sum())
        return total

    @torch.no_grad()
    def _local(self, block, module, moment: Moment, inputs: list, outputs: list, grads: list) -> float | None:
        """Σ over batches and projections of the block's cut output change, projected; divided by the cut's tail."""
        swap = CutSwap.of(module, moment)
        if swap is None:
            return None
        total = 0.0
        try:
            swap.cut()
            for hidden, after, g in zip(inputs, outputs, grads, strict=True):
                delta = self.runner.run_block(block, hidden).states - after.states
                total += self._projected(delta, g)
        finally:
            swap.restore()
        return total / swap.tail

    @torch.no_grad()
    def _outside(self, module, moment: Moment, first: list, final: list, grads: list, norms: list) -> float | None:
        """A stem or head weight: the stem's change projected through the blocks, the head's projected directly."""
        if module.weight.is_meta:  # never called by the forward: nothing to measure
            return None
        swap = CutSwap.of(module, moment)
        if swap is None:
            return None
        total = 0.0
        try:
            for b, (entering, hidden, g) in enumerate(zip(first, final, grads, strict=True)):
                swap.cut()
                delta = self.runner.embed(hidden.input_ids, hidden.attention_mask).states - entering.states
                per_sample = [(grad * delta).reshape(delta.shape[0], -1).sum(1, dtype=torch.float64) for grad in g]
                del delta
                for start, end, piece in self._pieces(hidden):
                    swap.restore()
                    references = self._outputs(piece)
                    swap.cut()
                    changed = [
                        y2 - y for y2, y in zip(self._outputs(piece), references, strict=True)
                    ]  # not in place: an output may be the states themselves
                    del references
                    for k in range(len(g)):
                        directions = self._directions(b, start, k, changed, piece.attention_mask, norms)
                        for v, dy in zip(directions, changed, strict=True):
                            per_sample[k][start:end] += (v * dy).reshape(dy.shape[0], -1).sum(1, dtype=torch.float64)
                total += sum(float(value.square().sum()) for value in per_sample)
        finally:
            swap.restore()
        return total / swap.tail


class _StateSpill:
    """Hidden states kept in an unnamed temporary file (gone when closed, or when the process ends)."""

    def __init__(self, folder: str | Path) -> None:
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".lowrank-probe-")  # noqa: SIM115 - closed by close()
        self._end = 0

    def keep(self, batches: list) -> list:
        """Write each batch's states to the file; what is returned holds (dtype, shape, start) in their place."""
        stripped, where = [], []
        for hidden in batches:
            data = hidden.states.detach().to("cpu").contiguous()
            self._file.seek(self._end)
            self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
            where.append((data.dtype, tuple(data.shape), self._end, hidden.states.device))
            self._end += data.numel() * data.element_size()
            stripped.append(replace(hidden, states=torch.empty(0)))  # ids, mask and calls stay in memory
        return [stripped, where]

    def back(self, kept: list) -> list:
        """The batches with their states read back."""
        batches, where = kept
        out = []
        for hidden, (dtype, shape, start, device) in zip(batches, where, strict=True):
            data = torch.empty(shape, dtype=dtype)
            self._file.seek(start)
            self._file.readinto(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
            out.append(replace(hidden, states=data.to(device)))
        return out

    def close(self) -> None:
        self._file.close()


def _once(modules: list[tuple[str, torch.nn.Module]]) -> list[tuple[str, torch.nn.Module]]:
    """Each 2-D floating-point weight once, in order."""
    seen, kept = set(), []
    for name, module in modules:
        weight = getattr(module, "weight", None)
        if (
            isinstance(weight, torch.Tensor)
            and weight.ndim == 2
            and weight.is_floating_point()
            and id(weight) not in seen
        ):
            seen.add(id(weight))
            kept.append((name, module))
    return kept


def _square_sum(y: torch.Tensor, rows: int = 64) -> float:
    """Σ y² in float64, a few rows at a time (no float64 copy of a whole vocabulary's logits)."""
    flat = y.detach().reshape(-1, y.shape[-1]) if y.ndim else y.detach().reshape(1, 1)
    return sum(float(flat[i : i + rows].to(torch.float64).square().sum()) for i in range(0, flat.shape[0], rows))


def _floats(output: object) -> list[torch.Tensor]:
    """output_floats, keeping the autograd graph."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return [tensor for item in output for tensor in _floats(item)]
    return []


def _real(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """y with its padded positions zeroed, when its first two dims are the batch's (batch, seq)."""
    if y.ndim >= 2 and tuple(y.shape[:2]) == tuple(mask.shape):
        return y * mask.to(y.device, y.dtype).reshape(*mask.shape, *([1] * (y.ndim - 2)))
    return y
