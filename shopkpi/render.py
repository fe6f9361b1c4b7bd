"""Tables for people (rich). Tools use ``--json`` instead.

Every value from files or from AWS goes through :func:`literal`: rich reads a plain ``str`` as markup, so a category
named ``[/x]`` would crash the command and ``[link=http://evil.example]Books`` would print a hyperlink to another site.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from processor.model import CategoryKpi, MergeResult, OrderKpi, ValidationResult

if TYPE_CHECKING:
    from orchestration.operations import ExecutionRun, FileOutcome, ReprocessResult, WaitStatus
    from processor.aws.dynamo import FileRecord

# Piped into a file or another tool, a table keeps its full width: rich's default of 80 columns would cut cells
# ("total_ord…"). On a terminal, the terminal's width.
console = Console(width=None if sys.stdout.isatty() else 1000)

# Text is neither parsed for markup nor for emoji codes, but it passes ESC and the other control characters through
# to the terminal as they are; shown escaped, a name cannot move the cursor or open a hyperlink either.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def literal(value: object) -> Text:
    """``value`` as text rich prints exactly as it is (no markup, no emoji codes, no control characters)."""
    return Text(str(value).translate(_CONTROLS))


def _add_row(table: Table, *values: object, style: str | None = None) -> None:
    table.add_row(*(literal(v) for v in values), style=style)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items())


def _reasons(file_reason: str | None, by_reason: dict[str, int] | None) -> str:
    """A rejected file's reason, else its rejected rows by reason."""
    return file_reason or _counts(by_reason or {})


def print_files(files: Sequence[ValidationResult], merge: MergeResult | None = None) -> None:
    if not files:  # every file given was recognised: an empty table would read as if nothing had been found
        console.print(
            literal(
                "Files: nothing new to validate (each file given was staged before in this staging directory: "
                "the same path, size and modification time)"
            )
        )
    else:
        _print_file_table(files)
    if merge is not None:
        waiting = _counts({**merge.pending, **merge.late_rejects}) or "none"
        console.print(
            literal(
                f"merge: generation {merge.generation}, {merge.files_merged} files applied, "
                f"{merge.groups_recomputed} orders recomputed, {len(merge.dates)} dates changed, "
                f"{merge.removed_kpis} KPI items removed, conflicts {merge.conflicts}, waiting/rejected: {waiting}"
            )
        )


def _print_file_table(files: Sequence[ValidationResult]) -> None:
    t = Table(title="Files", title_justify="left")
    for col in ("file", "dataset", "outcome", "rows", "rejected", "reasons"):
        t.add_column(col, justify="right" if col in ("rows", "rejected") else "left")
    for f in files:
        reasons = _reasons(f.reason, f.rejects_by_reason)
        style = "red" if f.outcome == "rejected" else None
        _add_row(
            t,
            f.source.rsplit("/", 1)[-1],
            f.dataset or "?",
            f.outcome,
            str(f.rows),
            str(f.rejected_rows),
            reasons,
            style=style,
        )
    console.print(t)


#: Rejected rows shown per file after ``shopkpi process``'s table; the rest are in the rejected-rows CSV.
REJECTED_SHOWN = 3


def print_rejected_rows(
    files: Sequence[ValidationResult], first_rows: dict[str, list[dict[str, str]]], kept: Path | None
) -> None:
    """The first rejected rows of each file, with their line, rule and column, and where all of them are kept
    (``kept``: the staging directory, or None when it was a temporary one that is gone)."""
    from processor.pipeline import rejects_key  # the processor's pipeline is imported only by the commands using it

    with_rows = [f for f in files if f.rejected_rows and first_rows.get(f.file_id)]
    if not with_rows:
        return
    console.print(literal(f"Rejected rows (the first {REJECTED_SHOWN} of each file; the header is line 1):"))
    for f in with_rows:
        name = f.source.rsplit("/", 1)[-1]
        for row in first_rows[f.file_id]:
            column = row.get("_column") or ""
            value = row.get(column) if column else None
            detail = f", column {column}" + (f" = {value!r}" if value else " (empty)") if column else ""
            console.print(literal(f"  {name} line {row.get('_line', '?')}: {row.get('_reason', '?')}{detail}"))
        if kept is not None:
            console.print(literal(f"  all {f.rejected_rows} of {name}: {kept / rejects_key(f.file_id)}"))
    if kept is None:
        console.print(
            literal("  to keep every rejected row with its line, column and rule: run again with --staging DIR")
        )


def print_kpis(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi]) -> None:
    print_daily(daily)
    print_category(category)


