"""compress --fidelity F: the smallest model whose fidelity on an evaluation text is at least F.

The search is over the budget of `--budget`: each trial allocates ranks as compress --budget
does (ops.budget.budget_ranks: by the measured sensitivities with calibration) and measures the
model with W′ = B·A in place of each selected W as `evaluate` does. A causal or masked LM or an
encoder runs block by block (model.blockwise): the reference's final hidden states are computed
once, and each trial loads the reference's blocks one at a time on a runner of its own, puts its
W′ into the block in hand and frees it, so no trial changes the reference or what was kept of it.
Other models run whole, the reference's outputs kept before any trial changes its weights.
Each selected matrix has one SVD, of the view the budget reads (W·S, D^½·W or W), computed once,
one matrix at a time; what is kept is its factors up to the largest rank a budget can give it (no
more numbers than W) in W's stored dtype, cut at every trial's rank. Nothing is written until the
search is over. Then the model is written by compress at the budget found, under a temporary name
beside OUT, loaded back as factors and measured again: the fidelity reported is that of the file
written (if rounding put it below F, a milder budget is written instead). Only a model that
reaches F is renamed to OUT; a run that fails leaves what was at OUT as it was.

fidelity(budget) is close to monotone, so the search is a bisection: the mildest budget first
(MILDEST; below F there, nothing is written and the error says what it reached), then halving the
interval [lowest, mildest] until it is narrower than STEP.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_cli.errors import EXIT_QUALITY_GATE, LowrankError, OutputError, UsageError, arg
from lowrank_cli.io.calibration import Calibration
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.dtypes import torch_dtype
from lowrank_cli.io.hfconfig import base_prefix, prefix_variants
from lowrank_cli.io.outputs import prepare_output, require_kind
from lowrank_cli.io.publish import make_temp, publish, remove_temp, sweep_stale_temps
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.spectrum import Spectrum
from lowrank_cli.linalg.whiten import RowWeights
from lowrank_cli.model.blocks import BlockRunner
from lowrank_cli.model.blockwise import BlockwiseEvaluator, measure_candidate
from lowrank_cli.model.evaluate import Evaluator, metric
from lowrank_cli.ops import compress as _compress
from lowrank_cli.ops.budget import budget_ranks
from lowrank_cli.ops.factoring import load_matrix, skip_reason, whitened_view
from lowrank_cli.ops.report import Report
from lowrank_cli.ops.settings import Method, Settings

MILDEST = 0.98  # the mildest budget tried: 2 % of the selected params saved
LOWEST = 0.02
STEP = 0.01  # the search stops when the budget is known to this width
RETRIES = 3  # milder budgets written when the file measures below F (rounding in the stored dtype)


class FidelityNotReached(LowrankError):
    """No budget keeps the fidelity asked for; nothing is written."""

    exit_code = EXIT_QUALITY_GATE


@dataclass
class _Cut:
    """One matrix's truncated SVD of the view the budget reads, as factors of W itself (unwhitened) in the
    stored dtype, up to the largest rank a budget gives it: W′ at rank r is B[:, :r]·A[:r]."""

    name: str  # in the checkpoint
    shape: tuple[int, ...]  # the stored tensor's
    b: torch.Tensor  # (m, k), k ≤ the break-even rank min(m, n, (m·n − 1) // (m + n))
    a: torch.Tensor  # (k, n)
    transposed: bool  # the view is of Wᵀ (GPT-2's Conv1D under calibration)

    def product(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """W′ at `rank`, in the stored tensor's shape and in `dtype`."""
        compute = torch.float64 if self.b.dtype == torch.float64 else torch.float32
        product = self.b[:, :rank].to(compute) @ self.a[:rank].to(compute)  # (m, r) @ (r, n) -> (m, n)
        product = product.T if self.transposed else product
        return product.reshape(self.shape).to(dtype)


@dataclass(frozen=True)
class Trial:
    """One model the search measured: its budget, the ranks the budget gave (None: kept whole) and its fidelity."""

    budget: float
    fidelity: float
    ranks: dict[str, int | None]


