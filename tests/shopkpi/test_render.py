"""Tables print data literally: names from files and from AWS are never read as rich markup, emoji codes or
terminal escapes (issue 8, item 14)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import shopkpi.render as render
from orchestration import operations
from orchestration.deploy import Plan
from processor.aws.cloudformation import Change
from processor.model import CategoryKpi, MergeResult, OrderKpi, ValidationResult
from shopkpi import cli
from shopkpi.cli import main
from tests.builders import WriteCsv, item, order, product

CLOSING_TAG = "[/x]"
LINK = "[link=http://evil.example]Books"
EMOJI = "Garden :fire: sale"
OSC8 = "\x1b]8;"  # the start of a terminal hyperlink


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> Iterator[StringIO]:
    """What a colour terminal would receive from the CLI's tables."""
    out = StringIO()
    # Wide enough that no cell wraps: the assertions look for whole names.
    monkeypatch.setattr(render, "console", Console(file=out, force_terminal=True, color_system="truecolor", width=400))
    yield out


def assert_literal(printed: str, *names: str) -> None:
    for name in names:
        assert name in printed
    assert OSC8 not in printed


def test_categories_with_markup_are_printed_literally_by_process(
    write_csv: WriteCsv, screen: StringIO, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOPKPI_WORK_DIR", str(tmp_path / "work"))
    files = [
        write_csv("products.csv", [product(1, CLOSING_TAG), product(2, LINK), product(3, EMOJI)]),
        write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
        write_csv(
            "order_items.csv",
            [item(1, 10, 100, 1, "1.00"), item(2, 10, 100, 2, "2.00"), item(3, 10, 100, 3, "3.00")],
        ),
    ]
    assert main(["process", *map(str, files), "--staging", str(tmp_path / "staging")]) == 0
    assert_literal(screen.getvalue(), CLOSING_TAG, LINK, EMOJI)


def test_file_names_with_markup_are_printed_literally_by_process(
    write_csv: WriteCsv, screen: StringIO, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOPKPI_WORK_DIR", str(tmp_path / "work"))
    products = write_csv("products.csv", [product(1, "Books")])
    odd = products.with_name("products[link=mailto:x@evil.example]p[red].csv")  # a file name cannot hold "/"
    products.rename(odd)
    main(["process", str(odd), "--staging", str(tmp_path / "staging")])  # accepted or not, its row names it
    assert_literal(screen.getvalue(), odd.name)


def _category(name: str) -> CategoryKpi:
    return CategoryKpi(category=name, order_date="2025-03-01", orders=1, returned_orders=0, items=1, revenue_cents=100)


DAILY = [
    OrderKpi(
        order_date="2025-03-01",
        total_orders=1,
        returned_orders=0,
        total_items_sold=1,
        revenue_cents=100,
        unique_customers=1,
    )
]


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands that read a deployed stack, reading fixed answers instead."""
    monkeypatch.setattr(cli, "_stack", lambda settings: object())
    monkeypatch.setattr(operations, "daily", lambda stack, f, t: DAILY)
    monkeypatch.setattr(
        operations, "category", lambda stack, c, f, t: [_category(n) for n in (CLOSING_TAG, LINK, EMOJI)]
    )
    ledger = [
        {
            "updated_at": "2025-03-01T00:00:00+00:00",
            "source": "s3://bucket/incoming/orders[red].csv",
            "dataset": CLOSING_TAG,
            "outcome": LINK,
            "rows": 3,
            "rejected_rows": 3,
            "reason": EMOJI,
        }
    ]
    executions = [{"name": LINK, "status": CLOSING_TAG, "startDate": EMOJI, "stopDate": ""}]
    monkeypatch.setattr(operations, "runs", lambda stack, limit: (executions, ledger))
    monkeypatch.setattr(operations, "rejects", lambda stack, limit: ledger)
    monkeypatch.setattr(operations, "merge_rejects", lambda stack: {"user_mismatch": 0, "rows": []})


@pytest.mark.parametrize("command", [["kpis", "category"], ["runs"], ["rejects"]])
def test_names_read_from_the_stack_are_printed_literally(stack: None, screen: StringIO, command: list[str]) -> None:
    assert main(command) == 0
    assert_literal(screen.getvalue(), CLOSING_TAG, LINK, EMOJI)


def _outcomes() -> None:
    render.print_outcomes([{"file": LINK, "outcome": CLOSING_TAG, "rows": 1, "rejected_rows": 0, "reason": EMOJI}])


def _files() -> None:
    render.print_files(
        [ValidationResult(file_id="f", source=LINK, dataset=CLOSING_TAG, outcome="rejected", reason=EMOJI)],
        MergeResult(
            generation=1,
            segments=1,
            files_merged=1,
            groups_recomputed=0,
            dates=[],
            daily_kpis=0,
            category_kpis=0,
            removed_kpis=0,
            published=0,
            pending={LINK: 1},
            orphans={},
            late_rejects={CLOSING_TAG: 1},
            conflicts=0,
        ),
    )


def _plan() -> None:
    plan = Plan(
        stack=LINK,
        account="123",
        region="us-east-1",
        kind="CREATE",
        changes=(Change(action="Add", logical_id=CLOSING_TAG, resource_type=EMOJI, replacement=""),),
        parameters={"Name": LINK},
        kept=(CLOSING_TAG,),
    )
    cli._print_plan(plan)


@pytest.mark.parametrize(
    "printer",
    [
        _outcomes,
        _files,
        _plan,
        lambda: render.print_executions([{"name": LINK, "status": CLOSING_TAG, "startDate": EMOJI}]),
        lambda: render.print_ledger([{"outcome": LINK, "dataset": CLOSING_TAG, "reason": EMOJI}], "Files"),
        lambda: render.print_kpis(DAILY, [_category(CLOSING_TAG), _category(LINK), _category(EMOJI)]),
    ],
)
def test_every_table_prints_its_values_literally(screen: StringIO, printer: Callable[[], Any]) -> None:
    printer()
    assert_literal(screen.getvalue(), CLOSING_TAG, LINK, EMOJI)


def test_terminal_escapes_in_a_name_are_shown_not_sent_to_the_terminal(screen: StringIO) -> None:
    render.print_category([_category("\x1b]8;;http://evil.example\x1b\\Books\x1b]8;;\x1b\\")])
    printed = screen.getvalue()
    assert OSC8 not in printed
    assert "Books" in printed
