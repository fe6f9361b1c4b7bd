"""The dashboard serves the KPIs it reads: the page, its chart and the JSON endpoints."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest

from processor.model import CategoryKpi, OrderKpi
from shopkpi.dashboard import make_server, serve

DAILY = [
    OrderKpi(
        order_date="2025-03-01",
        total_orders=2,
        returned_orders=1,
        total_items_sold=3,
        revenue_cents=20949,
        unique_customers=2,
    ),
    OrderKpi(
        order_date="2025-03-02",
        total_orders=1,
        returned_orders=0,
        total_items_sold=1,
        revenue_cents=1000,
        unique_customers=1,
    ),
]
CATEGORY = [
    CategoryKpi(
        category="Books & <Toys>", order_date="2025-03-02", orders=1, returned_orders=0, items=1, revenue_cents=1000
    )
]


@pytest.fixture
def url() -> Iterator[str]:
    asked: list[tuple[str | None, ...]] = []

    def daily(f: str | None, t: str | None) -> list[OrderKpi]:
        return [k for k in DAILY if (f is None or k.order_date >= f) and (t is None or k.order_date <= t)]

    def category(c: str | None, f: str | None, t: str | None) -> list[CategoryKpi]:
        asked.append((c, f, t))
        return [k for k in CATEGORY if k.order_date == f]

    server = make_server("127.0.0.1", 0, daily, category)
    serve(server)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def test_page_shows_daily_kpis_a_revenue_bar_per_day_and_the_latest_days_categories(url: str) -> None:
    status, page = get(url + "/")
    assert status == 200
    assert "209.49" in page and "50.00" in page  # revenue and return rate of 2025-03-01
    assert page.count("<rect") == 2
    assert "Category KPIs of 2025-03-02" in page
    assert "Books &amp; &lt;Toys&gt;" in page  # names are escaped


def test_json_endpoints_return_the_brief_field_names(url: str) -> None:
    _, body = get(url + "/api/daily?from=2025-03-02")
    assert json.loads(body) == [
        {
            "order_date": "2025-03-02",
            "total_orders": 1,
            "total_revenue": 10.0,
            "total_items_sold": 1,
            "return_rate": 0.0,
            "unique_customers": 1,
        }
    ]
    _, body = get(url + "/api/category?date=2025-03-02")
    assert json.loads(body)[0]["avg_order_value"] == 10.0


def test_unknown_path_is_404(url: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        get(url + "/nope")
    assert e.value.code == 404