def search(
    checkpoint: Checkpoint,
    evaluator: BlockwiseEvaluator | Evaluator,
    target: float,
    *,
    names: list[str],
    calibration: Calibration | None,
    device: str,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, float, list[Trial]]:
    """The smallest budget (to STEP) whose model measures ≥ target: (budget, its fidelity, every trial)."""
    cuts, spectra = {}, {}
    for name in names:
        cuts[name], spectra[name] = _cut(checkpoint, name, calibration, device)
    trials: list[Trial] = []
    steps = 1 + math.ceil(math.log2((MILDEST - LOWEST) / STEP))
    model = _BlockTrials(evaluator, checkpoint, cuts) if isinstance(evaluator, BlockwiseEvaluator) else None
    model = model or _WholeTrials(evaluator, checkpoint, cuts)

    def measure(budget: float) -> float | None:
        try:
            ranks = budget_ranks(spectra, budget, calibration=calibration)
        except UsageError:  # below rank 1 for every matrix
            return None
        value = model.measure(ranks)
        trials.append(Trial(budget, value, ranks))
        if progress:  # (evaluations done, planned): the search's, then the model written (compress_to_fidelity)
            progress(len(trials), steps + 1)
        return value

    try:
        mildest = measure(MILDEST)
        if mildest is None or not mildest >= target:  # a NaN fidelity (NaN outputs) reaches nothing
            raise FidelityNotReached(
                f"no saving reaches fidelity {target:g}: at the mildest budget tried, {MILDEST:g} of the selected"
                f" params, the model measures {mildest if mildest is not None else float('nan'):.4f};"
                f" lower {arg('fidelity')},"
                " calibrate on text like the model's inputs, or select fewer tensors; nothing was written"
            )
        low, high, best = LOWEST, MILDEST, mildest
        while high - low > STEP:
            middle = round((low + high) / 2, 4)
            value = measure(middle)
            if value is not None and value >= target:
                high, best = middle, value
            else:
                low = middle
    finally:
        model.close()
    return high, best, trials


class _BlockTrials:
    """A trial's model run block by block: the reference's weights on a runner of its own, each block given
    the trial's W′ as it loads (and freed after); the reference's runner and its kept outputs are never touched."""

    def __init__(self, evaluator: BlockwiseEvaluator, checkpoint: Checkpoint, cuts: dict[str, _Cut]) -> None:
        reference = evaluator.runner
        self.evaluator, self.checkpoint, self.cuts = evaluator, checkpoint, cuts
        self.runner = BlockRunner(reference.folder, device=reference.device, dtype=reference.dtype)
        prefix = f"{self.runner.blocks_name}."
        self.inside: dict[int, list[tuple[str, _Cut]]] = {}  # block index -> (name in the block, cut)
        self.outside: list[tuple[str, _Cut]] = []  # (name in the model, cut): the stem's and head's
        for name, cut in cuts.items():
            model_name = _model_name(self.runner.model, name)
            if model_name.startswith(prefix):
                index, within = model_name.removeprefix(prefix).split(".", 1)
                self.inside.setdefault(int(index), []).append((within, cut))
            else:
                self.outside.append((model_name, cut))
        if self.outside:  # the stem and head load on their first call: call them once, on one token
            ids, mask = evaluator.batches[0][0][:1, :1], evaluator.batches[0][1][:1, :1]
            with torch.no_grad():
                self.runner.head(self.runner.embed(ids, mask))

    def measure(self, ranks: dict[str, int | None]) -> float:
        with torch.no_grad():
            for model_name, cut in self.outside:
                parameter = self.runner.model.get_parameter(model_name)
                if parameter.is_meta:  # a module no forward calls: it changes no output
                    continue
                rank = ranks[cut.name]
                value = _original(self.checkpoint, cut) if rank is None else cut.product(rank, parameter.dtype)
                parameter.copy_(value.to(parameter.device, parameter.dtype))

        def edit(block) -> None:
            for within, cut in self.inside.get(block.index, []):
                rank = ranks[cut.name]
                if rank is not None:  # else the block holds the original, as loaded
                    parameter = block.module.get_parameter(within)
                    parameter.data = cut.product(rank, parameter.dtype).to(parameter.device)

        return self.evaluator.measure(self.runner, edit)["fidelity"]

    def close(self) -> None:
        self.runner.close()


