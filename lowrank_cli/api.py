"""The public functions: one tensor (`factorize`) or whole checkpoints (`analyze`, `compress`, `expand`,
`extract`, `resize`). Each checkpoint function returns the `Report` the CLI renders and writes exactly what
the CLI writes; the CLI is a thin layer over these.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from lowrank_cli.errors import CheckpointError, UsageError, arg
from lowrank_cli.io.calibration import Calibration, fingerprint_differs, fingerprint_values, read_calibration
from lowrank_cli.io.checkpoint import (
    Checkpoint,
    TensorEntry,
    check_patterns,
    is_pipeline,
    open_checkpoint,
    open_pipeline,
)
from lowrank_cli.io.kohya import PIPELINE_MODELS
from lowrank_cli.io.writer import remove_leftover_temps
from lowrank_cli.linalg.policy import RankPolicy, require_policy
from lowrank_cli.model.calibrate import CalibrationReport
from lowrank_cli.model.evaluate import Evaluation
from lowrank_cli.ops import analyze as _analyze
from lowrank_cli.ops import compress as _compress
from lowrank_cli.ops import expand as _expand
from lowrank_cli.ops import extract as _extract
from lowrank_cli.ops import plot as _plot
from lowrank_cli.ops.devices import resolve_device
from lowrank_cli.ops.factoring import factor_weight
from lowrank_cli.ops.report import Report
from lowrank_cli.ops.settings import (
    CALIBRATE_BATCH_SIZE,
    CALIBRATE_TOKENS,
    EVALUATE_BATCH_SIZE,
    EVALUATE_TOKENS,
    HEAL_BATCH_SIZE,
    HEAL_EPOCHS,
    HEAL_LR,
    HEAL_TOKENS,
    PROBE_TOKENS,
    SEQ_LEN,
    AdapterFormat,
    Device,
    DType,
    Method,
    Objective,
    Settings,
    Split,
    choice,
)

PathLike = str | Path
Globs = str | Sequence[str] | None  # one glob, or several
Progress = Callable[[int, int], None]  # (bytes done, bytes in all), after each tensor


def _globs(patterns: Globs, name: str) -> list[str] | None:
    """One glob or several, as a list: a lone string is one glob, never its characters."""
    if patterns is None or isinstance(patterns, str):
        return None if patterns is None else [patterns]
    found = list(patterns) if isinstance(patterns, (list, tuple, set, frozenset)) else None
    if found is None or not all(isinstance(pattern, str) for pattern in found):
        raise UsageError(f"{arg(name)} must be a glob or a list of globs (str), got {patterns!r}")
    return found


def _cleans_up(function):
    """On Ctrl-C (or SIGTERM raised as KeyboardInterrupt), also remove a temporary file the interrupt
    caught between its creation and its owner's cleanup; the outputs' own cleanup handles the rest."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            remove_leftover_temps()
            raise

    return wrapper