def print_daily(daily: Sequence[OrderKpi]) -> None:
    t = Table(title="Order KPIs per day", title_justify="left")
    for col in (
        "order_date",
        "total_orders",
        "total_revenue",
        "total_items_sold",
        "return_rate %",
        "customers",
    ):
        t.add_column(col, justify="left" if col == "order_date" else "right")
    for k in daily:
        _add_row(
            t,
            k.order_date,
            f"{k.total_orders:,}",
            f"{k.total_revenue:,}",
            f"{k.total_items_sold:,}",
            str(k.return_rate),
            f"{k.unique_customers:,}",
        )
    console.print(t)


def print_category(category: Sequence[CategoryKpi]) -> None:
    c = Table(title="Category KPIs per day", title_justify="left")
    for col in ("category", "order_date", "daily_revenue", "avg_order_value", "avg_return_rate %"):
        c.add_column(col, justify="left" if col in ("category", "order_date") else "right")
    for ck in category:
        _add_row(
            c, ck.category, ck.order_date, f"{ck.daily_revenue:,}", f"{ck.avg_order_value:,}", str(ck.avg_return_rate)
        )
    console.print(c)


def _file_cells(f: FileRecord) -> tuple[str, str, str]:
    """A ledger record's rows, rejected rows and reasons (its failure's error code when it failed)."""
    rows = "" if f.rows is None else str(f.rows)
    rejected = "" if f.rejected_rows is None else str(f.rejected_rows)
    return rows, rejected, _reasons(f.reason or f.error_code, f.rejects_by_reason)


def print_outcomes(results: Sequence[FileOutcome]) -> None:
    """The rows of ``ingest --wait`` (:func:`orchestration.operations.outcomes`): each landed file with its ledger
    record's outcome, rows and reasons."""
    from processor.aws.dynamo import FileRecord

    t = Table(title="File outcomes", title_justify="left")
    for col in ("file", "outcome", "rows", "rejected", "reason"):
        t.add_column(col, justify="right" if col in ("rows", "rejected") else "left")
    for r in results:
        style = "red" if r.outcome != "accepted" else None
        _add_row(t, r.file, r.outcome, *_file_cells(r.record or FileRecord()), style=style)
    console.print(t)


def print_failed_executions(failed: Sequence[dict[str, Any]]) -> None:
    """Executions that did not succeed, with their error and the start of their cause (the full cause is in
    ``aws stepfunctions describe-execution`` and the alert)."""
    if not failed:
        return
    t = Table(title="Failed executions", title_justify="left")
    for col in ("name", "status", "error", "cause"):
        t.add_column(col, overflow="fold")
    for e in failed:
        _add_row(
            t, str(e["name"]), str(e["status"]), str(e.get("error") or ""), str(e.get("cause") or "")[:300], style="red"
        )
    console.print(t)


def _blank(value: object | None) -> str:
    return "" if value is None else str(value)


def print_executions(executions: Sequence[ExecutionRun]) -> None:
    """``runs``: each execution's times, duration, files by outcome and what its merge applied."""
    t = Table(title="Recent executions", title_justify="left")
    for col in ("name", "status", "started", "stopped", "seconds", "accepted", "rejected", "failed", "merged", "dates"):
        t.add_column(col, justify="left" if col in ("name", "status", "started", "stopped") else "right")
    for e in executions:
        style = "red" if e.status not in ("SUCCEEDED", "RUNNING") else None
        _add_row(
            t,
            e.name,
            e.status,
            (e.started_at or "")[:19],
            (e.stopped_at or "")[:19],
            "" if e.seconds is None else f"{e.seconds:.1f}",
            e.accepted,
            e.rejected,
            e.failed,
            _blank(e.files_merged),
            _blank(e.dates),
            style=style,
        )
    console.print(t)


def print_ledger(files: Sequence[FileRecord], title: str) -> None:
    t = Table(title=title, title_justify="left")
    for col in ("updated", "source", "dataset", "outcome", "rows", "rejected", "reasons"):
        t.add_column(col, justify="right" if col in ("rows", "rejected") else "left")
    for f in files:
        source = (f.source or "").rsplit("/", 1)[-1]
        _add_row(t, (f.updated_at or "")[:19], source, f.dataset or "?", str(f.outcome), *_file_cells(f))
    console.print(t)


def print_rejects(files: Sequence[FileRecord]) -> None:
    """``rejects``: each file with rejected rows (rejected whole, failed, or accepted without some rows), its rows
    by reason code, its file-level message, and where its rejected rows and its report are kept."""
    t = Table(title="Files with rejected rows", title_justify="left")
    for col in ("updated", "source", "outcome", "rows", "rejected", "reasons", "message", "rejected rows", "report"):
        numeric = col in ("rows", "rejected")
        t.add_column(col, justify="right" if numeric else "left", overflow="fold")
    for f in files:
        source = (f.source or "").rsplit("/", 1)[-1]
        rows, rejected, reasons = _file_cells(f)
        # A whole file's reason code is its own cell; its rows by reason follow it.
        by_reason = _counts(f.rejects_by_reason or {})
        reasons = f"{reasons}: {by_reason}" if by_reason and reasons != by_reason else reasons
        message = f.message or f.error_detail or ""
        style = None if f.outcome == "accepted" else "red"
        _add_row(
            t,
            (f.updated_at or "")[:19],
            source,
            str(f.outcome),
            rows,
            rejected,
            reasons,
            message,
            _blank(f.rejects),
            _blank(f.report),
            style=style,
        )
    console.print(t)


