"""The `lowrank` command line: parse, call the library (lowrank_cli's public API), render.

torch loads only inside a command, when the library first needs it, so `lowrank --help` is fast.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

import lowrank_cli
from lowrank_cli import AdapterFormat, Device, DType, Method, Split
from lowrank_cli.cli.options import (
    Budget,
    Calibration,
    DeviceOption,
    DTypeOption,
    Energy,
    Exclude,
    FactorDTypeOption,
    FailAbove,
    Force,
    Include,
    Json,
    MaxError,
    MethodOption,
    OtherModel,
    Output,
    Rank,
    Rtol,
    Seed,
    SplitOption,
    flag,
)
from lowrank_cli.errors import EXIT_QUALITY_GATE, EXIT_TERMINATED, Interrupted, LowrankError, Terminated, UsageError


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad choice, a missing argument) as one `error:` line on stderr, like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as exc:
            # typer's usage errors (click's, vendored) carry a message and an exit code; no other error reaches here
            if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # the help text, as `lowrank` alone should print
            else:
                from lowrank_cli.cli.render import error

                command = getattr(getattr(exc, "ctx", None), "command_path", "lowrank")
                error(f"{exc.format_message().replace('Value error, ', '')} (see {command} --help)")
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


class _PlainHelp(TyperCommand):
    """Arguments shown by their metavar alone (PATH), not typer's `{PATH}` and `PATH <path>`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                name = param.metavar or param.name.upper()
                param.display_type_rich = lambda ctx: None
                param._usage_display_name = lambda name=name: name


def _examples(*lines: str) -> str:
    """An epilog that click prints as written (\b stops it rewrapping the lines)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


app = typer.Typer(
    cls=_OneLineErrors,
    name="lowrank",
    help="The low-rank structure of neural-network weights in safetensors files.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain click help and usage errors: rich help imports rich.markdown, which doubles the start-up
    # time of `lowrank --help`, and a plain "Error: …" line reads better in CI logs.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _handle_errors(command):
    """Turn LowrankError and interruptions into one line on stderr (arguments spelled as flags) and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (LowrankError, KeyboardInterrupt) as exc:
            if os.environ.get("LOWRANK_DEBUG") == "1":
                raise
            if isinstance(exc, Terminated):
                exc = Interrupted("terminated (SIGTERM); no output was written")
                exc.exit_code = EXIT_TERMINATED
            elif isinstance(exc, KeyboardInterrupt):
                exc = Interrupted("interrupted; no output was written")
            from lowrank_cli.cli.render import error

            error(exc.worded(flag))
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _finish(report, as_json: bool, fail_above: float | None, *, as_csv: bool = False) -> None:
    """Print the report, then apply the --fail-above gate."""
    from lowrank_cli.cli.render import notice, print_csv, print_json, print_report

    for note in report.options.get("notes", []):
        notice(f"note: {note}")
    if as_csv:
        print_csv(report)
    else:
        print_json(report) if as_json else print_report(report)
    worst = report.exceeds(fail_above) if fail_above is not None else []
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


def _check_gate(fail_above: float | None) -> None:
    if fail_above is not None and not fail_above >= 0:
        raise UsageError(f"--fail-above must be ≥ 0, got {fail_above}")


@app.command(
    cls=_PlainHelp,
    short_help="Spectra and ranks; what a policy would save.",
    epilog=_examples(
        "lowrank analyze model.safetensors",
        "lowrank analyze hf-model/ --energy 0.99 --include '*.mlp.*'",
        "lowrank analyze model.safetensors --json --top 64 | jq '.tensors[0]'",
        "lowrank analyze hf-model/ --energy 0.99 --plot spectra.png",
        "lowrank analyze hf-model/ --csv > rows.csv",
    ),
)
@_handle_errors
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
    device: DeviceOption = Device.auto,
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
    as_json: Json = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print the rows as CSV on stdout instead of a table.")] = False,
) -> None:
    """Singular values, numerical and stable rank, energy ranks; with a policy, what it would save."""
    from lowrank_cli.cli.render import progress

    _check_gate(fail_above)
    if as_json and as_csv:
        raise UsageError("--json and --csv are two formats for the same rows; give one")
    if fail_above is not None and all(value is None for value in (rank, energy, max_error, budget)):
        raise UsageError(
            "--fail-above needs a rank policy (--rank, --energy, --max-error or --budget) to measure an error"
        )
    label = f"analyze {paths[0].name}" + (f" (+{len(paths) - 1})" if len(paths) > 1 else "")
    with progress(label) as tick:
        report = lowrank_cli.analyze(
            paths,
            rank=rank,
            energy=energy,
            max_error=max_error,
            budget=budget,
            include=include,
            exclude=exclude,
            rtol=rtol,
            device=device,
            top=top,
            progress=tick,
            calibration=calibration,
            other_model=other_model,
            plot=plot,
        )
    if plot is not None:
        from lowrank_cli.cli.render import notice

        notice(f"wrote {plot}")
    _finish(report, as_json, fail_above, as_csv=as_csv)