def factorize(
    W: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    method: Method | str = Method.auto,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated-SVD factors of one matrix: W ≈ B·A with B = U_r·diag(S_r) and A = V_rᵀ.

    Args:
        W: an (m, n) floating-point tensor, on any device. The maths runs in float32 (float64
            for float64 input); B and A come back in W's dtype and on its device.
        rank: keep r singular values (clamped to min(m, n)). Exactly one of rank, energy and
            max_error is required.
        energy: the smallest rank keeping this fraction of Σσ², 0 < energy ≤ 1.
        max_error: the smallest rank with ‖W − BA‖_F / ‖W‖_F ≤ max_error, 0 ≤ max_error < 1;
            the bound is checked on the returned factors.
        method: "auto", "exact" or "randomized".
        seed: the randomized method's seed: same seed, same factors.

    Returns:
        (B, A) of shapes (m, r) and (r, n); r = 0 for a zero matrix.

    Example:
        >>> B, A = lowrank_cli.factorize(torch.randn(512, 64) @ torch.randn(64, 256), max_error=1e-3)
        >>> B.shape, A.shape
        (torch.Size([512, 64]), torch.Size([64, 256]))
    """
    policy = require_policy(RankPolicy.from_options(rank, energy, max_error))
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or not W.is_floating_point():
        got = f"shape {tuple(W.shape)}, {W.dtype}" if isinstance(W, torch.Tensor) else type(W).__name__
        raise UsageError(f"W must be a 2-D floating-point tensor, got {got}")
    outcome = factor_weight(W, policy, Settings(method=method, seed=seed), where="W")
    if outcome.b is None:  # a zero matrix keeps nothing
        return W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1])
    return outcome.b, outcome.a


def analyze(
    paths: PathLike | Sequence[PathLike],
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    budget: float | None = None,
    include: Globs = None,
    exclude: Globs = None,
    rtol: float | None = None,
    device: Device | str = Device.auto,
    top: int | None = None,
    progress: Progress | None = None,
    calibration: PathLike | None = None,
    other_model: bool = False,
    plot: PathLike | None = None,
    diff: bool = False,
) -> Report:
    """The spectrum of every weight matrix in one or more checkpoints; with a policy, what it would keep.

    Args:
        paths: safetensors files, shard folders or index files.
        rank, energy, max_error, budget: an optional rank policy (at most one); each factorized
            row then carries the rank, the optimal error and the params it would give.
        include, exclude: globs on tensor names: one ("*.weight") or a list (["*attn*", "*mlp*"]).
        rtol: numerical rank counts σ > σ_max·rtol (default max(m, n)·ε).
        device: where the SVDs run: "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N".
        top: each row's singular_values lists the `top` largest σ of W (default: all).
        progress: called as progress(bytes done, bytes in all) after each tensor.
        calibration: a statistics file from `calibrate`; spectra are then of W·S and a policy's
            error is the output error ‖(W − W′)X‖_F / ‖WX‖_F (docs/calibration.md).
        other_model: use statistics made on another model of the same shapes (refused by default).
        plot: also draw the spectra into this .png, .svg or .pdf (plot_spectra; needs the `plot` extra),
            checked before any tensor is read.
        diff: paths are two checkpoints, BASE then TUNED, and each row describes the change
            ΔW = W_tuned − W_base of a tensor both hold with the same shape (a shape that differs is
            an error; tensors in one only are named in `options["notes"]`). With a policy, the rank
            `extract` would give each changed matrix, its optimal error of ΔW and the adapter's params
            r·(m + n); totals are over those matrices. calibration is then BASE's statistics.

    Example:
        >>> report = lowrank_cli.analyze("model.safetensors", energy=0.99)
        >>> {t.name: t.rank_99 for t in report.tensors if t.rank_99 is not None}
        >>> change = lowrank_cli.analyze(["base/", "tuned/"], diff=True, energy=0.9)
        >>> change.totals.params_after  # the adapter extract --energy 0.9 would write, in params
    """
    include, exclude = _globs(include, "include"), _globs(exclude, "exclude")
    policy = RankPolicy.from_options(rank, energy, max_error, budget)
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise UsageError(f"{arg('top')} must be a whole number ≥ 1, got {top!r}")
    device = resolve_device(device)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise UsageError("paths is empty; give at least one checkpoint")
    if diff and len(paths) != 2:
        raise UsageError(f"{arg('diff')} compares two checkpoints, BASE then TUNED; got {len(paths)}")
    if plot is not None:
        _plot.check_plot_path(plot)
    with ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(path)) for path in paths]
        check_patterns(checkpoints, include, exclude)
        stats = _calibration(calibration, checkpoints[:1] if diff else checkpoints, other_model)
        tick = stack.enter_context(_progress(progress, _data_bytes(*checkpoints)))
        options = {
            "include": include, "exclude": exclude, "rtol": rtol, "device": device, "top": top,
            "on_tensor": tick, "calibration": stats,
        }  # fmt: skip
        if diff:
            report = _analyze.analyze_change(*checkpoints, policy, **options)
        else:
            report = Report.combine([_analyze.analyze(checkpoint, policy, **options) for checkpoint in checkpoints])
    if plot is not None:
        _plot.plot_spectra(report, plot)
    return report


def plot_spectra(report: Report, path: PathLike) -> tuple[int, int]:
    """Draw an analyze report's normalised singular values into a .png, .svg or .pdf; see ops/plot.py.

    One panel per layer kind (attention, MLP, embedding, other), σ_i/σ_1 on a log axis against
    i/min(m, n), the policy's cut dotted. Needs matplotlib (`pip install 'lowrank[plot]'`).

    Args:
        report: an analyze Report (its rows' singular_values; a policy's rank where one was given).
        path: the picture to write; its suffix (.png, .svg or .pdf) chooses the format. The same
            report gives the same bytes.

    Returns:
        The figure's (width, height) in pixels.

    Example:
        >>> lowrank_cli.plot_spectra(lowrank_cli.analyze("model.safetensors", energy=0.99), "spectra.svg")
    """
    return _plot.plot_spectra(report, path)


@_cleans_up
def compress(
    path: PathLike,
    out: PathLike | None = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    budget: float | None = None,
    dtype: DType | str = DType.keep,
    method: Method | str = Method.auto,
    seed: int = 0,
    device: Device | str = Device.auto,
    include: Globs = None,
    exclude: Globs = None,
    rtol: float | None = None,
    force: bool = False,
    progress: Progress | None = None,
    calibration: PathLike | None = None,
    other_model: bool = False,
    fidelity: float | None = None,
    eval_text: PathLike | None = None,
    seq_len: int | None = None,
    tokens: int | None = None,
    split: Split | str | None = None,
    batch_size: int | None = None,
    objective: Objective | str = Objective.params,
) -> Report:
    """Write truncated-SVD factors NAME.B (m×r) and NAME.A (r×n) wherever they save parameters.

    Args:
        path: a safetensors file, shard folder or index.
        out: the output; default `<stem>.lowrank.safetensors` beside the input, or `<folder>.lowrank/`
            for a folder or index (a folder out, with the input's file names and other files). For a
            file input, "dir/" or an existing folder means dir/<input file name>. Written
            atomically: it appears whole, or not at all.
        rank, energy, max_error, budget: the rank policy, exactly one.
        dtype: the dtype of the factors and of every other float16/bfloat16/float32/float64 tensor
            written; "keep" stores each in its own dtype. A cast tensor's rel_error is that of the cast.
        method, seed: how the SVD is computed ("auto", "exact", "randomized").
        device: "auto", "cpu" or "cuda" (or "cuda:N").
        include, exclude: globs on tensor names, one or a list; the others are copied (cast only by `dtype`).
        rtol: the numerical rank's cut, σ > σ_max·rtol (default max(m, n)·ε), in each row's numerical_rank.
        force: overwrite `out` if it exists.
        progress: called as progress(bytes done, bytes in all) after each tensor (a budget reads them twice);
            with `fidelity`, as progress(evaluations done, evaluations planned) after each.
        calibration: a statistics file from `calibrate`: each tensor with statistics is factorized
            activation-aware (W·S, docs/calibration.md), and the policy's error is its output error
            ‖(W − BA)X‖_F / ‖WX‖_F, reported as `output_error` beside the weight-space rel_error.
        other_model: use statistics made on another model of the same shapes (refused by default:
            the statistics file records a fingerprint of the model it was made on).

        fidelity, eval_text: instead of a rank policy, the smallest model (fewest params, a budget
            searched for) whose fidelity on eval_text, measured as `evaluate` measures it, is at least
            `fidelity` (0 < fidelity < 1). `path` must then be a Hugging Face model folder. The
            report's options["fidelity"] holds the budget found, the fidelity measured on the
            model written and every trial; if no saving reaches it, FidelityNotReached (exit 3) is
            raised and nothing is written.
        seq_len, tokens, split, batch_size: with `fidelity`, how eval_text is cut into samples and
            how many run a forward pass, as for evaluate (default: evaluate's defaults).
        objective: "params" (default) factors every matrix whose factors hold fewer params than it;
            "speed" only those whose factors hold at most 80 % of them (SPEED_SHARE), where they can
            gain speed too, and keeps the others whole (a budget allocates ranks only up to that share).

    Returns:
        The Report; each row's rel_error (and output_error) is measured on the factors as written.

    Example:
        >>> report = lowrank_cli.compress("model.safetensors", "model.r64.safetensors", rank=64)
        >>> report.totals.savings
        >>> lowrank_cli.compress("minilm/", "minilm.f95/", fidelity=0.95, eval_text="eval.txt", calibration="s")
    """
    include, exclude = _globs(include, "include"), _globs(exclude, "exclude")
    settings = Settings(dtype=dtype, method=method, seed=seed, device=resolve_device(device), rtol=rtol)
    sampling = {"seq_len": seq_len, "tokens": tokens, "split": split, "batch_size": batch_size}
    objective = choice(Objective, objective, "objective")
    if fidelity is not None or eval_text is not None:
        if objective != Objective.params:
            raise UsageError(f"{arg('objective')} speed does not combine with {arg('fidelity')} yet; give a policy")
        return _compress_to_fidelity(
            path, out, fidelity, eval_text, (rank, energy, max_error, budget), settings=settings, include=include,
            exclude=exclude, force=force, progress=progress, calibration=calibration, other_model=other_model,
            sampling=sampling,
        )  # fmt: skip
    given = [arg(name) for name, value in sampling.items() if value is not None]
    if given:
        raise UsageError(
            f"{', '.join(given)} cut the {arg('eval_text')} of {arg('fidelity')}; leave them out without it"
        )
    policy = require_policy(RankPolicy.from_options(rank, energy, max_error, budget))
    passes = 2 if policy.budget is not None else 1  # a budget reads every tensor once for its spectrum first
    with open_checkpoint(path) as checkpoint, _progress(progress, passes * _data_bytes(checkpoint)) as tick:
        check_patterns([checkpoint], include, exclude)
        return _compress.compress(
            checkpoint,
            policy,
            out,
            settings=settings,
            include=include,
            exclude=exclude,
            force=force,
            on_tensor=tick,
            calibration=_calibration(calibration, [checkpoint], other_model),
            objective=objective,
        )


def _compress_to_fidelity(
    path,
    out,
    fidelity,
    eval_text,
    policies,
    *,
    settings,
    include,
    exclude,
    force,
    progress,
    calibration,
    other_model,
    sampling,
) -> Report:
    from lowrank_cli.io.outputs import prepare_output
    from lowrank_cli.model.blockwise import open_evaluator
    from lowrank_cli.model.fidelity import compress_to_fidelity
    from lowrank_cli.ops.samples import require_text

    if fidelity is None or eval_text is None:
        raise UsageError(f"{arg('fidelity')} and {arg('eval_text')} go together: the fidelity is measured on that text")
    if any(value is not None for value in policies):
        policies = ", ".join(arg(name) for name in ("rank", "energy", "max_error", "budget"))
        raise UsageError(f"{arg('fidelity')} chooses the ranks itself; leave out {policies}")
    if not 0 < fidelity < 1:
        raise UsageError(f"{arg('fidelity')} must be between 0 and 1, got {fidelity}")
    folder = Path(path)
    require_text(eval_text, "eval_text")
    if not (folder / "config.json").is_file():
        raise UsageError(f"{path}: {arg('fidelity')} needs a Hugging Face model folder (config.json) to run the model")
    with open_checkpoint(folder) as checkpoint:
        check_patterns([checkpoint], include, exclude)
        # OUT is checked before the model runs, as compress checks it before it factorizes
        out, _ = prepare_output(checkpoint, out, _compress.SUFFIX, force=force, inputs=[calibration, eval_text])
        stats = _calibration(calibration, [checkpoint], other_model)
        given = {name: value for name, value in sampling.items() if value is not None}
        evaluator, found = open_evaluator(
            folder, eval_text, feature=arg("fidelity"), batch_size=given.get("batch_size", EVALUATE_BATCH_SIZE),
            device=settings.device, flag="eval_text", seq_len=given.get("seq_len", SEQ_LEN),
            tokens=given.get("tokens", EVALUATE_TOKENS), split=choice(Split, given.get("split", Split.auto), "split"),
        )  # fmt: skip
        report = compress_to_fidelity(
            folder, checkpoint, out, fidelity, evaluator=evaluator, settings=settings,
            include=include, exclude=exclude, force=force, calibration=stats, progress=progress,
        )  # fmt: skip
    report.options["notes"] = [*found.notes, *report.notes]
    return report


@_cleans_up
def expand(
    path: PathLike, out: PathLike | None = None, *, force: bool = False, progress: Progress | None = None
) -> Report:
    """Rebuild the dense checkpoint from a lowrank file: every original name, shape, dtype and metadata.

    Args:
        path: a lowrank file, a folder of lowrank shards (as compress writes a folder) or its index.
        out: read as compress reads it; the default drops `.lowrank` and adds `.dense`
            (model.lowrank.safetensors -> model.dense.safetensors, m.lowrank/ -> m.dense/). Written
            atomically: it appears whole, or not at all.
        force: overwrite `out` if it exists.
        progress: called as progress(bytes done, bytes in all) after each tensor.

    Returns:
        The Report: a row per tensor, `expanded` (B·A, with the error recorded at compress) or `copied`.

    Example:
        >>> lowrank_cli.expand("model.lowrank.safetensors", "model.dense.safetensors")
    """
    with open_checkpoint(path) as checkpoint, _progress(progress, _data_bytes(checkpoint)) as tick:
        return _expand.expand(
            checkpoint,
            out,
            force=force,
            on_tensor=tick,
        )


@_cleans_up
def extract(
    base: PathLike,
    tuned: PathLike,
    out: PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    budget: float | None = None,
    dtype: DType | str = DType.keep,
    method: Method | str = Method.auto,
    seed: int = 0,
    device: Device | str = Device.auto,
    embeddings: bool = False,
    conv: bool = False,
    base_model: str | None = None,
    lora_only: bool = False,
    include: Globs = None,
    exclude: Globs = None,
    force: bool = False,
    progress: Progress | None = None,
    calibration: PathLike | None = None,
    other_model: bool = False,
    format: AdapterFormat | str = AdapterFormat.peft,
) -> Report:
    """A LoRA adapter from a fine-tune: the truncated SVD of ΔW = W_tuned − W_base per module.

    Args:
        base, tuned: the two checkpoints (files, shard folders or indexes), or two diffusers
            pipeline folders (unet/, text_encoder/, text_encoder_2/ read; format kohya only).
        out: the adapter to write: a PEFT folder (adapter_model.safetensors, adapter_config.json),
            or with format "kohya" one .safetensors file in kohya's key format (docs/extract.md).
        rank, energy, max_error, budget: the rank policy, exactly one; errors are of ΔW. A budget F
            allows Σ r·(m + n) ≤ F·Σ m·n over the changed matrices (ranks only: an adapter holds no
            whole matrix).
        dtype: the dtype of the LoRA factors ("keep": each tensor's own).
        method, seed: how the SVD is computed ("auto", "exact", "randomized"; the seed of the last).
        device: where the SVDs run: "auto", "cpu", "cuda" or "cuda:N".
        embeddings, conv: also adapt embeddings (PEFT only) and conv kernels.
        base_model: base_model_name_or_path in adapter_config.json; default BASE's folder
            (the folder itself, or the one holding the file), as an absolute path. kohya: the
            ss_sd_model_name metadata, written only when given.
        lora_only: write only the LoRA pairs. By default what else changed goes in too, with
            status "carried": an adapted module's bias change as its lora_B.bias (lora_bias)
            and a module of 1-D tensors (a LayerNorm) whole, as tuned (modules_to_save). A kohya
            file holds LoRA pairs only.
        calibration: the base model's statistics from `calibrate`: ΔW·S is factorized, and errors
            are of the output change, ‖(ΔW − BA)X‖_F / ‖ΔW·X‖_F.
        other_model: use statistics made on another model than BASE (refused by default).
        include, exclude: globs on tensor names, one or a list; the others stay out of the adapter.
        force: overwrite `out` if it exists.
        progress: called as progress(bytes done, bytes in all) after each of TUNED's tensors.
        format: "peft" (default) or "kohya", the adapter's key format (docs/extract.md).

    Returns:
        The Report: per module its rank, rel_error ‖ΔW − BA‖_F / ‖ΔW‖_F measured on the factors as
        written, and `kept` (the share of ‖ΔW‖² in the adapter).

    Example:
        >>> report = lowrank_cli.extract("base.safetensors", "tuned.safetensors", "adapter", rank=16)
        >>> report = lowrank_cli.extract("sd-base/", "sd-tuned/", "style.safetensors", rank=16, format="kohya")
    """
    include, exclude = _globs(include, "include"), _globs(exclude, "exclude")
    policy = require_policy(RankPolicy.from_options(rank, energy, max_error, budget))
    settings = Settings(dtype=dtype, method=method, seed=seed, device=resolve_device(device))
    options = _extract.ExtractOptions(
        embeddings=embeddings, conv=conv, base_model=base_model, lora_only=lora_only, format=format
    )
    passes = 2 if policy.budget is not None else 1
    with (
        _open_model(base) as base_checkpoint,
        _open_model(tuned) as tuned_checkpoint,
        _progress(progress, passes * _data_bytes(tuned_checkpoint)) as tick,
    ):
        check_patterns([base_checkpoint, tuned_checkpoint], include, exclude)
        return _extract.extract(
            base_checkpoint,
            tuned_checkpoint,
            policy,
            Path(out),
            settings=settings,
            options=options,
            include=include,
            exclude=exclude,
            force=force,
            on_tensor=tick,
            calibration=_calibration(calibration, [base_checkpoint], other_model),
        )


def _open_model(path: PathLike) -> Checkpoint:
    """A checkpoint, or the model folders of a diffusers pipeline folder that kohya adapts, as one."""
    if is_pipeline(path, PIPELINE_MODELS):
        return open_pipeline(path, PIPELINE_MODELS)
    return open_checkpoint(path)


@_cleans_up
def resize(
    adapter: PathLike,
    out: PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    budget: float | None = None,
    dtype: DType | str = DType.keep,
    device: Device | str = Device.auto,
    include: Globs = None,
    exclude: Globs = None,
    force: bool = False,
    progress: Progress | None = None,
    format: AdapterFormat | str | None = None,
) -> Report:
    """A LoRA adapter at new ranks: each module's ΔW = scale·B·A truncated, never formed (docs/resize.md).

    Args:
        adapter: a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) or a kohya
            LoRA file (lora_unet_…/lora_te_… keys with .lora_down.weight, .lora_up.weight, .alpha).
        out: where the resized adapter goes: a PEFT folder, or one kohya .safetensors file.
        rank, energy, max_error, budget: the rank policy, exactly one; errors are of ΔW, and a
            budget F allows Σ r′·(m + n) ≤ F·Σ m·n over the selected modules. None of them with
            a `format` other than the adapter's: every pair is converted as it is.
        format: "peft" or "kohya"; default the adapter's own. kohya names are sd-scripts'
            (lora_te_ for modules named text_model.…, else lora_unet_); a kohya file goes back to
            PEFT when lowrank wrote it (its metadata records the module names).
        dtype: the dtype of the new factors ("keep": each pair's own).
        device: where the QRs run.
        include, exclude: globs on module names (PEFT) or key prefixes (kohya), one or a list; other pairs
            are copied.
        force: overwrite `out`.
        progress: called as progress(bytes done, bytes in all) as the adapter's pairs are read.

    Returns:
        The Report: per module the rank before (rank_before) and after (rank), and rel_error
        ‖ΔW − ΔW′‖_F / ‖ΔW‖_F measured on the factors as written. Every new pair has scale 1.

    Example:
        >>> report = lowrank_cli.resize("adapter-r128/", "adapter-r16/", rank=16)
        >>> report = lowrank_cli.resize("adapter-r128/", "adapter.kohya.safetensors", format="kohya")
        >>> [(t.name, t.rank_before, t.rank, t.rel_error) for t in report.tensors]
    """
    from lowrank_cli.io.lora import open_adapter
    from lowrank_cli.ops.resize import resize as _resize

    include, exclude = _globs(include, "include"), _globs(exclude, "exclude")
    policy = RankPolicy.from_options(rank, energy, max_error, budget)
    if format is None:
        require_policy(policy)  # before the adapter is read: a policy, or a format to convert to
    settings = Settings(dtype=dtype, device=resolve_device(device))
    with open_adapter(adapter) as opened, _progress(progress, opened.checkpoint.nbytes) as tick:
        return _resize(opened, policy, Path(out), format=format, settings=settings, include=include, exclude=exclude,
                       force=force, on_tensor=tick)  # fmt: skip


def calibrate(
    model: PathLike,
    out: PathLike,
    *,
    text: PathLike,
    seq_len: int = SEQ_LEN,
    tokens: int = CALIBRATE_TOKENS,
    samples: int | None = None,
    batch_size: int = CALIBRATE_BATCH_SIZE,
    device: Device | str = Device.auto,
    force: bool = False,
    split: Split | str = Split.auto,
    sensitivity: bool = True,
    probe_tokens: int = PROBE_TOKENS,
    exact_sensitivity: bool = False,
    progress: Progress | None = None,
) -> CalibrationReport:
    """The second moment E[x xᵀ] of every Linear layer's input over samples of a text file, saved to `out`.

    Args:
        model: a Hugging Face model folder (config.json, safetensors, tokenizer); needs the
            `calibrate` extra (transformers). Runs offline.
        out: the statistics file (docs/calibration.md) that `calibration=` reads.
        text: a UTF-8 text file, cut into samples as `split` says.
        split: "windows" cuts the text into windows of `seq_len` tokens; "lines" makes each
            non-empty line one sample (cut at `seq_len`); "auto" (the default) takes lines when the
            file is one short sample per line: use lines when the model's real inputs are short
            (sentences, prompts).
        seq_len: the longest sample, in tokens.
        tokens, samples: samples holding about `tokens` tokens (at most `samples` of them) are
            taken evenly over the whole text.
        batch_size: samples per forward pass.
        device: where the model runs: "auto", "cpu", "cuda" or "cuda:N".
        force: overwrite `out` if it exists.
        sensitivity: also measure each weight's sensitivity (the model's output error when that
            weight alone is cut, per unit of its squared error) on about `probe_tokens` tokens
            of the samples; a budget with these statistics spares the weights the model needs
            most (docs/calibration.md).
        probe_tokens: the tokens each cut is measured on.
        exact_sensitivity: measure each weight's sensitivity with one forward of the whole model
            (loaded whole) per weight, the reference the default estimate is checked against,
            instead of the default: one projected backward pass through the blocks (docs/calibration.md).
        progress: called as progress(done, total) after each block and each weight probed.

    The model runs one block at a time (memory: one block, its moments and the samples' activations).

    Returns:
        A CalibrationReport: the samples and tokens run, the distinct inputs, the weights covered,
        the embedding tables counted and, with sensitivity, the weights measured and the probe's
        tokens; `notes` (how the text was split, when auto chose).

    Example:
        >>> lowrank_cli.calibrate("bert-base", "bert.stats.safetensors", text="wiki.txt")
        >>> lowrank_cli.compress("bert-base/model.safetensors", budget=0.5, calibration="bert.stats.safetensors")
    """
    from lowrank_cli.model.calibrate import calibrate as _calibrate

    return _calibrate(
        model, out, text, seq_len=seq_len, tokens=tokens, samples=samples, batch_size=batch_size,
        device=resolve_device(device), force=force, split=choice(Split, split, "split"), sensitivity=sensitivity,
        probe_tokens=probe_tokens, exact_sensitivity=exact_sensitivity, progress=progress,
    )  # fmt: skip


def evaluate(
    reference: PathLike,
    candidate: PathLike,
    *,
    text: PathLike,
    seq_len: int = SEQ_LEN,
    tokens: int = EVALUATE_TOKENS,
    samples: int | None = None,
    split: Split | str = Split.auto,
    batch_size: int = EVALUATE_BATCH_SIZE,
    device: Device | str = Device.auto,
) -> Evaluation:
    """What a compressed model lost: both models run over samples of a text, compared by model kind.

    Args:
        reference: the original Hugging Face model folder (config.json, weights, tokenizer); needs
            the `calibrate` extra (transformers). Runs offline.
        candidate: the model to measure: a folder (lowrank-compressed or dense) or a weights file of
            the reference's architecture. Factors run as factors (load_pretrained), never expanded.
        text: a UTF-8 text file, sampled as calibrate samples it.
        seq_len, tokens, samples, split: how the text is cut into samples, as for calibrate.
        batch_size: samples per forward pass.
        device: where both models run.

    Returns:
        An Evaluation: `fidelity` (1.0 = the reference's outputs) and `metric` (its definition), and
        by kind: encoders the cosine of pooled sentence embeddings (mean, 5th percentile, minimum);
        causal and masked LMs the perplexity of both, mean KL(reference ‖ candidate) and top-1
        agreement. `held_out` is False when the text is one the candidate was made with (its
        calibration text, the text --fidelity chose its budget on, a text heal trained it on), None
        for a dense candidate; `nonfinite` counts the samples (LMs: positions) with NaN outputs.

    Example:
        >>> result = lowrank_cli.evaluate("minilm/", "minilm.lowrank/", text="held-out.txt")
        >>> result.fidelity, result.cosine_p5
    """
    from lowrank_cli.model.evaluate import evaluate as _evaluate

    return _evaluate(
        reference, candidate, text, seq_len=seq_len, tokens=tokens, samples=samples,
        split=choice(Split, split, "split"), batch_size=batch_size, device=resolve_device(device),
    )  # fmt: skip


def _check_fingerprint(calibration: Calibration, checkpoint: Checkpoint) -> None:
    """Statistics made on another model of the same shapes (a fine-tune, another seed) are refused."""
    for name, recorded in calibration.fingerprint.items():
        entry = checkpoint.entries.get(name)
        if entry is None or not entry.is_float:
            continue
        tensor = checkpoint.read(name)
        if fingerprint_differs(recorded, fingerprint_values(tensor), tensor.dtype):
            raise CheckpointError(
                f"{calibration.source}: its statistics were made on another model ('{name}' holds other values in"
                f" {checkpoint.source}); run lowrank calibrate on this model, or pass {arg('other_model')} to use them"
            )


@_cleans_up
def heal(
    reference: PathLike,
    compressed: PathLike,
    out: PathLike,
    *,
    text: PathLike,
    steps: int | None = None,
    epochs: int = HEAL_EPOCHS,
    lr: float = HEAL_LR,
    batch_size: int = HEAL_BATCH_SIZE,
    seq_len: int = SEQ_LEN,
    tokens: int = HEAL_TOKENS,
    samples: int | None = None,
    split: Split | str = Split.auto,
    eval_text: PathLike | None = None,
    seed: int = 0,
    blockwise: bool = False,
    device: Device | str = Device.auto,
    force: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> Report:
    """Distil a compressed model back toward the original, at the same size: its factors are trained.

    Args:
        reference: the original Hugging Face model folder (needs transformers; offline).
        compressed: a lowrank-compressed folder or file made from it.
        out: where the healed model goes: the same ranks, names, shards, dtypes and format as
            `compressed` (load_pretrained, expand and evaluate read it).
        text: the training text, sampled as calibrate samples it.
        seq_len, tokens, samples, split: how the text is cut into samples, as for calibrate.
        steps: optimizer steps (default: `epochs` passes over the samples).
        epochs, lr, batch_size, seed: AdamW with a learning rate decaying linearly to 0; runs with
            the same seed are the same on one machine.
        eval_text: also measure the fidelity before and after on this text, as evaluate does.
        blockwise: train each block to reproduce the reference block's outputs, one block at a time,
            in the memory of one block (steps and epochs are then per block); else end to end, on the
            model's outputs, with both models whole in memory.
        device: where both models run ("cuda" trains on the GPU).
        force: overwrite `out`.
        progress: called as progress(step, steps, running loss) after each step.

    Returns:
        A Report: per factorized tensor the weight error after healing (measured on what is
        written, against the reference's W); options["heal"] records the text hash, steps, final
        loss and, with eval_text, the fidelity before and after and whether it is held out.

    Example:
        >>> lowrank_cli.heal("minilm/", "minilm.lowrank/", "minilm.healed/", text="train.txt", eval_text="eval.txt")
    """
    from lowrank_cli.model.heal import HealOptions
    from lowrank_cli.model.heal import heal as _heal

    options = HealOptions(steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, blockwise=blockwise)
    return _heal(
        reference, compressed, text, out, options=options, seq_len=seq_len, tokens=tokens, samples=samples,
        split=choice(Split, split, "split"), eval_text=eval_text, device=resolve_device(device), force=force,
        progress=progress,
    )  # fmt: skip


def _calibration(path: PathLike | None, checkpoints: list, other_model: bool = False) -> Calibration | None:
    """The statistics file, checked to describe at least one tensor of the checkpoints, and to be of
    this model (its fingerprint) unless other_model."""
    if path is None:
        return None
    calibration = read_calibration(path)
    names = {name for checkpoint in checkpoints for name in checkpoint.entries}
    if not other_model:
        _check_fingerprint(calibration, checkpoints[0])
    if not names & set(calibration.moments):
        raise CheckpointError(
            f"{path}: its statistics name no tensor of {checkpoints[0].source}; run lowrank calibrate on this model"
            f" ({arg('calibration')})"
        )
    return calibration


@contextmanager
def _progress(progress: Progress | None, total: int) -> Iterator[Callable[[TensorEntry], None] | None]:
    """The ops' per-tensor callback as running byte counts of tensor data, ending at total."""
    if progress is None:
        yield None
        return
    done = 0

    def tick(entry: TensorEntry) -> None:
        nonlocal done
        done = min(done + entry.nbytes, total)
        progress(done, total)

    yield tick
    if done < total:  # tensors left out by include/exclude, or a budget's first pass over fewer tensors
        progress(total, total)


def _data_bytes(*checkpoints: Checkpoint) -> int:
    return sum(entry.nbytes for checkpoint in checkpoints for entry in checkpoint.entries.values())
