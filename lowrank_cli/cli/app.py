"""The `lowrank` command line: parse, call the library (lowrank_cli's public API), render.

torch loads only inside a command, when the library first needs it, so `lowrank --help` is fast.
Every run ends in one place, `_App`: it turns whatever stopped a command into one line on stderr
and an exit code (`_exit_code`), so no command can forget to.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

import lowrank_cli
import lowrank_cli.ops.settings as defaults  # torch-free: the library's own default values
from lowrank_cli import AdapterFormat, DType, Method, Objective, Split
from lowrank_cli.cli.options import (
    DEFAULT_DEVICE,
    AdapterBudget,
    BatchSize,
    Budget,
    Calibration,
    DeviceOption,
    DTypeOption,
    Energy,
    EvalBatchSize,
    EvalSeqLen,
    EvalSplit,
    EvalText,
    EvalTokens,
    Exclude,
    FactorDTypeOption,
    FailAbove,
    Force,
    HealBatchSize,
    HealBlockwise,
    HealedOutput,
    HealEvalText,
    HealSeed,
    Include,
    Json,
    MaxError,
    MethodOption,
    ObjectiveOption,
    OtherModel,
    Output,
    Rank,
    Reference,
    Rtol,
    Samples,
    Seed,
    SeqLen,
    SplitOption,
    StatisticsOutput,
    Text,
    Tokens,
    TrainingText,
    flag,
)
from lowrank_cli.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_QUALITY_GATE,
    EXIT_TERMINATED,
    LowrankError,
    Terminated,
    UsageError,
)


def _exit_code(exc: Exception | KeyboardInterrupt, written: Sequence[Path] = ()) -> int | None:
    """The CLI's one error handler: the exit code for what ended a run, after its one line on stderr.

    `written`: the outputs the run had published when it was stopped, which an interrupt's line names.

    None for what must go on as it is: an error that is not in this table (a bug, whose traceback
    is the report), a broken pipe (typer quiets it), and, with LOWRANK_DEBUG=1, every error but a
    usage error of the command line, so that its traceback shows.
    """
    if isinstance(exc, typer.Exit):  # a command's own code (the quality gates), or --help, --version
        return exc.exit_code
    # typer's usage errors (click's, vendored: `import click` would be another copy) carry both
    usage = hasattr(exc, "format_message") and hasattr(exc, "exit_code")
    if isinstance(exc, BrokenPipeError) or (os.environ.get("LOWRANK_DEBUG") == "1" and not usage):
        return None
    from lowrank_cli.cli.render import error

    if isinstance(exc, KeyboardInterrupt):
        terminated = isinstance(exc, Terminated)
        code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        if written:  # published whole before the interrupt: say so, not that nothing was written
            names = ", ".join(str(path) for path in written)
            message = f"{what} after {names} was written whole; its report was not shown"
        else:
            message = f"{what}; no output was written"
    elif isinstance(exc, LowrankError):
        code, message = exc.exit_code, exc.worded(flag)  # the library's argument names, spelled as flags
    elif isinstance(exc, typer.Abort):  # end of input at a prompt
        code, message = EXIT_FAILURE, "aborted"
    elif usage and type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()  # `lowrank` alone: the help, on stderr
        return exc.exit_code
    elif usage:
        command = getattr(getattr(exc, "ctx", None), "command_path", None) or "lowrank"
        code, message = exc.exit_code, f"{exc.format_message().replace('Value error, ', '')} (see {command} --help)"
    elif isinstance(exc, OSError):  # what the library did not foresee: a disk full, a file gone
        where = f"{exc.filename}: " if exc.filename else ""
        code, message = EXIT_FAILURE, f"{where}{exc.strerror or exc}"
    else:
        return None
    error(message)
    return code


class _App(TyperGroup):
    """lowrank's command group, where every run ends: main() sees what parsing the command line
    raises, invoke() what a command raises; both hand it to _exit_code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:  # the caller takes the exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as exc:
            code = _exit_code(exc)
            if code is None:
                raise
        sys.exit(code if isinstance(code, int) else 0)

    def make_context(self, *args, **kwargs):
        # Ctrl-C while the group's own options are parsed, before any command: typer would exit 130 bare
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as exc:
            code = _exit_code(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None

    def invoke(self, ctx):
        # Here as well as in main(): typer turns Ctrl-C into a bare exit 130 on its way up, which
        # would lose SIGTERM's 143 and the line that says no output was written.
        with lowrank_cli.recording_published() as written:
            try:
                return super().invoke(ctx)
            except (Exception, KeyboardInterrupt) as exc:
                code = _exit_code(exc, written)
                if code is None:
                    raise
                raise typer.Exit(code) from None


class _PlainHelp(TyperCommand):
    """Arguments shown by their metavar alone (PATH), not typer's `{PATH}` and `PATH <path>`."""

    def collect_usage_pieces(self, ctx):
        arguments = [param.metavar for param in self.get_params(ctx) if param.param_type_name == "argument"]
        return [self.options_metavar, *arguments]

    def format_options(self, ctx, formatter):
        records = {"argument": [], "option": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and param.param_type_name in records:
                name = param.metavar if param.param_type_name == "argument" else record[0]
                records[param.param_type_name].append((name, record[1]))
        for kind, title in (("argument", "Arguments"), ("option", "Options")):
            if records[kind]:
                with formatter.section(title):
                    formatter.write_dl(records[kind])


def _examples(*lines: str) -> str:
    """An epilog that click prints as written (\b stops it rewrapping the lines)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


app = typer.Typer(
    cls=_App,
    name="lowrank",
    help="The low-rank structure of neural-network weights in safetensors files.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain click help: rich help imports rich.markdown (and markdown-it) before any help is shown,
    # an import `lowrank --help` should not pay for.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_command = functools.partial(app.command, cls=_PlainHelp)


@contextmanager
def _running(
    label: str, fail_above: float | None = None, steps: str | None = None
) -> Iterator[Callable[[int, int], None] | None]:
    """A checkpoint command's library call: a progress bar on stderr (over bytes, or over `steps`), once
    --fail-above is known to be a threshold (so that a bad one costs no run); yields the library's callback."""
    from lowrank_cli.cli.render import progress

    if fail_above is not None and not fail_above >= 0:
        raise UsageError(f"--fail-above must be ≥ 0, got {fail_above}")
    with progress(label, steps) as tick:
        yield tick


def _finish(result, as_json: bool, fail_above: float | None = None, *, as_csv: bool = False) -> None:
    """Show the result (notes on stderr, the document on stdout), then apply the --fail-above gate."""
    from lowrank_cli.cli.render import notice, show

    show(result, as_json=as_json, as_csv=as_csv)
    worst = result.exceeds(fail_above) if fail_above is not None else []
    if worst:
        kind, error_of = (
            ("output error", lambda t: t.output_error)
            if worst[0].output_error is not None
            else ("relative error", lambda t: t.rel_error)
        )
        top = max(worst, key=error_of)
        notice(
            f"quality gate: {len(worst)} tensor(s) above {kind} {fail_above:g}"
            f" (worst: '{top.name}' at {error_of(top):.3g})"
        )
        raise typer.Exit(EXIT_QUALITY_GATE)


@_command(
    short_help="Spectra and ranks; what a policy would save.",
    epilog=_examples(
        "lowrank analyze model.safetensors",
        "lowrank analyze hf-model/ --energy 0.99 --include '*.mlp.*'",
        "lowrank analyze model.safetensors --json --top 64 | jq '.tensors[0]'",
        "lowrank analyze hf-model/ --energy 0.99 --plot spectra.png",
        "lowrank analyze hf-model/ --csv > rows.csv",
        "lowrank analyze base/ tuned/ --diff --energy 0.9  # what extract would need",
    ),
)
def analyze(
    paths: Annotated[
        list[Path],
        typer.Argument(help="safetensors files, model folders or index files.", show_default=False, metavar="PATH..."),
    ],
    rank: Rank = None,
    energy: Energy = None,
    max_error: MaxError = None,
    budget: Budget = None,
    include: Include = None,
    exclude: Exclude = None,
    rtol: Rtol = None,
    fail_above: FailAbove = None,
    device: DeviceOption = DEFAULT_DEVICE,
    top: Annotated[
        Optional[int],
        typer.Option("--top", help="--json: list the K largest singular values per tensor (default all).", metavar="K"),
    ] = None,
    calibration: Calibration = None,
    other_model: OtherModel = False,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot",
            help="Also draw each tensor's σ_i/σ_1 into FILE (.png, .svg or .pdf), a panel per layer kind,"
            " the policy's cut dotted; needs pip install 'lowrank[plot]'.",
            metavar="FILE",
        ),
    ] = None,
    diff: Annotated[
        bool,
        typer.Option(
            "--diff",
            help="Two PATHs, BASE then TUNED: the spectra of each change ΔW = W_TUNED − W_BASE and, with a policy,"
            " the ranks and adapter size lowrank extract would need.",
        ),
    ] = False,
    as_json: Json = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print the rows as CSV on stdout instead of a table.")] = False,
) -> None:
    """Singular values, numerical and stable rank, energy ranks; with a policy, what it would save."""
    if as_json and as_csv:
        raise UsageError("--json and --csv are two formats for the same rows; give one")
    if fail_above is not None and all(value is None for value in (rank, energy, max_error, budget)):
        raise UsageError(
            "--fail-above needs a rank policy (--rank, --energy, --max-error or --budget) to measure an error"
        )
    label = f"analyze {paths[0].name}" + (f" (+{len(paths) - 1})" if len(paths) > 1 else "")
    with _running(label, fail_above) as tick:
        report = lowrank_cli.analyze(
            paths, rank=rank, energy=energy, max_error=max_error, budget=budget, include=include,
            exclude=exclude, rtol=rtol, device=device, top=top, progress=tick, calibration=calibration,
            other_model=other_model, plot=plot, diff=diff,
        )  # fmt: skip
    if plot is not None:
        from lowrank_cli.cli.render import notice

        notice(f"wrote {plot}")
    _finish(report, as_json, fail_above, as_csv=as_csv)


