"""Rich tables and progress for people; JSON for pipelines. Nothing here computes."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from lowrank_cli import Report, Status, TensorReport, Totals
from lowrank_cli.cli.options import flag
from lowrank_cli.errors import worded


def _stdout() -> Console:
    """Made at each print, not at import or once: tests and callers set COLUMNS or redirect stdout first."""
    return Console()


def _width() -> int | None:
    """The width to fit tables to: the terminal's, or COLUMNS; None (no limit) when piped into a file."""
    return None if not sys.stdout.isatty() and "COLUMNS" not in os.environ else _stdout().width


@functools.cache
def _stderr() -> Console:
    return Console(stderr=True)


def show(result, *, as_json: bool = False, as_csv: bool = False) -> None:
    """A command's result (a Report, an Evaluation, a CalibrationReport): its notes on stderr, then on
    stdout its JSON document, its rows as CSV, or its table."""
    for note in result.notes:
        notice(f"note: {worded(note, flag)}")  # the library's arguments, spelled as flags
    if as_json:
        print_json(result)
    elif as_csv:
        print_csv(result)
    elif result.command == "evaluate":
        print_evaluation(result)
    elif result.command == "calibrate":
        print_calibration(result)
    else:
        print_report(result)


def print_json(report) -> None:
    """Any result with to_dict() (a Report, an Evaluation, a CalibrationReport) as one JSON document."""
    document = report.to_dict()
    for holder in (document, document.get("options") or {}):  # notes: an Evaluation's own, a Report's in options
        if isinstance(holder.get("notes"), list):
            holder["notes"] = [worded(note, flag) for note in holder["notes"]]
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False) + "\n")


# every row field but the two that are no single value: the σ list (in --json) and the sparkline
CSV_FIELDS = [f.name for f in dataclasses.fields(TensorReport) if f.name not in ("singular_values", "sparkline")]


def print_csv(report: Report) -> None:
    """One CSV row per tensor (a header first): CSV_FIELDS, the shape as 384x1536, an empty cell for null,
    a text cell a spreadsheet would read as a formula quoted (_inert)."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    # csv quotes a CR only where it is the line terminator: a row with one in a name quotes all its text
    quoted = csv.writer(sys.stdout, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(CSV_FIELDS)
    for row in report.to_dict()["tensors"]:
        row["shape"] = "x".join(str(d) for d in row["shape"])
        cells = ["" if row[name] is None else _inert(row[name]) for name in CSV_FIELDS]
        (quoted if any(isinstance(cell, str) and "\r" in cell for cell in cells) else writer).writerow(cells)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as a formula (OWASP, CSV injection)


def _inert(value: object) -> object:
    """A text cell (a tensor name, a path, a reason) that starts like a formula, with a ' before it, as OWASP
    recommends: a checkpoint's tensor named '=cmd|...' must not run in the spreadsheet that opens the CSV.
    Numbers are written as they are: -0.5 is a number, not a formula."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def print_report(report: Report) -> None:
    if report.command == "analyze":
        title, columns, rows = _analyze_table(report)
    elif report.command == "compress":
        title, columns, rows = _compress_table(report)
    elif report.command == "extract":
        title, columns, rows = _extract_table(report)
    elif report.command == "heal":
        title, columns, rows = _heal_table(report)
    elif report.command == "resize":
        title, columns, rows = _resize_table(report)
    else:
        title, columns, rows = _expand_table(report)
    width = _width()
    table = fit_table(title, columns, rows, width)
    Console(width=width or 100_000).print(table)
    lines = []
    if "note" not in [column.header for column in table.columns]:  # a narrow terminal: why each stays dense
        lines += [f"{t.name}: dense, {t.reason}" for t in report.tensors if t.status == Status.dense and t.reason]
    totals = report.totals
    if report.command == "extract":
        share = f" ({_percent(totals.params_after / totals.params)} of the adapted tensors)" if totals.params else ""
        lines.append(f"adapter: {_bytes(totals.bytes_after or 0)}, {totals.params_after:,} params{share}")
        lines.append(f"wrote {report.output}")
    elif report.command == "analyze" and report.options.get("diff") and report.policy is not None:
        if totals.params:
            share = f" ({_percent(totals.params_after / totals.params)} of the changed matrices)"
            lines.append(f"lowrank extract with this policy would need {totals.params_after:,} adapter params{share}")
        else:  # no matrix would be adapted: a note says why
            lines.append("lowrank extract with this policy would write no adapter")
    elif totals.bytes is not None and totals.bytes_after is not None:
        lines.append(f"file size: {_bytes(totals.bytes)} → {_bytes(totals.bytes_after)}  wrote {report.output}")
    stdout = Console(width=width or 100_000)  # long paths fold at the terminal's edge, or stay whole in a file
    for line in lines:
        stdout.print(Text(line), overflow="fold", highlight=False)