def print_reprocess(result: ReprocessResult) -> None:
    """What a reprocess changed: its status and duration, then the KPI items it rewrote, added and removed."""
    c = result.changes
    took = "" if result.seconds is None else f" in {result.seconds:.1f} s"
    merged = "" if result.files_merged is None else f"; its merge also applied {result.files_merged} new files"
    console.print(literal(f"reprocess {result.execution}: {result.status.lower()}{took}{merged}"))
    if not c.changed:
        console.print(literal(f"nothing changed: the {c.unchanged} KPI items of the range already held these values"))
        return
    t = Table(title="KPI items changed", title_justify="left")
    for col in ("table", "rewritten", "added", "removed"):
        t.add_column(col, justify="left" if col == "table" else "right")
    for name, moved in (("order KPIs (per day)", c.daily), ("category KPIs (per day)", c.category)):
        _add_row(t, name, moved.rewritten, moved.added, moved.removed)
    console.print(t)
    shown = ", ".join(c.dates[:10]) + (f" (+{len(c.dates) - 10} more)" if len(c.dates) > 10 else "")
    console.print(literal(f"{len(c.dates)} dates changed: {shown}; {c.unchanged} items unchanged"))


class WaitProgress:
    """Shows the polls of a wait (:class:`~orchestration.operations.WaitStatus`) on stderr, never on stdout, which
    holds the answer (perhaps ``--json``). On a terminal, a live display: files landed, validated and merged, the
    executions running and the time elapsed. Elsewhere (a CI log, a pipe), one plain line every ``every_s`` seconds
    of the wait and one at the end: a log shows life without a line per poll."""

    def __init__(self, what: str, *, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self._next_s = 0.0
        self._last: WaitStatus | None = None
        self._shown = True  # the last status was printed (the plain mode prints the end only if not)
        self._progress: Progress | None = None
        self._rows: dict[str, TaskID] = {}

    def __enter__(self) -> WaitProgress:
        if self.stream.isatty():
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
            )
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self._last is not None and not self._shown:
            self._line(self._last)

    def __call__(self, status: WaitStatus) -> None:
        self._last = status
        if self._progress is not None:
            self._update(self._progress, status)
            return
        self._shown = status.elapsed_s >= self._next_s
        if self._shown:
            self._line(status)
            self._next_s = (status.elapsed_s // self.every_s + 1) * self.every_s

    def _line(self, s: WaitStatus) -> None:
        files = f"{s.landed}/{s.files} files landed, {s.validated} validated, {s.merged} merged; " if s.files else ""
        print(
            f"{self.what}: {s.elapsed_s:.0f} s, {files}{s.running} executions running, {s.queued} events queued",
            file=self.stream,
            flush=True,
        )

    def _update(self, progress: Progress, s: WaitStatus) -> None:
        rows: dict[str, tuple[str, int, int | None]] = {
            "pipeline": (f"{self.what}: {s.running} executions running, {s.queued} events queued", 0, None)
        }
        if s.files:
            rows |= {
                "landed": ("files landed in incoming/", s.landed, s.files),
                "validated": ("validated (accepted, rejected or failed)", s.validated, s.files),
                "merged": ("merged (their KPIs published)", s.merged, s.files),
            }
        for key, (description, done, total) in rows.items():
            if key not in self._rows:
                self._rows[key] = progress.add_task(description, total=total)
            progress.update(self._rows[key], description=description, completed=done, total=total)


def category_hint(asked: str, known: Sequence[str], shown: int = 20) -> str:
    """One line for a category that matched nothing: the same name in another case first, else close spellings,
    then the known names (``repr``: a name cannot move the cursor or open a hyperlink on stderr either)."""
    by_fold: dict[str, list[str]] = {}
    for name in known:
        by_fold.setdefault(name.casefold(), []).append(name)
    close = difflib.get_close_matches(asked.casefold(), list(by_fold), n=3, cutoff=0.75)
    guesses = by_fold.get(asked.casefold()) or [name for fold in close for name in by_fold[fold]]
    suggest = f"; did you mean {' or '.join(map(repr, guesses))}?" if guesses else ";"
    names = ", ".join(map(repr, known[:shown])) + (f" (+{len(known) - shown} more)" if len(known) > shown else "")
    return f"no category {asked!r}{suggest} known: {names or 'none'}"
