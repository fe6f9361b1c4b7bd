"""``--json`` writes money, rates and averages as exact numbers with two decimals (SPEC section 3), counts as integers
(issue 8, item 17)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestration import operations
from processor.model import CategoryKpi
from shopkpi import cli
from shopkpi.cli import main
from tests.builders import BIG_DAY, WriteCsv, item, order, product

BIG_CATEGORY = CategoryKpi(
    category="Books",
    order_date="2025-04-01",
    orders=3,
    returned_orders=1,
    items=3,
    revenue_cents=1_000_000_000_000_005_005,
)


def printed(capsys: pytest.CaptureFixture[str]) -> tuple[str, Any]:
    """stdout as text, and as JSON with every non-integer number read as an exact Decimal."""
    out = capsys.readouterr().out
    return out, json.loads(out, parse_float=Decimal)


def test_process_json_writes_money_and_rates_with_two_decimals(
    write_csv: WriteCsv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOPKPI_WORK_DIR", str(tmp_path / "work"))
    files = [
        write_csv("products.csv", [product(1, "Books")]),
        write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00"), order(11, 101, "2025-03-01T09:00:00")]),
        write_csv("order_items.csv", [item(1, 10, 100, 1, "10.50"), item(2, 11, 101, 1, "0.00")]),
    ]
    assert main(["process", *map(str, files), "--staging", str(tmp_path / "staging"), "--json"]) == 0
    text, data = printed(capsys)
    assert '"total_revenue": 10.50' in text
    assert '"return_rate": 0.00' in text
    assert '"avg_order_value": 5.25' in text
    assert data["daily"] == [
        {
            "order_date": "2025-03-01",
            "total_orders": 2,
            "total_revenue": Decimal("10.50"),
            "total_items_sold": 2,
            "return_rate": Decimal("0.00"),
            "unique_customers": 2,
        }
    ]
    assert data["category"] == [
        {
            "category": "Books",
            "order_date": "2025-03-01",
            "daily_revenue": Decimal("10.50"),
            "avg_order_value": Decimal("5.25"),
            "avg_return_rate": Decimal("0.00"),
        }
    ]


def test_process_json_writes_a_total_beyond_float_precision_exactly(
    write_csv: WriteCsv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOPKPI_WORK_DIR", str(tmp_path / "work"))
    files = [
        write_csv("products.csv", [product(1, "Books")]),
        write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
        write_csv(
            "order_items.csv", [item(1, 10, 100, 1, "5000000000000025.02"), item(2, 10, 100, 1, "5000000000000025.03")]
        ),
    ]
    assert main(["process", *map(str, files), "--staging", str(tmp_path / "staging"), "--json"]) == 0
    text, data = printed(capsys)
    assert '"total_revenue": 10000000000000050.05' in text
    assert data["daily"][0]["total_revenue"] == Decimal("10000000000000050.05")
    assert data["category"][0]["daily_revenue"] == Decimal("10000000000000050.05")


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_stack", lambda settings: object())
    monkeypatch.setattr(operations, "daily", lambda stack, f, t: [BIG_DAY])
    monkeypatch.setattr(operations, "category", lambda stack, c, f, t: [BIG_CATEGORY])


def test_kpis_daily_json_writes_exact_two_decimal_numbers_and_integer_counts(
    stack: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["kpis", "daily", "--json"]) == 0
    text, data = printed(capsys)
    assert '"total_revenue": 10000000000000050.05' in text and '"return_rate": 33.33' in text
    assert '"total_orders": 3,' in text
    assert data == [
        {
            "order_date": "2025-04-01",
            "total_orders": 3,
            "total_revenue": Decimal("10000000000000050.05"),
            "total_items_sold": 3,
            "return_rate": Decimal("33.33"),
            "unique_customers": 3,
        }
    ]


def test_kpis_category_json_writes_exact_two_decimal_numbers(stack: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kpis", "category", "--json"]) == 0
    text, data = printed(capsys)
    assert '"avg_order_value": 3333333333333350.02' in text and '"avg_return_rate": 33.33' in text
    assert data == [
        {
            "category": "Books",
            "order_date": "2025-04-01",
            "daily_revenue": Decimal("10000000000000050.05"),
            "avg_order_value": Decimal("3333333333333350.02"),
            "avg_return_rate": Decimal("33.33"),
        }
    ]


def test_runs_json_writes_execution_times_as_iso_8601_with_their_offset_and_durations_as_numbers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started = datetime(2025, 3, 1, 8, 0, 0, 250000, tzinfo=UTC)
    stopped = datetime(2025, 3, 1, 8, 0, 12, 750000, tzinfo=UTC)
    execution = {"name": "r1", "status": "SUCCEEDED", "startDate": started, "stopDate": stopped}
    workflow = SimpleNamespace(executions=lambda limit: [execution])
    ledger = SimpleNamespace(files=lambda limit: [], get_run=lambda name: None)
    monkeypatch.setattr(cli, "_stack", lambda settings: SimpleNamespace(workflow=workflow, ledger=ledger))
    assert main(["runs", "--json"]) == 0
    text, data = printed(capsys)
    assert '"seconds": 12.5,' in text
    assert data["executions"] == [
        {
            "name": "r1",
            "status": "SUCCEEDED",
            "started_at": "2025-03-01T08:00:00.250000+00:00",
            "stopped_at": "2025-03-01T08:00:12.750000+00:00",
            "seconds": Decimal("12.5"),
            "accepted": 0,
            "rejected": 0,
            "failed": 0,
            "files_merged": None,
            "dates": None,
        }
    ]