def print_evaluation(evaluation) -> None:
    """evaluate's figures as a two-column table, the fidelity first."""
    rows = [("fidelity", f"{evaluation.fidelity:.4f}")]
    if evaluation.kind == "encoder":
        rows += [
            ("cosine mean", f"{evaluation.cosine_mean:.4f}"),
            ("cosine 5th percentile", f"{evaluation.cosine_p5:.4f}"),
            ("cosine min", f"{evaluation.cosine_min:.4f}"),
        ]
    else:
        if evaluation.perplexity_reference is not None:  # an LM's, of the true tokens; a classifier has none
            rows += [
                ("perplexity reference", f"{evaluation.perplexity_reference:.3f}"),
                ("perplexity candidate", f"{evaluation.perplexity_candidate:.3f}"),
            ]
        per = "sample" if evaluation.kind == "sequence-classifier" else "token"
        rows += [
            (f"KL(ref ‖ cand) per {per}", f"{evaluation.kl_mean:.4g} nats"),
            ("top-1 agreement", _percent(evaluation.top1_agreement)),
            ("positions compared" if per == "token" else "samples compared", f"{evaluation.positions:,}"),
        ]
    held = {True: "yes", False: "no: the candidate was made with it (see the note)", None: "not known"}
    held = held[evaluation.held_out]
    rows += [
        ("samples", f"{evaluation.samples:,} ({evaluation.split}), {evaluation.tokens:,} tokens"),
        ("held out", held),
    ]
    _print_figures(f"{evaluation.kind}: {evaluation.metric}", rows)


def print_calibration(report) -> None:
    """calibrate's figures as a two-column table: what the statistics were made of, and where they went."""
    rows = [
        ("samples", f"{report.samples:,} ({report.split}), {report.tokens:,} tokens"),
        ("weights", f"{report.weights:,}"),
        ("distinct inputs", f"{report.inputs:,}"),
    ]
    if report.tables:
        rows.append(("embedding tables (lookups)", f"{report.tables:,}"))
    if report.sensitivities is not None:
        rows.append(("sensitivities", f"{report.sensitivities:,} weights on {report.probe_tokens:,} tokens"))
    rows.append(("wrote", report.output))
    _print_figures(f"calibrate {report.model}", rows)


def _print_figures(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=Text(title), title_justify="left", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, Text(value))
    Console(width=_width() or 100_000).print(table)


def error(message: str) -> None:
    """One line on stderr, however long: user text is never read as markup."""
    _stderr().print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True, highlight=False)


def notice(message: str) -> None:
    _stderr().print(Text(message), soft_wrap=True, highlight=False)


@dataclass(frozen=True)
class Column:
    """A table column; on a narrow terminal the columns with the lowest `keep` go first (ALWAYS never)."""

    header: str
    kind: str = "text"  # "name" (tensor names), "text", "number" or "note" (wraps when narrow)
    keep: int = 9
    footer: str = ""


ALWAYS = 9
_NOTE_WIDTH = 24  # a note wraps at this width on a narrow terminal
_NAME_WIDTH = 16  # names are shortened to no less than this


def fit_table(title: str, columns: list[Column], rows: list[list[str | Text]], width: int | None) -> Table:
    """The table in `width` columns: whole if it fits; else names lose their common prefix, then the
    least needed columns go, then names are shortened (_shorten). --json keeps every column."""
    rows = [[cell if isinstance(cell, Text) else Text(cell) for cell in row] for row in rows]
    table = _table(title, columns, rows)
    if width is None or _measure(table) <= width:
        return table
    prefix = _common_prefix([row[0].plain for row in rows])
    if prefix:
        title = f"{title}; names after {prefix}"
        rows = [[Text(row[0].plain[len(prefix) :]), *row[1:]] for row in rows]
    kept = list(range(len(columns)))
    droppable = sorted((i for i, c in enumerate(columns) if c.keep < ALWAYS), key=lambda i: (columns[i].keep, -i))
    while True:
        table = _table(title, [columns[i] for i in kept], [[row[i] for i in kept] for row in rows], narrow=True)
        excess = _measure(table) - width
        if excess <= 0:
            return table
        if not droppable:
            break
        kept.remove(droppable.pop(0))
    longest = max([row[0].cell_len for row in rows] + [len(columns[0].header)])
    names = max(_NAME_WIDTH, longest - excess)
    shared = Counter(part for row in rows for part in set(row[0].plain.split(".")))
    rows = [[_shorten(row[0], names, shared), *row[1:]] for row in rows]
    return _table(title, [columns[i] for i in kept], [[row[i] for i in kept] for row in rows], narrow=True)