@_command(
    short_help="Store weight matrices as low-rank factors.",
    epilog=_examples(
        "lowrank compress model.safetensors --rank 64    # model.lowrank.safetensors",
        "lowrank compress hf-model/ --energy 0.99 -o out/  # a folder: out/",
        "lowrank compress model.safetensors --max-error 0.02 --dtype bfloat16",
        "lowrank compress hf-model/ --fidelity 0.95 --eval-text eval.txt",
    ),
)
def compress(
    path: Annotated[
        Path, typer.Argument(help="A safetensors file, model folder or index.", show_default=False, metavar="PATH")
    ],
    output: Output = None,
    rank: Rank = None,
    energy: Energy = None,
    max_error: MaxError = None,
    budget: Budget = None,
    dtype: DTypeOption = DType.keep,
    method: MethodOption = Method.auto,
    seed: Seed = 0,
    device: DeviceOption = DEFAULT_DEVICE,
    include: Include = None,
    exclude: Exclude = None,
    rtol: Rtol = None,
    fail_above: FailAbove = None,
    calibration: Calibration = None,
    other_model: OtherModel = False,
    fidelity: Annotated[
        Optional[float],
        typer.Option(
            "--fidelity",
            help="Instead of a policy: the smallest model whose fidelity on --eval-text (as lowrank evaluate"
            " measures it) is at least F; PATH must be a model folder. Exit 3, nothing written, if none is.",
            metavar="F",
        ),
    ] = None,
    eval_text: EvalText = None,
    seq_len: EvalSeqLen = None,
    tokens: EvalTokens = None,
    split: EvalSplit = None,
    batch_size: EvalBatchSize = None,
    objective: ObjectiveOption = Objective.params,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Write truncated-SVD factors NAME.B (m×r), NAME.A (r×n) wherever they save parameters."""
    steps = "evaluations" if fidelity is not None else None  # the search's progress is in models measured
    if fidelity is not None:  # the search runs the model block by block: before torch loads (docs/evaluate.md)
        lowrank_cli.bound_native_memory()
    with _running(f"compress {path.name}", fail_above, steps) as tick:
        report = lowrank_cli.compress(
            path, output, rank=rank, energy=energy, max_error=max_error, budget=budget, dtype=dtype, method=method,
            seed=seed, device=device, include=include, exclude=exclude, rtol=rtol, force=force, progress=tick,
            calibration=calibration, other_model=other_model, fidelity=fidelity, eval_text=eval_text,
            seq_len=seq_len, tokens=tokens, split=split, batch_size=batch_size,
            objective=objective,
        )  # fmt: skip
    if fidelity is not None:
        from lowrank_cli.cli.render import notice

        found = report.options["fidelity"]
        notice(
            f"fidelity {found['measured']:.4f} ≥ {fidelity:g} on {eval_text} ({found['metric']}), measured on the"
            f" model written, at --budget {found['budget']:g} after {found['evaluations']} evaluations; that text"
            " chose the budget, so run lowrank evaluate on another for a held-out figure"
        )
    _finish(report, as_json, fail_above)


@_command(
    short_help="Rebuild the dense checkpoint from factors.",
    epilog=_examples(
        "lowrank expand model.lowrank.safetensors   # model.dense.safetensors",
        "lowrank expand hf-model.lowrank/            # hf-model.dense/, loads with",
        "                                            # AutoModel.from_pretrained",
    ),
)
def expand(
    path: Annotated[
        Path,
        typer.Argument(help="A file (or folder) written by lowrank compress.", show_default=False, metavar="PATH"),
    ],
    output: Output = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Rebuild the dense checkpoint: every original tensor, name, shape, dtype and metadata."""
    with _running(f"expand {path.name}") as tick:
        report = lowrank_cli.expand(path, output, force=force, progress=tick)
    _finish(report, as_json)


@_command(
    short_help="A LoRA adapter (PEFT or kohya) from a fine-tune.",
    epilog=_examples(
        "lowrank extract base.safetensors tuned.safetensors -o adapter/ --rank 16",
        "lowrank extract base/ tuned/ -o adapter/ --max-error 0.1 --base-model org/m",
        "lowrank extract sd/ sd-tuned/ -o lora.safetensors --rank 16 --format kohya",
    ),
)
def extract(
    base: Annotated[
        Path, typer.Argument(help="The base checkpoint (file or shard folder).", show_default=False, metavar="BASE")
    ],
    tuned: Annotated[Path, typer.Argument(help="The fine-tuned checkpoint.", show_default=False, metavar="TUNED")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="The adapter to write: a folder (PEFT) or a .safetensors file (kohya).",
            metavar="OUT",
        ),
    ],
    rank: Rank = None,
    energy: Energy = None,
    max_error: MaxError = None,
    budget: AdapterBudget = None,
    dtype: FactorDTypeOption = DType.keep,
    method: MethodOption = Method.auto,
    seed: Seed = 0,
    device: DeviceOption = DEFAULT_DEVICE,
    embeddings: Annotated[
        bool, typer.Option("--embeddings", help="Also extract embeddings (PEFT lora_embedding_A/B).")
    ] = False,
    conv: Annotated[bool, typer.Option("--conv", help="Also extract conv kernels (PEFT conv LoRA).")] = False,
    base_model: Annotated[
        Optional[str],
        typer.Option(
            "--base-model",
            help="base_model_name_or_path for adapter_config.json (default: BASE's folder).",
            metavar="NAME",
        ),
    ] = None,
    lora_only: Annotated[
        bool,
        typer.Option(
            "--lora-only",
            help="Only the LoRA pairs: leave out changed biases (lora_bias) and norms (modules_to_save).",
        ),
    ] = False,
    include: Include = None,
    exclude: Exclude = None,
    fail_above: FailAbove = None,
    calibration: Calibration = None,
    other_model: OtherModel = False,
    format: Annotated[
        AdapterFormat,
        typer.Option(
            "--format",
            help="peft (an adapter folder) or kohya (one file of lora_unet_/lora_te_ keys, for diffusers and"
            " ComfyUI; BASE and TUNED may be diffusers pipeline folders).",
            case_sensitive=False,
            metavar="FORMAT",
        ),
    ] = AdapterFormat.peft,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """A LoRA adapter from a fine-tune: truncated SVD of ΔW = W_tuned − W_base per module."""
    with _running(f"extract {tuned.name}", fail_above) as tick:
        report = lowrank_cli.extract(
            base, tuned, output, rank=rank, energy=energy, max_error=max_error, budget=budget, dtype=dtype,
            method=method, seed=seed, device=device, embeddings=embeddings, conv=conv, base_model=base_model,
            lora_only=lora_only, include=include, exclude=exclude, force=force, progress=tick,
            calibration=calibration, other_model=other_model, format=format,
        )  # fmt: skip
    _finish(report, as_json, fail_above)


@_command(
    short_help="A LoRA adapter (PEFT or kohya) at new ranks.",
    epilog=_examples(
        "lowrank resize adapter-r128/ -o adapter-r16/ --rank 16",
        "lowrank resize style.safetensors -o style.small.safetensors --max-error 0.05",
        "lowrank resize adapter/ -o adapter.safetensors --format kohya",
    ),
)
def resize(
    adapter: Annotated[
        Path,
        typer.Argument(
            help="A PEFT adapter folder or a kohya LoRA .safetensors file.", show_default=False, metavar="ADAPTER"
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="The resized adapter, in ADAPTER's format or --format.", metavar="OUT"),
    ],
    rank: Rank = None,
    energy: Energy = None,
    max_error: MaxError = None,
    budget: AdapterBudget = None,
    dtype: FactorDTypeOption = DType.keep,
    device: DeviceOption = DEFAULT_DEVICE,
    include: Include = None,
    exclude: Exclude = None,
    fail_above: FailAbove = None,
    format: Annotated[
        Optional[AdapterFormat],
        typer.Option(
            "--format",
            help="Write peft (a folder) or kohya (one file); default ADAPTER's. Without a policy: convert only.",
            case_sensitive=False,
            metavar="FORMAT",
        ),
    ] = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Truncate each module's ΔW = scale·B·A from its factors (no m×n product) to the policy's rank."""
    with _running(f"resize {adapter.name}", fail_above) as tick:
        report = lowrank_cli.resize(
            adapter, output, rank=rank, energy=energy, max_error=max_error, budget=budget, dtype=dtype,
            device=device, include=include, exclude=exclude, force=force, progress=tick, format=format,
        )  # fmt: skip
    _finish(report, as_json, fail_above)


@_command(
    short_help="Input statistics of each Linear, for --calibration.",
    epilog=_examples(
        "lowrank calibrate hf-model/ -o stats.safetensors --text calib.txt",
        "lowrank compress hf-model/ --rank 96 --calibration stats.safetensors",
    ),
)
def calibrate(
    model: Annotated[
        Path,
        typer.Argument(help="A Hugging Face model folder (config.json, safetensors, tokenizer).", metavar="MODEL"),
    ],
    output: StatisticsOutput,
    text: Text,
    seq_len: SeqLen = defaults.SEQ_LEN,
    tokens: Tokens = defaults.CALIBRATE_TOKENS,
    samples: Samples = None,
    batch_size: BatchSize = defaults.CALIBRATE_BATCH_SIZE,
    split: SplitOption = Split.auto,
    sensitivity: Annotated[
        bool,
        typer.Option(
            "--sensitivity/--no-sensitivity",
            help="Also measure how much each weight's error costs the model's output (for --budget).",
        ),
    ] = True,
    probe_tokens: Annotated[
        int, typer.Option("--probe-tokens", help="Tokens the sensitivity probe runs per weight.", metavar="N")
    ] = defaults.PROBE_TOKENS,
    exact_sensitivity: Annotated[
        bool,
        typer.Option(
            "--exact-sensitivity",
            help="Measure sensitivities with one whole-model forward per weight (slow, whole model in memory).",
        ),
    ] = False,
    device: DeviceOption = DEFAULT_DEVICE,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Input statistics of each Linear, for --calibration."""
    from lowrank_cli.cli.render import progress

    lowrank_cli.bound_native_memory()  # the model runs block by block: before torch loads (docs/evaluate.md)
    with progress(f"calibrate {model.name}", steps="blocks, then weights probed") as tick:
        report = lowrank_cli.calibrate(
            model, output, text=text, seq_len=seq_len, tokens=tokens, samples=samples, batch_size=batch_size,
            device=device, force=force, split=split, sensitivity=sensitivity, probe_tokens=probe_tokens,
            exact_sensitivity=exact_sensitivity, progress=tick,
        )  # fmt: skip
    _finish(report, as_json)


@_command(
    short_help="What a compressed model lost, on real text.",
    epilog=_examples(
        "lowrank evaluate hf-model/ hf-model.lowrank/ --text held-out.txt",
        "lowrank evaluate hf-model/ hf-model.lowrank/ --text eval.txt --json --fail-below 0.95",
    ),
)
def evaluate(
    reference: Reference,
    candidate: Annotated[
        Path,
        typer.Argument(
            help="The model to measure: a compressed or dense folder, or a weights file.",
            show_default=False,
            metavar="CANDIDATE",
        ),
    ],
    text: Text,
    seq_len: SeqLen = defaults.SEQ_LEN,
    tokens: Tokens = defaults.EVALUATE_TOKENS,
    samples: Samples = None,
    split: SplitOption = Split.auto,
    batch_size: BatchSize = defaults.EVALUATE_BATCH_SIZE,
    fail_below: Annotated[
        Optional[float],
        typer.Option("--fail-below", help="Exit 3 if the fidelity is below F (a CI gate).", metavar="F"),
    ] = None,
    device: DeviceOption = DEFAULT_DEVICE,
    as_json: Json = False,
) -> None:
    """Run REFERENCE and CANDIDATE over samples of a text and compare their outputs, by model kind.

    Encoders: cosine of pooled sentence embeddings. Causal and masked LMs: perplexity of both,
    KL(reference ‖ candidate) per token, top-1 agreement. fidelity is one number, 1.0 = identical.
    """
    from lowrank_cli.cli.render import notice

    if fail_below is not None and not 0 <= fail_below <= 1:
        raise UsageError(f"--fail-below must be between 0 and 1, got {fail_below}")
    lowrank_cli.bound_native_memory()  # the models run block by block: before torch loads (docs/evaluate.md)
    result = lowrank_cli.evaluate(
        reference, candidate, text=text, seq_len=seq_len, tokens=tokens, samples=samples, split=split,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    _finish(result, as_json)
    failed = result.gate(fail_below) if fail_below is not None else None
    if failed:
        notice(f"quality gate: {failed}")
        raise typer.Exit(EXIT_QUALITY_GATE)


@_command(
    short_help="Train a compressed model's factors back toward the original.",
    epilog=_examples(
        "lowrank heal hf-model/ hf-model.lowrank/ --text train.txt -o hf-model.healed/",
        "lowrank heal hf-model/ hf-model.lowrank/ --text train.txt -o out/ --eval-text eval.txt",
    ),
)
def heal(
    reference: Reference,
    compressed: Annotated[
        Path,
        typer.Argument(
            help="The lowrank-compressed folder or file made from it.", show_default=False, metavar="COMPRESSED"
        ),
    ],
    output: HealedOutput,
    text: TrainingText,
    steps: Annotated[
        Optional[int], typer.Option("--steps", help="Optimizer steps (default: --epochs passes).", metavar="N")
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", help="Passes over the samples.", metavar="N")
    ] = defaults.HEAL_EPOCHS,
    lr: Annotated[
        float, typer.Option("--lr", help="AdamW learning rate, decaying linearly to 0.", metavar="LR")
    ] = defaults.HEAL_LR,
    batch_size: HealBatchSize = defaults.HEAL_BATCH_SIZE,
    seq_len: SeqLen = defaults.SEQ_LEN,
    tokens: Tokens = defaults.HEAL_TOKENS,
    samples: Samples = None,
    split: SplitOption = Split.auto,
    eval_text: HealEvalText = None,
    seed: HealSeed = 0,
    blockwise: HealBlockwise = False,
    device: DeviceOption = DEFAULT_DEVICE,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Distil COMPRESSED toward REFERENCE on a text: only the factors (and their layers' biases) train.

    OUT has the same ranks, names and format as COMPRESSED; each factor's weight error is measured
    again on what is written.
    """
    from lowrank_cli.cli.render import notice, training_progress

    with training_progress(f"heal {compressed.name}") as tick:
        report = lowrank_cli.heal(
            reference, compressed, output, text=text, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
            seq_len=seq_len, tokens=tokens, samples=samples, split=split, eval_text=eval_text, seed=seed,
            blockwise=blockwise, device=device, force=force, progress=tick,
        )  # fmt: skip
    _finish(report, as_json)
    healed = report.options["heal"]
    line = f"{healed['steps']} steps, final loss {healed['final_loss']:.4g}"
    if "fidelity_after" in healed:
        kind = "held out" if healed["held_out"] else "not held out: see the note"
        line += f"; fidelity {healed['fidelity_before']:.4f} → {healed['fidelity_after']:.4f} ({kind})"
    notice(line)


def _version(value: bool) -> None:
    if value:
        print(f"lowrank {lowrank_cli.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """The low-rank structure of neural-network weights in safetensors files."""


def _stop(signum, frame) -> None:
    """SIGINT or SIGTERM: unwind through the writers, which remove their temporary files.

    Only the first signal counts: a second one while the first unwinds would break off the cleanup
    itself (temporaries left, a traceback from a finalizer at exit), so later ones are ignored.
    """
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def main() -> None:
    # OpenMP threads that spin between parallel regions hold the cores the other threads of the
    # region, and other processes, are waiting for on a busy or shared CPU; each region here is a
    # large matrix product or SVD, beside which waking a sleeping thread is nothing (benchmarks/README.md,
    # the WeightWatcher section, has a run without it).
    # Set before torch loads, which happens only inside a command; the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        app(prog_name="lowrank")
    except KeyboardInterrupt as exc:  # before _App's handler is reached: while typer builds the command line
        code = _exit_code(exc)
        if code is None:
            raise
        sys.exit(code)
    sys.exit(0)
