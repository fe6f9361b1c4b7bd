"""Tables for people (rich). Tools use ``--json`` instead."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from processor.model import CategoryKpi, MergeResult, OrderKpi, ValidationResult

console = Console()


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
        t.add_row(
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
            f"merge: generation {merge.generation}, {merge.files_merged} files applied, "
            f"{merge.groups_recomputed} orders recomputed, {len(merge.dates)} dates changed, "
            f"{merge.removed_kpis} KPI items removed, conflicts {merge.conflicts}, waiting/rejected: {waiting}"
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
        t.add_row(
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
        c.add_row(
            ck.category, ck.order_date, f"{ck.daily_revenue:,}", f"{ck.avg_order_value:,}", str(ck.avg_return_rate)
        )
    console.print(c)


def print_outcomes(results: Sequence[dict[str, Any]]) -> None:
    t = Table(title="File outcomes", title_justify="left")
    for col in ("file", "outcome", "rows", "rejected", "reason"):
        t.add_column(col, justify="right" if col in ("rows", "rejected") else "left")
    for r in results:
        reasons = _reasons(r.get("reason"), r.get("rejects_by_reason"))
        style = "red" if r.get("outcome") != "accepted" else None
        t.add_row(
            str(r["file"]),
            str(r.get("outcome")),
            str(r.get("rows", "")),
            str(r.get("rejected_rows", "")),
            reasons,
            style=style,
        )
    console.print(t)


def print_executions(executions: Sequence[dict[str, Any]]) -> None:
    t = Table(title="Recent executions", title_justify="left")
    for col in ("name", "status", "started", "stopped"):
        t.add_column(col)
    for e in executions:
        t.add_row(str(e["name"]), str(e["status"]), str(e.get("startDate", "")), str(e.get("stopDate", "")))
    console.print(t)


def print_ledger(files: Sequence[dict[str, Any]], title: str) -> None:
    t = Table(title=title, title_justify="left")
    for col in ("updated", "source", "dataset", "outcome", "rows", "rejected", "reasons"):
        t.add_column(col, justify="right" if col in ("rows", "rejected") else "left")
    for f in files:
        reasons = _reasons(f.get("reason"), f.get("rejects_by_reason"))
        t.add_row(
            str(f.get("updated_at", ""))[:19],
            str(f.get("source", "")).rsplit("/", 1)[-1],
            str(f.get("dataset")),
            str(f.get("outcome")),
            str(f.get("rows", "")),
            str(f.get("rejected_rows", "")),
            reasons,
        )
    console.print(t)