def _table(title: str, columns: list[Column], rows: list[list[Text]], *, narrow: bool = False) -> Table:
    """Every cell on one line (a note wraps when narrow): no number is ever cut."""
    footer = any(c.footer for c in columns)
    table = Table(title=Text(title), title_justify="left", show_footer=footer)
    for i, column in enumerate(columns):
        wraps = narrow and column.kind == "note"
        width = max([row[i].cell_len for row in rows] + [len(column.footer)])
        table.add_column(
            column.header,
            footer=column.footer,
            justify="right" if column.kind == "number" else "left",
            no_wrap=not wraps,
            min_width=min(width, _NOTE_WIDTH) if wraps else width,
            max_width=_NOTE_WIDTH if wraps else None,
        )
    for row in rows:
        table.add_row(*row)
    return table


def _measure(table: Table) -> int:
    return Console(width=100_000).measure(table).maximum


def _common_prefix(names: list[str]) -> str:
    """The longest prefix ending in "." shared by every name, when there are two names or more."""
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    return prefix[: prefix.rfind(".") + 1]


def _shorten(name: Text, width: int, shared: Counter) -> Text:
    """The name in `width` cells, keeping what tells rows apart: its numbers (the layer) always, and
    the parts fewest rows share (q_proj, down_proj) longest; `weight` or `self_attn` go first, each
    run of parts left out shown as "…". Cut from the left only when the numbers alone do not fit."""
    plain = name.plain
    if len(plain) <= width:
        return name
    parts = plain.split(".")
    last = len(parts) - 1
    order = sorted(
        (i for i, part in enumerate(parts) if not part.isdigit()), key=lambda i: (-shared[parts[i]], i == last, i)
    )
    kept = [True] * len(parts)
    for i in order:
        kept[i] = False
        text = _elided(parts, kept)
        if len(text) <= width:
            return Text(text)
    return Text("…" + plain[len(plain) - width + 1 :])


def _elided(parts: list[str], kept: list[bool]) -> str:
    pieces: list[str] = []
    for part, keep in zip(parts, kept, strict=True):
        if keep:
            pieces.append(part)
        elif not pieces or pieces[-1] != "…":
            pieces.append("…")
    return ".".join(pieces).replace(".….", ".…").replace("….", "…")


def _analyze_table(report: Report) -> tuple[str, list[Column], list[list[str | Text]]]:
    totals = report.totals
    with_policy = report.policy is not None
    calibrated = totals.max_output_error is not None
    diff = bool(report.options.get("diff"))  # rows of ΔW = TUNED − BASE (analyze --diff)
    columns = [
        Column("tensor", "name", footer="total"),
        Column("shape", keep=4),
        Column("dtype", keep=1),
        Column("params", "number", keep=3, footer=f"{totals.params:,}"),
        Column("num. rank", "number", keep=5 if with_policy else ALWAYS),
        Column("stable rank", "number", keep=2 if with_policy else 5),
        Column("r@90%", "number", keep=2 if with_policy else 4),
        Column("r@99%", "number", keep=6 if with_policy else ALWAYS),
        Column("r@99.9%", "number", keep=2 if with_policy else 4),
        Column("α", "number", keep=1 if with_policy else 3),  # docs/analyze-metrics.md
        Column("σ decay", keep=1 if with_policy else 2),
    ]
    if with_policy:
        columns += [
            Column("rank", "number"),
            Column("rel. error", "number", footer=_error(totals.max_rel_error, "max ")),
            *_output_column(totals),
            Column(
                "adapter params" if diff else "params after",
                "number",
                keep=6 if diff else 2,
                footer=f"{totals.params_after:,}",
            ),
            Column("saving", "number", footer=_percent(totals.savings)),
        ]
    columns.append(Column("note", "note", keep=5))
    rows = []
    for t in report.tensors:
        if t.numerical_rank is None:  # no spectrum: not a float matrix
            row = [t.name, _shape(t), t.dtype, f"{t.params:,}", "", "", "", "", "", "", ""]
        else:
            spectrum = [str(t.numerical_rank), f"{t.stable_rank:.1f}", str(t.rank_90), str(t.rank_99), str(t.rank_999)]
            alpha = "" if t.alpha is None else f"{t.alpha:.2f}"
            row = [t.name, _shape(t), t.dtype, f"{t.params:,}", *spectrum, alpha, t.sparkline or ""]
        if with_policy and t.status == Status.skipped:  # --diff: a matrix in no adapter has no adapter params
            row += ["", "", *([""] if calibrated else []), "" if diff else f"{t.params:,}", ""]
        elif with_policy:
            row += _policy_cells(t, calibrated)
        rows.append([*row, Text(t.reason or "", style="dim")])
    title = f"lowrank analyze {' '.join(report.sources)}"
    if diff:
        title = f"lowrank analyze --diff: ΔW = {report.sources[1]} − {report.sources[0]}"
    if report.options and report.options.get("calibration"):  # every spectrum column is then of W·S
        title += f" (spectra of W·S, --calibration {report.options['calibration']})"
    return title, columns, rows


