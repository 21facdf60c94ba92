"""Rich tables and progress for people; JSON for pipelines. Nothing here computes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lowrank_cli.report import Report, TensorReport

stdout = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200, soft_wrap=False)
stderr = Console(stderr=True)


def print_json(report: Report) -> None:
    sys.stdout.write(json.dumps(report.to_dict(), indent=2, allow_nan=False, ensure_ascii=False) + "\n")


def print_report(report: Report) -> None:
    if report.command == "analyze":
        table = _analyze_table(report)
    elif report.command == "compress":
        table = _compress_table(report)
    else:
        table = _expand_table(report)
    stdout.print(table)
    totals = report.totals
    if totals.bytes is not None and totals.bytes_after is not None:
        stdout.print(f"file size: {_bytes(totals.bytes)} → {_bytes(totals.bytes_after)}  wrote {report.output}")


def _analyze_table(report: Report) -> Table:
    with_policy = report.policy is not None
    table = Table(title=f"lowrank analyze {' '.join(report.sources)}", title_justify="left", show_footer=True)
    totals = report.totals
    table.add_column("tensor", footer="total", no_wrap=True)
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("params", justify="right", footer=f"{totals.params:,}")
    table.add_column("num. rank", justify="right")
    table.add_column("stable rank", justify="right")
    table.add_column("r@90%", justify="right")
    table.add_column("r@99%", justify="right")
    table.add_column("r@99.9%", justify="right")
    table.add_column("σ decay")
    if with_policy:
        table.add_column("rank", justify="right")
        table.add_column("rel. error", justify="right")
        table.add_column("params after", justify="right", footer=f"{totals.params_after:,}")
        table.add_column("saving", justify="right", footer=_percent(totals.savings))
    for t in report.tensors:
        if t.status == "skipped":
            row = [t.name, _shape(t), t.dtype, f"{t.params:,}", "", "", "", "", "", f"[dim]skipped: {t.reason}[/]"]
            row += ["", "", f"{t.params:,}", ""] if with_policy else []
        else:
            row = [
                t.name, _shape(t), t.dtype, f"{t.params:,}", str(t.numerical_rank), f"{t.stable_rank:.1f}",
                str(t.rank_90), str(t.rank_99), str(t.rank_999), t.sparkline or "",
            ]
            row += _policy_cells(t) if with_policy else []
        table.add_row(*row)
    return table


def _compress_table(report: Report) -> Table:
    totals = report.totals
    table = Table(title=f"lowrank compress {report.sources[0]} ({_policy(report)})", title_justify="left", show_footer=True)
    table.add_column("tensor", footer="total", no_wrap=True)
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("status")
    table.add_column("params", justify="right", footer=f"{totals.params:,}")
    table.add_column("rank", justify="right")
    table.add_column("rel. error", justify="right", footer=_error(totals.max_rel_error, "max "))
    table.add_column("params after", justify="right", footer=f"{totals.params_after:,}")
    table.add_column("saving", justify="right", footer=_percent(totals.savings))
    table.add_column("note")
    for t in report.tensors:
        rank, error, after, saving = _policy_cells(t) if t.rank is not None else ("", "", f"{t.params:,}", "")
        table.add_row(t.name, _shape(t), t.dtype, t.status, f"{t.params:,}", rank, error, after, saving, t.reason or "")
    return table


def _expand_table(report: Report) -> Table:
    table = Table(title=f"lowrank expand {report.sources[0]}", title_justify="left")
    for column in ("tensor", "shape", "dtype", "status", "rank", "rel. error (at compress)"):
        table.add_column(column, justify="right" if column in ("rank",) else "left", no_wrap=column == "tensor")
    for t in report.tensors:
        table.add_row(t.name, _shape(t), t.dtype, t.status, "" if t.rank is None else str(t.rank), _error(t.rel_error))
    return table


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
def progress(total_bytes: int, label: str) -> Iterator:
    """A progress bar over bytes on stderr when it is a terminal; yields the per-tensor callback."""
    if not stderr.is_terminal:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[tensors]} tensors"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=stderr, transient=True,
    )
    task = bar.add_task(label, total=total_bytes, tensors=0)

    def advance(entry) -> None:
        bar.update(task, advance=entry.nbytes, tensors=bar.tasks[0].fields["tensors"] + 1)

    with bar:
        yield advance
