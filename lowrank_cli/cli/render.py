"""Rich tables and progress for people; JSON for pipelines. Nothing here computes."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from lowrank_cli import Report, Status, TensorReport


@functools.cache
def _stdout() -> Console:
    """Made on first use, not at import: tests and callers set COLUMNS or redirect stdout first."""
    return Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)


@functools.cache
def _stderr() -> Console:
    return Console(stderr=True)


def print_json(report: Report) -> None:
    sys.stdout.write(json.dumps(report.to_dict(), indent=2, allow_nan=False, ensure_ascii=False) + "\n")


def print_report(report: Report) -> None:
    if report.command == "analyze":
        table = _analyze_table(report)
    elif report.command == "compress":
        table = _compress_table(report)
    elif report.command == "extract":
        table = _extract_table(report)
    else:
        table = _expand_table(report)
    # A narrow terminal wraps the long lines; cutting cells would hide numbers.
    natural = Console(width=100_000).measure(table).maximum
    stdout = _stdout()
    Console(width=max(stdout.width, natural)).print(table)
    totals = report.totals
    if totals.bytes is not None and totals.bytes_after is not None:
        line = f"file size: {_bytes(totals.bytes)} → {_bytes(totals.bytes_after)}  wrote {report.output}"
        stdout.print(Text(line), soft_wrap=True)
    elif report.command == "extract":
        stdout.print(Text(f"adapter: {_bytes(totals.bytes_after or 0)}  wrote {report.output}"), soft_wrap=True)


# (header, footer, kind): kind "name" (tensor names), "text", "number" or "note".
Column = tuple[str, str, str]


def error(message: str) -> None:
    """One line on stderr, however long: user text is never read as markup."""
    _stderr().print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True, highlight=False)


def notice(message: str) -> None:
    _stderr().print(Text(message), soft_wrap=True, highlight=False)


def _table(title: str, columns: list[Column], rows: list[list[str | Text]]) -> Table:
    """Every cell on one line; print_report widens the output rather than cut a number."""
    footer = any(foot for _, foot, _ in columns)
    table = Table(title=Text(title), title_justify="left", show_footer=footer)
    rows = [[cell if isinstance(cell, Text) else Text(cell) for cell in row] for row in rows]
    for i, (header, foot, kind) in enumerate(columns):
        width = max([row[i].cell_len for row in rows] + [len(foot)])
        justify = "right" if kind == "number" else "left"
        table.add_column(header, footer=foot, justify=justify, no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*row)
    return table


def _analyze_table(report: Report) -> Table:
    totals = report.totals
    columns = [
        ("tensor", "total", "name"),
        ("shape", "", "text"),
        ("dtype", "", "text"),
        ("params", f"{totals.params:,}", "number"),
        ("num. rank", "", "number"),
        ("stable rank", "", "number"),
        ("r@90%", "", "number"),
        ("r@99%", "", "number"),
        ("r@99.9%", "", "number"),
        ("σ decay", "", "note"),
    ]
    with_policy = report.policy is not None
    if with_policy:
        columns += [
            ("rank", "", "number"),
            ("rel. error", _error(totals.max_rel_error, "max "), "number"),
            ("params after", f"{totals.params_after:,}", "number"),
            ("saving", _percent(totals.savings), "number"),
        ]
    rows = []
    for t in report.tensors:
        if t.status == Status.skipped:
            row = [t.name, _shape(t), t.dtype, f"{t.params:,}", "", "", "", "", "", Text(t.reason or "", style="dim")]
            row += ["", "", f"{t.params:,}", ""] if with_policy else []
        else:
            row = [
                t.name,
                _shape(t),
                t.dtype,
                f"{t.params:,}",
                str(t.numerical_rank),
                f"{t.stable_rank:.1f}",
                str(t.rank_90),
                str(t.rank_99),
                str(t.rank_999),
                t.sparkline or "",
            ]
            row += _policy_cells(t) if with_policy else []
        rows.append(row)
    return _table(f"lowrank analyze {' '.join(report.sources)}", columns, rows)


def _compress_table(report: Report) -> Table:
    totals = report.totals
    columns = [
        ("tensor", "total", "name"),
        ("shape", "", "text"),
        ("dtype", "", "text"),
        ("status", "", "text"),
        ("params", f"{totals.params:,}", "number"),
        ("rank", "", "number"),
        ("rel. error", _error(totals.max_rel_error, "max "), "number"),
        ("params after", f"{totals.params_after:,}", "number"),
        ("saving", _percent(totals.savings), "number"),
        ("note", "", "note"),
    ]
    rows = []
    for t in report.tensors:
        cells = _policy_cells(t) if t.rank is not None else ["", "", f"{t.params:,}", ""]
        if t.status == Status.dense:
            cells[2:] = [f"{t.params:,}", ""]
        rows.append([t.name, _shape(t), t.dtype, t.status.value, f"{t.params:,}", *cells, t.reason or ""])
    return _table(f"lowrank compress {report.sources[0]} ({_policy(report)})", columns, rows)


def _extract_table(report: Report) -> Table:
    totals = report.totals
    columns = [
        ("module weight", "total", "name"),
        ("shape", "", "text"),
        ("dtype", "", "text"),
        ("status", "", "text"),
        ("rank", "", "number"),
        ("rel. error ΔW", _error(totals.max_rel_error, "max "), "number"),
        ("‖ΔW‖² kept", "", "number"),
        ("params", f"{totals.params:,}", "number"),
        ("adapter params", f"{totals.params_after:,}", "number"),
        ("note", "", "note"),
    ]
    rows = []
    for t in report.tensors:
        if t.status == Status.extracted:
            rows.append(
                [
                    t.name,
                    _shape(t),
                    t.dtype,
                    t.status.value,
                    str(t.rank),
                    _error(t.rel_error),
                    _percent(t.kept or 0.0),
                    f"{t.params:,}",
                    f"{t.params_after:,}",
                    "",
                ]
            )
        else:
            rows.append(
                [
                    t.name,
                    _shape(t),
                    t.dtype,
                    t.status.value,
                    "",
                    "",
                    "",
                    f"{t.params:,}",
                    f"{t.params_after:,}" if t.status == Status.carried else "",
                    Text(t.reason or "", style="dim"),
                ]
            )
    return _table(f"lowrank extract {' → '.join(report.sources)} ({_policy(report)})", columns, rows)


def _expand_table(report: Report) -> Table:
    columns = [
        ("tensor", "", "name"),
        ("shape", "", "text"),
        ("dtype", "", "text"),
        ("status", "", "text"),
        ("rank", "", "number"),
        ("rel. error at compress", "", "number"),
    ]
    rows = [
        [t.name, _shape(t), t.dtype, t.status.value, "" if t.rank is None else str(t.rank), _error(t.rel_error)]
        for t in report.tensors
    ]
    return _table(f"lowrank expand {report.sources[0]}", columns, rows)


def _policy_cells(t: TensorReport) -> list[str]:
    saving = 1 - t.params_after / t.params if t.params else 0.0
    return [str(t.rank), _error(t.rel_error), f"{t.params_after:,}", _percent(saving)]


def _policy(report: Report) -> str:
    policy = report.policy or {}
    return ", ".join(f"{key.replace('_', '-')} {value}" for key, value in policy.items())


def _shape(t: TensorReport) -> str:
    return "×".join(str(d) for d in t.shape) or "scalar"


def _error(value: float | None, prefix: str = "") -> str:
    return "" if value is None else f"{prefix}{value:.3g}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return str(count)


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar over bytes on stderr when it is a terminal; yields the library's progress callback."""
    stderr = _stderr()
    if not stderr.is_terminal:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[tensors]} tensors"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    task = bar.add_task(label, total=None, tensors=0)

    def advance(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, tensors=bar.tasks[0].fields["tensors"] + 1)

    with bar:
        yield advance