@app.command(
    cls=_PlainHelp,
    short_help="Store weight matrices as low-rank factors.",
    epilog=_examples(
        "lowrank compress model.safetensors --rank 64    # model.lowrank.safetensors",
        "lowrank compress hf-model/ --energy 0.99 -o out/  # a folder: out/",
        "lowrank compress model.safetensors --max-error 0.02 --dtype bfloat16",
        "lowrank compress hf-model/ --fidelity 0.95 --eval-text eval.txt",
    ),
)
@_handle_errors
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
    device: DeviceOption = Device.auto,
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
    eval_text: Annotated[
        Optional[Path],
        typer.Option("--eval-text", help="--fidelity: the UTF-8 text the fidelity is measured on.", metavar="FILE"),
    ] = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Write truncated-SVD factors NAME.B (m×r), NAME.A (r×n) wherever they save parameters."""
    from lowrank_cli.cli.render import progress

    _check_gate(fail_above)
    with progress(f"compress {path.name}") as tick:
        report = lowrank_cli.compress(
            path,
            output,
            rank=rank,
            energy=energy,
            max_error=max_error,
            budget=budget,
            dtype=dtype,
            method=method,
            seed=seed,
            device=device,
            include=include,
            exclude=exclude,
            rtol=rtol,
            force=force,
            progress=tick,
            calibration=calibration,
            other_model=other_model,
            fidelity=fidelity,
            eval_text=eval_text,
        )
    if fidelity is not None:
        from lowrank_cli.cli.render import notice

        found = report.options["fidelity"]
        for note in found["notes"]:
            notice(f"note: {note}")
        notice(
            f"fidelity {found['measured']:.4f} ≥ {fidelity:g} on {eval_text} ({found['metric']}), measured on the"
            f" model written, at --budget {found['budget']:g} after {found['evaluations']} evaluations; that text"
            " chose the budget, so run lowrank evaluate on another for a held-out figure"
        )
    if report.options.get("budget_objective") == "balanced":  # statistics from before sensitivity, or without it
        from lowrank_cli.cli.render import notice

        notice(
            f"note: {calibration} has no sensitivities, so --budget weighs the spectra alone;"
            " rerun lowrank calibrate (without --no-sensitivity) to spare the weights the model needs most"
        )
    _finish(report, as_json, fail_above)


@app.command(
    cls=_PlainHelp,
    short_help="Rebuild the dense checkpoint from factors.",
    epilog=_examples(
        "lowrank expand model.lowrank.safetensors   # model.dense.safetensors",
        "lowrank expand hf-model.lowrank/            # hf-model.dense/, loads with",
        "                                            # AutoModel.from_pretrained",
    ),
)
@_handle_errors
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
    from lowrank_cli.cli.render import progress

    with progress(f"expand {path.name}") as tick:
        report = lowrank_cli.expand(path, output, force=force, progress=tick)
    _finish(report, as_json, None)


@app.command(
    cls=_PlainHelp,
    short_help="A LoRA adapter (PEFT or kohya) from a fine-tune.",
    epilog=_examples(
        "lowrank extract base.safetensors tuned.safetensors -o adapter/ --rank 16",
        "lowrank extract base/ tuned/ -o adapter/ --max-error 0.1 --base-model org/m",
        "lowrank extract sd/ sd-tuned/ -o lora.safetensors --rank 16 --format kohya",
    ),
)
@_handle_errors
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
    budget: Budget = None,
    dtype: FactorDTypeOption = DType.keep,
    method: MethodOption = Method.auto,
    seed: Seed = 0,
    device: DeviceOption = Device.auto,
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
    from lowrank_cli.cli.render import progress

    _check_gate(fail_above)
    with progress(f"extract {tuned.name}") as tick:
        report = lowrank_cli.extract(
            base,
            tuned,
            output,
            rank=rank,
            energy=energy,
            max_error=max_error,
            budget=budget,
            dtype=dtype,
            method=method,
            seed=seed,
            device=device,
            embeddings=embeddings,
            conv=conv,
            base_model=base_model,
            lora_only=lora_only,
            include=include,
            exclude=exclude,
            force=force,
            progress=tick,
            calibration=calibration,
            other_model=other_model,
            format=format,
        )
    _finish(report, as_json, fail_above)


@app.command(
    cls=_PlainHelp,
    short_help="A LoRA adapter (PEFT or kohya) at new ranks.",
    epilog=_examples(
        "lowrank resize adapter-r128/ -o adapter-r16/ --rank 16",
        "lowrank resize style.safetensors -o style.small.safetensors --max-error 0.05",
        "lowrank resize adapter/ -o adapter.safetensors --format kohya",
    ),
)
@_handle_errors
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
    budget: Budget = None,
    dtype: FactorDTypeOption = DType.keep,
    device: DeviceOption = Device.auto,
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
    from lowrank_cli.cli.render import progress

    _check_gate(fail_above)
    with progress(f"resize {adapter.name}") as tick:
        report = lowrank_cli.resize(
            adapter, output, rank=rank, energy=energy, max_error=max_error, budget=budget, dtype=dtype,
            device=device, include=include, exclude=exclude, force=force, progress=tick, format=format,
        )  # fmt: skip
    _finish(report, as_json, fail_above)


@app.command(
    cls=_PlainHelp,
    short_help="Input statistics of each Linear, for --calibration.",
    epilog=_examples(
        "lowrank calibrate hf-model/ -o stats.safetensors --text calib.txt",
        "lowrank compress hf-model/ --rank 96 --calibration stats.safetensors",
    ),
)
@_handle_errors
def calibrate(
    model: Annotated[
        Path,
        typer.Argument(help="A Hugging Face model folder (config.json, safetensors, tokenizer).", metavar="MODEL"),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The statistics file to write.", metavar="STATS")],
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text to run the model over.", metavar="FILE")],
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.", metavar="N")] = 128,
    tokens: Annotated[
        int,
        typer.Option("--tokens", help="Tokens to average over, in samples taken evenly over the text.", metavar="N"),
    ] = 32768,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Samples to run at most.", metavar="N")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.", metavar="N")] = 8,
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
    ] = 2048,
    device: DeviceOption = Device.auto,
    force: Force = False,
) -> None:
    """Input statistics of each Linear, for --calibration."""
    from lowrank_cli.cli.render import notice, progress

    with progress(f"calibrate {model.name}", steps="batches, then weights probed") as tick:
        summary = lowrank_cli.calibrate(
            model, output, text=text, seq_len=seq_len, tokens=tokens, samples=samples, batch_size=batch_size,
            device=device, force=force, split=split, sensitivity=sensitivity, probe_tokens=probe_tokens,
            progress=tick,
        )  # fmt: skip
    for note in summary["notes"]:
        notice(f"note: {note}")
    line = f"{output}: {summary['weights']} weights, {summary['inputs']} distinct inputs, {summary['tokens']:,} tokens"
    if summary["tables"]:
        line += f", lookups of {summary['tables']} embedding table(s)"
    if sensitivity:
        line += f"; sensitivity of {summary['sensitivities']} weights on {summary['probe_tokens']:,} tokens"
    notice(line)


@app.command(
    cls=_PlainHelp,
    short_help="What a compressed model lost, on real text.",
    epilog=_examples(
        "lowrank evaluate hf-model/ hf-model.lowrank/ --text held-out.txt",
        "lowrank evaluate hf-model/ hf-model.lowrank/ --text eval.txt --json --fail-below 0.95",
    ),
)
@_handle_errors
def evaluate(
    reference: Annotated[
        Path, typer.Argument(help="The original Hugging Face model folder.", show_default=False, metavar="REFERENCE")
    ],
    candidate: Annotated[
        Path,
        typer.Argument(
            help="The model to measure: a compressed or dense folder, or a weights file.",
            show_default=False,
            metavar="CANDIDATE",
        ),
    ],
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text to run both models over.", metavar="FILE")],
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sample at most.", metavar="N")] = 128,
    tokens: Annotated[
        int, typer.Option("--tokens", help="Tokens to evaluate, in samples taken evenly over the text.", metavar="N")
    ] = 16384,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Samples to run at most.", metavar="N")] = None,
    split: SplitOption = Split.auto,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.", metavar="N")] = 16,
    fail_below: Annotated[
        Optional[float],
        typer.Option("--fail-below", help="Exit 3 if the fidelity is below F (a CI gate).", metavar="F"),
    ] = None,
    device: DeviceOption = Device.auto,
    as_json: Json = False,
) -> None:
    """Run REFERENCE and CANDIDATE over samples of a text and compare their outputs, by model kind.

    Encoders: cosine of pooled sentence embeddings. Causal and masked LMs: perplexity of both,
    KL(reference ‖ candidate) per token, top-1 agreement. fidelity is one number, 1.0 = identical.
    """
    from lowrank_cli.cli.render import notice, print_evaluation, print_json

    if fail_below is not None and not 0 <= fail_below <= 1:
        raise UsageError(f"--fail-below must be between 0 and 1, got {fail_below}")
    result = lowrank_cli.evaluate(
        reference, candidate, text=text, seq_len=seq_len, tokens=tokens, samples=samples, split=split,
        batch_size=batch_size, device=device,
    )  # fmt: skip
    for note in result.notes:
        notice(f"note: {note}")
    print_json(result) if as_json else print_evaluation(result)
    if fail_below is not None and result.fidelity < fail_below:
        notice(f"quality gate: fidelity {result.fidelity:.4f} is below {fail_below:g} ({result.metric})")
        raise typer.Exit(EXIT_QUALITY_GATE)


@app.command(
    cls=_PlainHelp,
    short_help="Train a compressed model's factors back toward the original.",
    epilog=_examples(
        "lowrank heal hf-model/ hf-model.lowrank/ --text train.txt -o hf-model.healed/",
        "lowrank heal hf-model/ hf-model.lowrank/ --text train.txt -o out/ --eval-text eval.txt",
    ),
)
@_handle_errors
def heal(
    reference: Annotated[
        Path, typer.Argument(help="The original Hugging Face model folder.", show_default=False, metavar="REFERENCE")
    ],
    compressed: Annotated[
        Path,
        typer.Argument(
            help="The lowrank-compressed folder or file made from it.", show_default=False, metavar="COMPRESSED"
        ),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Where the healed model goes.", metavar="OUT")],
    text: Annotated[Path, typer.Option("--text", help="UTF-8 training text.", metavar="FILE")],
    steps: Annotated[
        Optional[int], typer.Option("--steps", help="Optimizer steps (default: --epochs passes).", metavar="N")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the samples.", metavar="N")] = 1,
    lr: Annotated[
        float, typer.Option("--lr", help="AdamW learning rate, decaying linearly to 0.", metavar="LR")
    ] = 3e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per step.", metavar="N")] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sample at most.", metavar="N")] = 128,
    tokens: Annotated[
        int, typer.Option("--tokens", help="Training tokens, in samples taken evenly over the text.", metavar="N")
    ] = 262144,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Samples at most.", metavar="N")] = None,
    split: SplitOption = Split.auto,
    eval_text: Annotated[
        Optional[Path],
        typer.Option("--eval-text", help="Measure the fidelity before and after on this text.", metavar="FILE"),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the sample order; same seed, same run.", metavar="N")
    ] = 0,
    device: DeviceOption = Device.auto,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Distil COMPRESSED toward REFERENCE on a text: only the factors (and their layers' biases) train.

    OUT has the same ranks, names and format as COMPRESSED; each factor's weight error is measured
    again on what is written.
    """
    from lowrank_cli.cli.render import notice, print_json, print_report, training_progress

    with training_progress(f"heal {compressed.name}") as tick:
        report = lowrank_cli.heal(
            reference, compressed, output, text=text, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
            seq_len=seq_len, tokens=tokens, samples=samples, split=split, eval_text=eval_text, seed=seed,
            device=device, force=force, progress=tick,
        )  # fmt: skip
    for note in report.options.get("notes", []):
        notice(f"note: {note}")
    print_json(report) if as_json else print_report(report)
    healed = report.options["heal"]
    line = f"{healed['steps']} steps, final loss {healed['final_loss']:.4g}"
    if "fidelity_after" in healed:
        kind = "held out" if healed["held_out"] else "not held out: the training text"
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


def _terminate(signum, frame) -> None:
    raise Terminated  # unwinds through the writers, which remove their temporary files


def main() -> None:
    # OpenMP threads that spin between parallel regions starve each other on a busy or shared CPU
    # (a 3 s compress took minutes beside other jobs); sleeping costs nothing at this work's sizes.
    # Set before torch loads, which happens only inside a command; the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="lowrank")
    sys.exit(0)