class _WholeTrials:
    """A trial's model as the reference model itself with W′ put in (models the block runner does not run):
    the reference's outputs are computed before any trial changes it, and every W is put back after each."""

    def __init__(self, evaluator: Evaluator, checkpoint: Checkpoint, cuts: dict[str, _Cut]) -> None:
        self.evaluator, self.checkpoint, self.cuts = evaluator, checkpoint, cuts
        if evaluator._cache is None:  # a trial changes the reference model: its outputs must be kept first
            evaluator._cache = [evaluator._reference_output(i) for i in range(len(evaluator.batches))]
        self.parameters = {name: _parameter(evaluator.reference, name) for name in cuts}

    def measure(self, ranks: dict[str, int | None]) -> float:
        changed = [name for name in self.cuts if ranks[name] is not None]
        try:
            with torch.no_grad():
                for name in changed:
                    parameter = self.parameters[name]
                    parameter.data = self.cuts[name].product(ranks[name], parameter.dtype).to(parameter.device)
            return self.evaluator.measure(self.evaluator.reference)["fidelity"]
        finally:
            for name in changed:
                parameter = self.parameters[name]
                parameter.data = _original(self.checkpoint, self.cuts[name]).to(parameter.device, parameter.dtype)

    def close(self) -> None:
        pass


def _original(checkpoint: Checkpoint, cut: _Cut) -> torch.Tensor:
    """The stored tensor, read again from the (memory-mapped) file: no copy of it is kept."""
    return checkpoint.read(cut.name).reshape(cut.shape)