def _compress_table(report: Report) -> tuple[str, list[Column], list[list[str | Text]]]:
    totals = report.totals
    columns = [
        Column("tensor", "name", footer="total"),
        Column("shape", keep=4),
        Column("dtype", keep=1),
        Column("status"),
        Column("params", "number", keep=3, footer=f"{totals.params:,}"),
        Column("rank", "number"),
        Column("rel. error", "number", footer=_error(totals.max_rel_error, "max ")),
        *_output_column(totals),
        Column("params after", "number", keep=2, footer=f"{totals.params_after:,}"),
        Column("saving", "number", footer=_percent(totals.savings)),
        Column("note", "note", keep=5),
    ]
    calibrated = totals.max_output_error is not None
    rows = []
    for t in report.tensors:
        blank = ["", _error(t.rel_error), *([""] if calibrated else []), f"{t.params:,}", ""]
        cells = _policy_cells(t, calibrated) if t.rank is not None else blank
        rows.append([t.name, _shape(t), t.dtype, t.status.value, f"{t.params:,}", *cells, t.reason or ""])
    return f"lowrank compress {report.sources[0]} ({_policy(report)})", columns, rows


def _extract_table(report: Report) -> tuple[str, list[Column], list[list[str | Text]]]:
    totals = report.totals
    columns = [
        Column("module weight", "name", footer="total"),
        Column("shape", keep=3),
        Column("dtype", keep=1),
        Column("status"),
        Column("rank", "number"),
        Column("rel. error ΔW", "number", footer=_error(totals.max_rel_error, "max ")),
        *_output_column(totals),
        Column("‖ΔW‖² kept", "number", keep=4),
        Column("params", "number", keep=2, footer=f"{totals.params:,}"),
        Column("adapter params", "number", keep=2, footer=f"{totals.params_after:,}"),
        Column("note", "note", keep=5),
    ]
    output = totals.max_output_error is not None
    rows = []
    for t in report.tensors:
        head = [t.name, _shape(t), t.dtype, t.status.value]
        if t.status == Status.extracted:
            errors = [_error(t.rel_error), *([_error(t.output_error)] if output else [])]
            cells = [str(t.rank), *errors, _percent(t.kept or 0.0), f"{t.params:,}", f"{t.params_after:,}"]
            rows.append([*head, *cells, ""])
        else:
            after = f"{t.params_after:,}" if t.status == Status.carried else ""
            blank = ["", "", *([""] if output else []), ""]
            rows.append([*head, *blank, f"{t.params:,}", after, Text(t.reason or "", style="dim")])
    return f"lowrank extract {' → '.join(report.sources)} ({_policy(report)})", columns, rows


def _resize_table(report: Report) -> tuple[str, list[Column], list[list[str | Text]]]:
    totals = report.totals
    columns = [
        Column("module", "name", footer="total"),
        Column("shape ΔW", keep=3),
        Column("dtype", keep=1),
        Column("status"),
        Column("rank before", "number"),
        Column("rank", "number"),
        Column("rel. error ΔW", "number", footer=_error(totals.max_rel_error, "max ")),
        Column("params", "number", keep=2, footer=f"{totals.params:,}"),
        Column("params after", "number", keep=2, footer=f"{totals.params_after:,}"),
        Column("note", "note", keep=5),
    ]
    rows = [
        [
            t.name,
            _shape(t),
            t.dtype,
            t.status.value,
            str(t.rank_before),
            str(t.rank),
            _error(t.rel_error),
            f"{t.params:,}",
            f"{t.params_after:,}",
            Text(t.reason or "", style="dim"),
        ]  # fmt: skip
        for t in report.tensors
    ]
    source, target = (report.options or {}).get("from"), (report.options or {}).get("format")
    about = "; ".join(part for part in (_policy(report), f"{source} → {target}" if source != target else "") if part)
    return f"lowrank resize {report.sources[0]} ({about})", columns, rows


