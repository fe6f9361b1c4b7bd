"""Tables for people (rich). Tools use ``--json`` instead.

Every value from files or from AWS goes through :func:`literal`: rich reads a plain ``str`` as markup, so a category
named ``[/x]`` would crash the command and ``[link=http://evil.example]Books`` would print a hyperlink to another site.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from processor.model import CategoryKpi, MergeResult, OrderKpi, ValidationResult

if TYPE_CHECKING:
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
    if merge is not None:
        waiting = _counts({**merge.pending, **merge.late_rejects}) or "none"
        console.print(
            literal(
                f"merge: generation {merge.generation}, {merge.files_merged} files applied, "
                f"{merge.groups_recomputed} orders recomputed, {len(merge.dates)} dates changed, "
                f"{merge.removed_kpis} KPI items removed, conflicts {merge.conflicts}, waiting/rejected: {waiting}"
            )
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


def _record(row: FileRecord | Mapping[str, Any]) -> FileRecord:
    from processor.aws.dynamo import FileRecord  # the AWS adapter only for the commands that read the ledger

    return row if isinstance(row, FileRecord) else msgspec.convert(row, FileRecord)


def _file_cells(f: FileRecord) -> tuple[str, str, str]:
    """A ledger record's rows, rejected rows and reasons (its failure's error code when it failed)."""
    rows = "" if f.rows is None else str(f.rows)
    rejected = "" if f.rejected_rows is None else str(f.rejected_rows)
    return rows, rejected, _reasons(f.reason or f.error_code, f.rejects_by_reason)


def print_outcomes(results: Sequence[Mapping[str, Any]]) -> None:
    """The rows of ``ingest --wait`` (:func:`orchestration.operations.outcomes`): each landed ``file`` with the fields
    of its ledger record."""
    t = Table(title="File outcomes", title_justify="left")
    for col in ("file", "outcome", "rows", "rejected", "reason"):
        t.add_column(col, justify="right" if col in ("rows", "rejected") else "left")
    for r in results:
        f = _record(r)
        style = "red" if f.outcome != "accepted" else None
        _add_row(t, str(r["file"]), str(f.outcome), *_file_cells(f), style=style)
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


def print_executions(executions: Sequence[dict[str, Any]]) -> None:
    t = Table(title="Recent executions", title_justify="left")
    for col in ("name", "status", "started", "stopped"):
        t.add_column(col)
    for e in executions:
        _add_row(t, e["name"], e["status"], e.get("startDate", ""), e.get("stopDate", ""))
    console.print(t)


def print_ledger(files: Sequence[FileRecord | Mapping[str, Any]], title: str) -> None:
    t = Table(title=title, title_justify="left")
    for col in ("updated", "source", "dataset", "outcome", "rows", "rejected", "reasons"):
        t.add_column(col, justify="right" if col in ("rows", "rejected") else "left")
    for f in map(_record, files):
        source = (f.source or "").rsplit("/", 1)[-1]
        _add_row(t, (f.updated_at or "")[:19], source, str(f.dataset), str(f.outcome), *_file_cells(f))
    console.print(t)


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