def _cut(checkpoint: Checkpoint, name: str, calibration: Calibration | None, device: str) -> tuple[_Cut, Spectrum]:
    """The matrix's truncated SVD of the view the budget reads, and that view's spectrum (what compress allocates by).

    One matrix at a time in the computation dtype; what is kept is the factors up to the break-even rank (no more
    numbers than W) in W's stored dtype.
    """
    entry = checkpoint.entries[name]
    matrix = load_matrix(checkpoint, entry, device)
    view = whitened_view(matrix, calibration, name)
    transposed = calibration is not None and name in calibration.transposed and calibration.moment_for(name) is not None
    whitener = _whitener_of(calibration, name, device) if view is not matrix else None
    u, s, vh = torch.linalg.svd(view, full_matrices=False)  # (m, k), (k,), (k, n)
    spectrum = Spectrum.of(s, tuple(view.shape), view.dtype)  # the σ just computed: no second SVD for allocate
    m, n = view.shape
    keep = min(len(s), max(1, (m * n - 1) // (m + n)))  # linalg.budget.options_of's cap: no rank above it is given
    b, a = u[:, :keep] * s[:keep], vh[:keep]  # (m, r), (r, n)
    if whitener is not None:
        b, a = whitener.unwhiten_factors(b, a)
    stored = torch_dtype(entry.dtype)
    return _Cut(name, tuple(entry.shape), b.to(stored), a.to(stored), transposed), spectrum


def _whitener_of(calibration: Calibration, name: str, device: str):
    from lowrank_cli.linalg.whiten import whitener

    moment = calibration.moment_for(name)
    if moment is not None:
        return whitener(moment.to(device))
    return RowWeights.of_counts(calibration.token_counts[name])


def _model_name(model: torch.nn.Module, name: str) -> str:
    """The model's parameter name of a checkpoint name, allowing the base model prefix (bert.…) either way."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for candidate in prefix_variants(name, base_prefix(model)):
        if candidate in parameters:
            return candidate
    raise UsageError(f"tensor '{name}' is not a parameter of {type(model).__name__}; give the model's own folder")


def _parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """The model's parameter of a checkpoint name (_model_name)."""
    return model.get_parameter(_model_name(model, name))


def compress_to_fidelity(
    folder: Path,
    checkpoint: Checkpoint,
    out: str | Path | None,
    target: float,
    *,
    evaluator: BlockwiseEvaluator | Evaluator,
    settings: Settings,
    include: list[str] | None,
    exclude: list[str] | None,
    force: bool,
    calibration: Calibration | None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Search the budget, write OUT at the one found, measure the file written (module docstring).

    Each model written is built beside OUT under a temporary name and measured there; only one that
    reaches the target is published as OUT. A run that fails leaves what was at OUT as it was.
    """
    source = calibration.source if calibration is not None else None
    out, as_folder = prepare_output(checkpoint, out, _compress.SUFFIX, force=force, inputs=[source])
    require_kind(out, folder=as_folder)
    selected = set(checkpoint.select(include, exclude))
    names = [e.name for e in checkpoint.entries.values() if skip_reason(e, e.name in selected) is None]
    if not names:
        raise UsageError(f"no weight matrix is selected; check {arg('include')} and {arg('exclude')}")
    budget, _, trials = search(
        checkpoint, evaluator, target, names=names, calibration=calibration, device=settings.device,
        progress=progress,
    )  # fmt: skip
    exact = Settings(dtype=settings.dtype, method=Method.exact, seed=settings.seed, device=settings.device)
    notes = sweep_stale_temps(out.parent)
    with _Staging(out) as staging:
        written: list[tuple[float, float]] = []  # (budget, fidelity) of each model written
        for _ in range(RETRIES + 1):
            staging.clear()
            report = _compress.compress(
                checkpoint, RankPolicy(budget=budget), staging.path, settings=exact, include=include,
                exclude=exclude, calibration=calibration,
                fidelity={"target": target, "text_sha256": evaluator.samples.text_sha256},
            )  # fmt: skip
            written.append((budget, measure_candidate(evaluator, folder, staging.path)["fidelity"]))
            if progress:  # the model written is measured too: one evaluation more than the search's
                progress(len(trials) + len(written), len(trials) + len(written))
            if written[-1][1] >= target or budget >= MILDEST:  # a NaN fidelity is below every target
                break
            budget = min(round(budget + STEP, 4), MILDEST)
        measured = written[-1][1]
        if not measured >= target:  # NaN too
            raise FidelityNotReached(
                f"{_written_below(written)}, below {target:g}; lower {arg('fidelity')}; nothing was written"
            )
        staging.publish(force=force)
    report.output = str(out)
    report.options["notes"] = [*notes, *report.options.get("notes", [])]
    report.options["fidelity"] = {
        "target": target,
        "measured": measured,
        "metric": metric(evaluator.kind, evaluator.pooling),
        "budget": budget,
        "evaluations": len(trials) + len(written),
        "trials": [  # NaN: null
            {"budget": trial.budget, "fidelity": trial.fidelity if math.isfinite(trial.fidelity) else None}
            for trial in trials
        ],
        "eval_text_sha256": evaluator.samples.text_sha256,
        "eval_samples": len(evaluator.samples.ids),
        "held_out": False,
    }
    return report


def _written_below(written: list[tuple[float, float]]) -> str:
    """What the models written measured, each at its budget: the message says only what was tried."""
    if len(written) == 1:
        budget, fidelity = written[0]
        return f"the model written at budget {budget:g} measures fidelity {fidelity:.4f}"
    each = [f"{fidelity:.4f} at budget {budget:g}" for budget, fidelity in written]
    return f"the models written measure fidelity {', '.join(each[:-1])} and {each[-1]}"


class _Staging:
    """A temporary folder beside OUT that holds the model being written, under OUT's own name (so that its
    README names it right); publish() renames that model to OUT, and leaving removes whatever is left."""

    def __init__(self, out: Path) -> None:
        self.out = out
        try:
            self.folder = make_temp(out, folder=True, kind="trial")
        except OSError as exc:
            raise OutputError(f"{out}: cannot write there ({exc.strerror or exc}); check the folder") from None
        self.path = self.folder / out.name

    def clear(self) -> None:
        """Remove the model an earlier attempt wrote here."""
        if self.path.is_dir():
            shutil.rmtree(self.path)
        else:
            self.path.unlink(missing_ok=True)

    def publish(self, *, force: bool) -> None:
        try:
            publish(self.path, self.out, force=force)
        except OSError as exc:
            raise OutputError(
                f"{self.out}: cannot write ({exc.strerror or exc}); check free space and permissions"
            ) from None

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        remove_temp(self.folder)