def _heal_table(report: Report) -> tuple[str, list[Column], list[list[str | Text]]]:
    columns = [
        Column("tensor", "name", keep=ALWAYS),
        Column("rank", "number", keep=6),
        Column("rel. error before", "number", keep=4),
        Column("rel. error after", "number", keep=ALWAYS, footer=_error(report.totals.max_rel_error, "max ")),
    ]
    rows = [
        [t.name, str(t.rank), (t.reason or "").removeprefix("rel. error before healing "), _error(t.rel_error)]
        for t in report.tensors
    ]
    return f"heal → {report.output}", columns, rows


def _expand_table(report: Report) -> tuple[str, list[Column], list[list[str | Text]]]:
    columns = [
        Column("tensor", "name"),
        Column("shape", keep=3),
        Column("dtype", keep=1),
        Column("status"),
        Column("rank", "number"),
        Column("rel. error at compress", "number"),
    ]
    rows = [
        [t.name, _shape(t), t.dtype, t.status.value, "" if t.rank is None else str(t.rank), _error(t.rel_error)]
        for t in report.tensors
    ]
    return f"lowrank expand {report.sources[0]}", columns, rows


def _policy_cells(t: TensorReport, calibrated: bool = False) -> list[str]:
    """rank, rel. error, [output error,] params after, saving; a dense tensor says so instead of "error 0"."""
    output = [_error(t.output_error)] if calibrated else []
    if t.status == Status.dense:
        error = _error(t.rel_error) if t.rel_error else ""  # cast: --dtype
        return ["dense", error, *output, f"{t.params:,}", _percent(0.0)]
    saving = 1 - t.params_after / t.params if t.params else 0.0
    return [str(t.rank), _error(t.rel_error), *output, f"{t.params_after:,}", _percent(saving)]


def _output_column(totals: Totals) -> list[Column]:
    """The output-error column (‖(W − BA)X‖ / ‖WX‖), shown when calibration statistics were given."""
    if totals.max_output_error is None:
        return []
    return [Column("output error", "number", footer=_error(totals.max_output_error, "max "))]


def _policy(report: Report) -> str:
    policy = report.policy or {}
    return ", ".join(f"{key.replace('_', '-')} {value}" for key, value in policy.items())


def _shape(t: TensorReport) -> str:
    return "×".join(str(d) for d in t.shape) or "scalar"


def _error(value: float | None, prefix: str = "") -> str:
    """Relative errors in one fixed-width format, 1.95e-07 as 7.42e-01, so a column reads at a glance."""
    return "" if value is None else f"{prefix}{value:.2e}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _bytes(count: int) -> str:
    """Binary units (KiB, MiB, GiB), as the progress bar counts."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return str(count)


@contextmanager
def progress(label: str, steps: str | None = None) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr when it is a terminal; yields the library's progress callback.

    Over bytes (and tensors done), or with `steps` over counted steps ("batches and weights").
    """
    counts = [MofNCompleteColumn(), TextColumn(steps)] if steps else [DownloadColumn(binary_units=True)]
    columns = [*counts, *([] if steps else [TextColumn("{task.fields[tensors]} tensors")])]
    with _bar(label, columns, tensors=0) as (bar, task):
        if bar is None:
            yield None
            return

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, tensors=bar.tasks[0].fields["tensors"] + 1)

        yield advance


@contextmanager
def training_progress(label: str) -> Iterator[Callable[[int, int, float], None] | None]:
    """A bar over optimizer steps with the running loss, on stderr when it is a terminal."""
    with _bar(label, [MofNCompleteColumn(), TextColumn("steps, loss {task.fields[loss]}")], loss="…") as (bar, task):
        if bar is None:
            yield None
            return

        def advance(step: int, steps: int, loss: float) -> None:
            bar.update(task, completed=step, total=steps, loss=f"{loss:.4g}")

        yield advance


@contextmanager
def _bar(label: str, columns: list, **fields) -> Iterator[tuple[Progress | None, object]]:
    """A transient rich bar on stderr (description, bar, `columns`, times), or (None, None) when stderr
    is not a terminal."""
    stderr = _stderr()
    if not stderr.is_terminal:
        yield None, None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    task = bar.add_task(label, total=None, **fields)
    with bar:
        yield bar, task
