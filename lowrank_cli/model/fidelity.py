"""compress --fidelity F: the smallest model whose fidelity on an evaluation text is at least F.

The search is over the budget of `--budget`: each trial allocates ranks as compress --budget
does (ops.budget.budget_ranks: by the measured sensitivities with calibration), puts W′ = B·A into
the reference model in memory, and measures it as `evaluate` does (Evaluator: the reference's
outputs are computed once).
Each selected matrix has one SVD, of the view the budget reads (W·S, D^½·W or W), computed once
and cut at every trial's rank; nothing is written until the search is over. Then the model is
written by compress at the budget found, under a temporary name beside OUT, loaded back as factors
and measured again: the fidelity reported is that of the file written (if rounding put it below F, a
milder budget is written instead). Only a model that reaches F is renamed to OUT; a run that fails
leaves what was at OUT as it was.

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
from lowrank_cli.io.hfconfig import base_prefix, prefix_variants
from lowrank_cli.io.outputs import prepare_output, require_kind
from lowrank_cli.io.publish import make_temp, publish, remove_temp, sweep_stale_temps
from lowrank_cli.linalg.policy import RankPolicy
from lowrank_cli.linalg.spectrum import Spectrum
from lowrank_cli.linalg.whiten import RowWeights
from lowrank_cli.model.evaluate import Evaluator, load_candidate, metric
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
    """One matrix's SVD of the view the budget reads, and how to turn its rank-r part back into W′."""

    name: str  # in the checkpoint
    parameter: torch.nn.Parameter  # the model's
    original: torch.Tensor
    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, n)
    whitener: object | None  # linalg.whiten.Whitener or RowWeights, or None (plain)
    transposed: bool  # the view is of Wᵀ (GPT-2's Conv1D under calibration)

    def product(self, rank: int | None) -> torch.Tensor:
        """W′ at `rank` (the original for None: the budget keeps it whole), in the parameter's dtype."""
        if rank is None:
            return self.original
        b, a = self.u[:, :rank] * self.s[:rank], self.vh[:rank]  # (m, r), (r, n)
        if self.whitener is not None:
            b, a = self.whitener.unwhiten_factors(b, a)
        product = b @ a
        product = product.T if self.transposed else product
        return product.reshape(self.original.shape).to(self.original.dtype)


def search(
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    evaluator: Evaluator,
    target: float,
    *,
    names: list[str],
    calibration: Calibration | None,
    device: str,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, float, list[tuple[float, float]]]:
    """The smallest budget (to STEP) whose model measures ≥ target: (budget, its fidelity, every trial)."""
    cuts, spectra = {}, {}
    for name in names:
        cuts[name], spectra[name] = _cut(checkpoint, model, name, calibration, device)
    trials: list[tuple[float, float]] = []
    steps = 1 + math.ceil(math.log2((MILDEST - LOWEST) / STEP))

    def measure(budget: float) -> float | None:
        try:
            ranks = budget_ranks(spectra, budget, calibration=calibration)
        except UsageError:  # below rank 1 for every matrix
            return None
        with torch.no_grad():
            for name, cut in cuts.items():
                cut.parameter.data = cut.product(ranks[name])
            value = evaluator.measure(model)["fidelity"]
            for cut in cuts.values():
                cut.parameter.data = cut.original
        trials.append((budget, value))
        if progress:  # (evaluations done, planned): the search's, then the model written (compress_to_fidelity)
            progress(len(trials), steps + 1)
        return value

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
    return high, best, trials


def _cut(
    checkpoint: Checkpoint, model: torch.nn.Module, name: str, calibration: Calibration | None, device: str
) -> tuple[_Cut, Spectrum]:
    """The matrix's SVD of the view the budget reads, and that view's spectrum (what compress allocates by)."""
    matrix = load_matrix(checkpoint, checkpoint.entries[name], device)
    view = whitened_view(matrix, calibration, name)
    transposed = calibration is not None and name in calibration.transposed and calibration.moment_for(name) is not None
    whitener = _whitener_of(calibration, name, device) if view is not matrix else None
    u, s, vh = torch.linalg.svd(view.to(torch.float64 if device == "cpu" else torch.float32), full_matrices=False)
    parameter = _parameter(model, name)
    spectrum = Spectrum.of(s, tuple(view.shape), view.dtype)  # the σ just computed: no second SVD for allocate
    return _Cut(name, parameter, parameter.data.clone(), u, s, vh, whitener, transposed), spectrum


def _whitener_of(calibration: Calibration, name: str, device: str):
    from lowrank_cli.linalg.whiten import whitener

    moment = calibration.moment_for(name)
    if moment is not None:
        return whitener(moment.to(device))
    return RowWeights.of_counts(calibration.token_counts[name])


def _parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """The model's parameter of a checkpoint name, allowing the base model prefix (bert.…) either way."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for candidate in prefix_variants(name, base_prefix(model)):
        if candidate in parameters:
            return parameters[candidate]
    raise UsageError(f"tensor '{name}' is not a parameter of {type(model).__name__}; give the model's own folder")


def compress_to_fidelity(
    folder: Path,
    checkpoint: Checkpoint,
    out: str | Path | None,
    target: float,
    *,
    reference: torch.nn.Module,
    evaluator: Evaluator,
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
        checkpoint, reference, evaluator, target, names=names, calibration=calibration, device=settings.device,
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
            model = load_candidate(folder, staging.path, type(reference), settings.device)
            written.append((budget, evaluator.measure(model)["fidelity"]))
            del model
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
        "trials": [{"budget": b, "fidelity": f if math.isfinite(f) else None} for b, f in trials],  # NaN: null
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
