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
from processor.aws.dynamo import FileRecord
from processor.model import CategoryKpi, MergeResult, ValidationResult
from shopkpi import cli
from shopkpi.cli import main
from tests.builders import WriteCsv, day_kpi, item, order, product

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


DAILY = [day_kpi("2025-03-01", orders=1, returned=0, items=1, cents=100, customers=1)]


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands that read a deployed stack, reading fixed answers instead."""
    monkeypatch.setattr(cli, "_stack", lambda settings: object())
    monkeypatch.setattr(operations, "daily", lambda stack, f, t: DAILY)
    monkeypatch.setattr(
        operations, "category", lambda stack, c, f, t: [_category(n) for n in (CLOSING_TAG, LINK, EMOJI)]
    )
    ledger = [
        FileRecord(
            updated_at="2025-03-01T00:00:00+00:00",
            source="s3://bucket/incoming/orders[red].csv",
            dataset=CLOSING_TAG,
            outcome=LINK,
            rows=3,
            rejected_rows=3,
            reason=EMOJI,
            message=LINK,
            rejects=f"s3://bucket/reports/{CLOSING_TAG}/rejected_rows.csv",
        )
    ]
    monkeypatch.setattr(operations, "runs", lambda stack, limit: ([EXECUTION], ledger))
    monkeypatch.setattr(operations, "rejects", lambda stack, limit: ledger)
    monkeypatch.setattr(operations, "merge_rejects", lambda stack: {"user_mismatch": 0, "rows": []})


EXECUTION = operations.ExecutionRun(name=LINK, status=CLOSING_TAG, started_at=EMOJI, stopped_at=None, seconds=None)


@pytest.mark.parametrize("command", [["kpis", "category"], ["runs"], ["rejects"]])
def test_names_read_from_the_stack_are_printed_literally(stack: None, screen: StringIO, command: list[str]) -> None:
    assert main(command) == 0
    assert_literal(screen.getvalue(), CLOSING_TAG, LINK, EMOJI)


def _outcomes() -> None:
    record = FileRecord(outcome=CLOSING_TAG, rows=1, rejected_rows=0, reason=EMOJI)
    render.print_outcomes([operations.FileOutcome(file=LINK, file_id="f", record=record)])


def _reprocess() -> None:
    changes = operations.KpiChanges(
        dates=[LINK, CLOSING_TAG, EMOJI], daily=operations.ItemChanges(), category=operations.ItemChanges(), unchanged=0
    )
    render.print_reprocess(operations.ReprocessResult(execution=LINK, status="SUCCEEDED", seconds=1.0, changes=changes))


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
        _reprocess,
        lambda: render.print_executions([EXECUTION]),
        lambda: render.print_ledger([FileRecord(outcome=LINK, dataset=CLOSING_TAG, reason=EMOJI)], "Files"),
        lambda: render.print_rejects([FileRecord(outcome=LINK, message=CLOSING_TAG, reason=EMOJI)]),
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


class Terminal(StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_live_display_of_files_and_executions() -> None:
    screen = Terminal()
    with render.WaitProgress("waiting", stream=screen) as progress:
        progress(operations.WaitStatus(elapsed_s=1.0, files=4, landed=4, validated=3, merged=1, running=2, queued=1))
    shown = screen.getvalue()
    assert "waiting: 2 executions running, 1 events queued" in shown
    assert "validated (accepted, rejected or failed)" in shown and "3/4" in shown
    assert "merged (their KPIs published)" in shown and "1/4" in shown


def test_progress_elsewhere_is_a_plain_line_every_few_seconds_and_one_at_the_end() -> None:
    log = StringIO()
    with render.WaitProgress("reprocessing", stream=log, every_s=5.0) as progress:
        for elapsed in (0.2, 3.0, 4.9, 5.0, 9.0, 11.0, 12.4):
            progress(
                operations.WaitStatus(elapsed_s=elapsed, files=0, landed=0, validated=0, merged=0, running=1, queued=0)
            )
    assert log.getvalue().splitlines() == [
        f"reprocessing: {s} s, 1 executions running, 0 events queued" for s in ("0", "5", "11", "12")
    ]


def test_a_file_of_no_known_dataset_shows_a_question_mark_not_none(screen: StringIO) -> None:
    render.print_ledger(
        [FileRecord(outcome="rejected", source="s3://b/incoming/unknown/x.csv", reason="unknown_dataset")], "Files"
    )
    row = next(line for line in screen.getvalue().splitlines() if "x.csv" in line)
    assert "None" not in row and " ? " in row
