"""The dashboard serves the KPIs it reads: the page and its files from package data, the JSON endpoints with exact
range totals, changes, category rankings and trends, CSV downloads and pipeline health; it refuses bad parameters
with a 400 and sends its security headers on every answer. What a browser shows of it is
tests/shopkpi/test_dashboard_browser.py's."""

from __future__ import annotations

import csv
import http.client
import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from urllib.parse import urlparse

import pytest

from processor.aws.dynamo import FileRecord
from processor.model import CategoryKpi, OrderKpi
from shopkpi.dashboard import Period, make_server, period, ranking, serving, static_files, trend
from shopkpi.health import Execution, Health, executions, file_issues
from tests.builders import BIG_DAY, day_kpi

DAILY = [
    day_kpi("2025-03-01", orders=2, returned=1, items=3, cents=20949, customers=2),
    day_kpi("2025-03-02", orders=1, returned=0, items=1, cents=1000, customers=1),
]
CATEGORY = [
    CategoryKpi(
        category="Books & <Toys>", order_date="2025-03-02", orders=1, returned_orders=0, items=1, revenue_cents=1000
    )
]


@pytest.fixture
def url() -> Iterator[str]:
    def daily(f: str | None, t: str | None) -> list[OrderKpi]:
        return [k for k in DAILY if (f is None or k.order_date >= f) and (t is None or k.order_date <= t)]

    def category(c: str | None, f: str | None, t: str | None) -> list[CategoryKpi]:
        return [k for k in CATEGORY if (f is None or k.order_date >= f) and (t is None or k.order_date <= t)]

    with serving(make_server("127.0.0.1", 0, daily, category)) as base:
        yield base


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def request(url: str, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    """Any answer, 4xx and 5xx included, with its headers and body as sent."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def test_page_is_the_packaged_html_with_its_script_chart_library_and_stylesheet(url: str) -> None:
    status, page = get(url + "/?from=2025-03-01&to=2025-03-02&date=2025-03-02")
    assert status == 200
    assert '<script src="/static/vendor/chart.umd.min.js" defer></script>' in page
    assert '<script src="/static/dashboard.js" defer></script>' in page
    for path, content_type, marker in [
        ("/static/vendor/chart.umd.min.js", "text/javascript; charset=utf-8", b"Chart.js v4.6.1"),
        ("/static/dashboard.js", "text/javascript; charset=utf-8", b"/api/summary"),
        ("/static/dashboard.css", "text/css; charset=utf-8", b".card"),
        ("/static/vendor/chart.js.LICENSE.md", "text/markdown; charset=utf-8", b"MIT"),
    ]:
        response, body = request(url + path)
        assert (response.status, response.getheader("Content-Type")) == (200, content_type)
        assert marker in body


def test_summary_totals_the_range_exactly_and_compares_it_with_the_previous_period(url: str) -> None:
    _, body = get(url + "/api/summary?from=2025-03-02&to=2025-03-02")
    summary = json.loads(body, parse_float=Decimal)
    assert summary["range"] == {"from": "2025-03-02", "to": "2025-03-02", "days": 1}
    assert summary["previous"] == {"from": "2025-03-01", "to": "2025-03-01", "days": 1}
    assert summary["totals"] == {
        "total_revenue": Decimal("10.00"),
        "total_orders": 1,
        "total_items_sold": 1,
        "avg_order_value": Decimal("10.00"),
        "return_rate": Decimal("0.00"),
        "avg_daily_customers": Decimal("1.00"),
        "days_with_orders": 1,
    }
    assert summary["previous_totals"]["total_revenue"] == Decimal("209.49")
    # percent for amounts, percentage points for the return rate (0 % now against 50 % before)
    assert summary["change"] == {
        "total_revenue": Decimal("-95.23"),
        "total_orders": Decimal("-50.00"),
        "total_items_sold": Decimal("-66.67"),
        "avg_order_value": Decimal("-90.45"),
        "avg_daily_customers": Decimal("-50.00"),
        "return_rate": Decimal("-50.00"),
    }
    assert summary["categories"][0]["category"] == "Books & <Toys>"
    assert summary["category_trend"] == {
        "dates": ["2025-03-02"],
        "series": {"Books & <Toys>": {"revenue": [Decimal("10.00")], "return_rate": [Decimal("0.00")]}},
    }


def test_summary_defaults_to_the_days_up_to_the_newest_stored_date_with_a_null_row_for_each_day_without_orders(
    url: str,
) -> None:
    _, body = get(url + "/api/summary")
    summary = json.loads(body)
    assert summary["range"] == {"from": "2025-02-01", "to": "2025-03-02", "days": 30}
    assert summary["stored"] == {"first": "2025-03-01", "last": "2025-03-02", "days": 2}
    assert len(summary["daily"]) == 30
    assert summary["daily"][0] == {
        "order_date": "2025-02-01",
        "total_orders": None,
        "total_revenue": None,
        "total_items_sold": None,
        "return_rate": None,
        "unique_customers": None,
    }
    assert [d["total_orders"] for d in summary["daily"][-2:]] == [2, 1]
    assert summary["change"]["total_revenue"] is None  # nothing stored before: no change to show
    _, body = get(url + "/api/summary?days=7&to=2025-03-01")
    assert json.loads(body)["range"] == {"from": "2025-02-23", "to": "2025-03-01", "days": 7}


def test_summary_of_an_empty_store_says_only_the_currency() -> None:
    with serving(make_server("127.0.0.1", 0, lambda f, t: [], lambda c, f, t: [])) as base:
        _, body = get(base + "/api/summary")
    assert json.loads(body) == {"currency": "USD"}


def test_category_ranking_sums_the_components_before_dividing() -> None:
    rows = [
        CategoryKpi(category="A", order_date="2025-03-01", orders=3, returned_orders=1, items=4, revenue_cents=3000),
        CategoryKpi(category="A", order_date="2025-03-02", orders=1, returned_orders=1, items=1, revenue_cents=1001),
        CategoryKpi(category="B", order_date="2025-03-01", orders=2, returned_orders=0, items=2, revenue_cents=9000),
    ]
    assert ranking(rows) == [
        {
            "rank": 1,
            "category": "B",
            "revenue": Decimal("90.00"),
            "revenue_share": Decimal("69.23"),
            "orders": 2,
            "items": 2,
            "avg_order_value": Decimal("45.00"),
            "return_rate": Decimal("0.00"),
        },
        {
            "rank": 2,
            "category": "A",
            "revenue": Decimal("40.01"),
            "revenue_share": Decimal("30.77"),
            "orders": 4,
            "items": 5,
            "avg_order_value": Decimal("10.00"),
            "return_rate": Decimal("50.00"),  # 2 of 4 orders, not the mean of 33.33 % and 100 %
        },
    ]


def test_csv_downloads_hold_what_the_json_holds(url: str) -> None:
    response, body = request(url + "/api/daily.csv?from=2025-03-01&to=2025-03-01")
    assert response.getheader("Content-Type") == "text/csv; charset=utf-8"
    assert response.getheader("Content-Disposition") == (
        'attachment; filename="shopkpi-daily-2025-03-01-2025-03-01.csv"'
    )
    assert body.decode() == (
        "order_date,total_orders,total_revenue,total_items_sold,return_rate,unique_customers\n"
        "2025-03-01,2,209.49,3,50.00,2\n"
    )
    _, body = request(url + "/api/category.csv?date=2025-03-02")
    assert list(csv.DictReader(io.StringIO(body.decode()))) == [
        {
            "category": "Books & <Toys>",
            "order_date": "2025-03-02",
            "daily_revenue": "10.00",
            "avg_order_value": "10.00",
            "avg_return_rate": "0.00",
        }
    ]
    _, body = request(url + "/api/categories.csv?from=2025-03-01&to=2025-03-02")
    assert body.decode().splitlines() == [
        "rank,category,revenue,revenue_share,orders,items,avg_order_value,return_rate",
        "1,Books & <Toys>,10.00,100.00,1,1,10.00,0.00",
    ]


def test_health_is_a_404_without_a_reader_and_the_readers_answer_with_one(url: str) -> None:
    response, body = request(url + "/api/health")
    assert response.status == 404
    assert json.loads(body)["error"] == "unavailable"
    health = Health(
        executions=[Execution(name="run-1", status="FAILED", started_at="t0", stopped_at="t1", seconds=3.5)],
        files=[],
        queued_events=2,
        dead_letters={"buffer": 0, "workflow": 1},
        waiting={"waiting_order": 3},
        orphans={},
        late_rejects={},
        last_merge="2025-03-02T10:00:00+00:00",
        last_merge_published=4,
        last_file=None,
    )
    with serving(make_server("127.0.0.1", 0, lambda f, t: [], lambda c, f, t: [], lambda: health)) as base:
        _, body = get(base + "/api/health")
    answer = json.loads(body)
    assert answer["executions"] == [
        {"name": "run-1", "status": "FAILED", "started_at": "t0", "stopped_at": "t1", "seconds": 3.5}
    ]
    assert (answer["dead_letters"], answer["waiting"], answer["last_merge"]) == (
        {"buffer": 0, "workflow": 1},
        {"waiting_order": 3},
        "2025-03-02T10:00:00+00:00",
    )


def test_json_endpoints_return_the_brief_field_names_with_two_decimal_numbers(url: str) -> None:
    _, body = get(url + "/api/daily?from=2025-03-02")
    assert '"total_revenue":10.00' in body and '"return_rate":0.00' in body
    assert json.loads(body, parse_float=Decimal) == [
        {
            "order_date": "2025-03-02",
            "total_orders": 1,
            "total_revenue": Decimal("10.00"),
            "total_items_sold": 1,
            "return_rate": Decimal("0.00"),
            "unique_customers": 1,
        }
    ]
    _, body = get(url + "/api/category?date=2025-03-02")
    assert '"avg_order_value":10.00' in body
    assert json.loads(body, parse_float=Decimal)[0]["avg_order_value"] == Decimal("10.00")


def test_a_total_beyond_float_precision_is_served_exactly() -> None:
    with serving(make_server("127.0.0.1", 0, lambda f, t: [BIG_DAY], lambda c, f, t: [])) as base:
        _, body = get(base + "/api/daily")
    assert '"total_revenue":10000000000000050.05' in body and '"return_rate":33.33' in body
    assert json.loads(body, parse_float=Decimal)[0]["total_revenue"] == Decimal("10000000000000050.05")


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("/api/daily?from=yesterday", "from"),
        ("/api/daily?to=2025-02-30", "to"),
        ("/api/daily?from=20250301", "from"),  # ISO 8601 too, but not the YYYY-MM-DD the KPIs are keyed by
        ("/api/category?date=2025-3-1", "date"),
        ("/api/category?date=2025-03-01%27%3Cx%3E", "date"),
        ("/api/summary?from=2025-3-01", "from"),
        ("/api/category.csv?date=x", "date"),
    ],
)
def test_a_malformed_date_is_a_400_naming_the_parameter_and_the_format(url: str, query: str, parameter: str) -> None:
    response, body = request(url + query)
    assert response.status == 400
    assert response.getheader("Content-Type") == "application/json"
    error = json.loads(body)
    assert error["parameter"] == parameter
    assert error["message"].startswith(f"{parameter} must be a date written YYYY-MM-DD, got ")


def test_a_malformed_date_on_the_page_is_a_400_in_plain_text(url: str) -> None:
    response, body = request(url + "/?date=2025-13-01")
    assert response.status == 400
    assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert body.decode() == "date must be a date written YYYY-MM-DD, got '2025-13-01'\n"


@pytest.mark.parametrize(
    ("query", "parameter", "message"),
    [
        ("/api/summary?days=0", "days", "days must be a whole number from 1 to 3660, got '0'"),
        ("/api/summary?days=%D9%A3", "days", "days must be a whole number from 1 to 3660, got '\u0663'"),
        ("/api/summary?from=2000-01-01&to=2025-01-01", "from", "the range spans 9133 days; at most 3660 are served"),
    ],
)
def test_a_bad_or_too_long_range_is_a_400_naming_the_parameter(
    url: str, query: str, parameter: str, message: str
) -> None:
    response, body = request(url + query)
    assert response.status == 400
    error = json.loads(body)
    assert error["parameter"] == parameter
    assert error["message"].startswith(message)


def test_a_reversed_range_is_a_400(url: str) -> None:
    response, body = request(url + "/api/daily?from=2025-03-02&to=2025-03-01")
    assert response.status == 400
    error = json.loads(body)
    assert error["parameter"] == "from"
    assert "from (2025-03-02) is after to (2025-03-01)" in error["message"]


def test_a_range_of_one_day_is_served(url: str) -> None:
    _, body = get(url + "/api/daily?from=2025-03-01&to=2025-03-01")
    assert [k["order_date"] for k in json.loads(body)] == ["2025-03-01"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/static/dashboard.css", 200),
        ("GET", "/static/vendor/chart.umd.min.js", 200),
        ("GET", "/api/summary", 200),
        ("GET", "/api/daily", 200),
        ("GET", "/api/daily?from=x", 400),
        ("GET", "/nope", 404),
        ("HEAD", "/", 200),
        ("POST", "/", 501),  # http.server's own answer
    ],
)
def test_every_response_carries_the_content_security_policy_and_nosniff(
    url: str, method: str, path: str, status: int
) -> None:
    response, _ = request(url + path, method)
    assert response.status == status
    assert response.getheader("Content-Security-Policy") == (
        "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )
    assert response.getheader("X-Content-Type-Options") == "nosniff"


def test_the_page_needs_nothing_inline(url: str) -> None:
    _, page = get(url + "/")
    assert "<style" not in page and "style=" not in page
    assert not re.search(r"\son[a-z]+=", page)  # no inline event handlers
    assert re.findall(r"<script[^>]*>", page) == [
        '<script src="/static/vendor/chart.umd.min.js" defer>',
        '<script src="/static/dashboard.js" defer>',
    ]
    assert '<link rel="stylesheet" href="/static/dashboard.css">' in page


def test_only_the_packaged_files_are_served(url: str) -> None:
    assert set(static_files()) >= {
        "/static/index.html",
        "/static/dashboard.js",
        "/static/dashboard.css",
        "/static/vendor/chart.umd.min.js",
    }
    for path in ("/static/../dashboard.py", "/static/vendor/../../dashboard.py", "/static/nope.js"):
        assert request(url + path)[0].status == 404


@pytest.mark.parametrize("path", ["/", "/api/daily", "/api/daily?from=x", "/nope"])
def test_head_answers_the_headers_of_get_without_a_body(url: str, path: str) -> None:
    got, got_body = request(url + path, "GET")
    head, head_body = request(url + path, "HEAD")
    assert head.status == got.status
    assert head_body == b""
    for name in ("Content-Type", "Content-Length", "Content-Security-Policy", "X-Content-Type-Options"):
        assert head.getheader(name) == got.getheader(name)
    assert int(head.getheader("Content-Length") or -1) == len(got_body)


def test_a_failing_read_is_a_500_and_the_dashboard_keeps_serving() -> None:
    calls: list[str | None] = []

    def daily(f: str | None, t: str | None) -> list[OrderKpi]:
        calls.append(f)
        if len(calls) == 1:
            raise RuntimeError("DynamoDB unreachable")
        return DAILY

    with serving(make_server("127.0.0.1", 0, daily, lambda c, f, t: [])) as base:
        failed, body = request(base + "/api/daily")
        again, _ = request(base + "/api/daily")
    assert failed.status == 500
    assert json.loads(body)["error"] == "internal"
    assert again.status == 200


def test_unknown_path_is_404(url: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        get(url + "/nope")
    assert e.value.code == 404


def test_health_lists_executions_newest_first_with_their_duration() -> None:
    at = datetime(2025, 3, 2, 10, 0, tzinfo=UTC)
    found = [
        {"name": "old", "status": "SUCCEEDED", "startDate": at, "stopDate": at.replace(second=12)},
        {"name": "new", "status": "RUNNING", "startDate": at.replace(minute=5)},
    ]
    assert executions(found, limit=5) == [
        Execution(name="new", status="RUNNING", started_at="2025-03-02T10:05:00+00:00", stopped_at=None, seconds=None),
        Execution(
            name="old",
            status="SUCCEEDED",
            started_at="2025-03-02T10:00:00+00:00",
            stopped_at="2025-03-02T10:00:12+00:00",
            seconds=12.0,
        ),
    ]
    assert [e.name for e in executions(found, limit=1)] == ["new"]


def test_health_lists_refused_and_failed_files_and_accepted_files_that_lost_rows_but_not_clean_ones() -> None:
    records = [
        FileRecord(
            file_id="a",
            source="s3://b/incoming/orders/clean.csv",
            outcome="accepted",
            rows=5,
            rejected_rows=0,
            updated_at="2025-03-02T10:00:04Z",
        ),
        FileRecord(
            file_id="b",
            source="s3://b/incoming/orders/rows.csv",
            outcome="accepted",
            rows=5,
            rejected_rows=2,
            rejects_by_reason={"bad_date": 2},
            rejects="s3://b/rejected/b/rows.csv",
            updated_at="2025-03-02T10:00:03Z",
        ),
        FileRecord(
            file_id="c",
            source="s3://b/incoming/orders/whole.csv",
            outcome="rejected",
            reason="missing_column",
            message="no user_id",
            updated_at="2025-03-02T10:00:02Z",
        ),
        FileRecord(
            source="s3://b/incoming/orders/hung.csv",
            outcome="failed",
            error_code="States.Timeout",
            error_detail="validate timed out",
            updated_at="2025-03-02T10:00:05Z",
        ),
    ]
    issues = file_issues(records, limit=10)
    assert [(i.file, i.outcome, i.reason, i.message) for i in issues] == [
        ("incoming/orders/hung.csv", "failed", "States.Timeout", "validate timed out"),
        ("incoming/orders/rows.csv", "accepted", None, None),
        ("incoming/orders/whole.csv", "rejected", "missing_column", "no user_id"),
    ]
    assert (issues[1].rejected_rows, issues[1].rejects_by_reason, issues[1].rejects) == (
        2,
        {"bad_date": 2},
        "s3://b/rejected/b/rows.csv",
    )
    assert len(file_issues(records, limit=1)) == 1


def test_category_trend_is_zero_revenue_on_a_trading_day_without_the_category_and_null_without_orders() -> None:
    rows = [
        CategoryKpi(category="A", order_date="2025-03-01", orders=2, returned_orders=1, items=2, revenue_cents=500),
        CategoryKpi(category="B", order_date="2025-03-03", orders=1, returned_orders=0, items=1, revenue_cents=250),
    ]
    span = Period(date(2025, 3, 1), date(2025, 3, 3))
    assert trend(rows, span) == {
        "dates": ["2025-03-01", "2025-03-02", "2025-03-03"],
        "series": {
            "A": {"revenue": [Decimal("5.00"), None, Decimal("0.00")], "return_rate": [Decimal("50.00"), None, None]},
            "B": {"revenue": [Decimal("0.00"), None, Decimal("2.50")], "return_rate": [None, None, Decimal("0.00")]},
        },
    }


@pytest.mark.parametrize(
    ("first", "last", "newest", "days", "expected"),
    [
        (None, None, "2025-03-31", 30, ("2025-03-02", "2025-03-31")),  # the default: 30 days up to the newest
        (None, None, None, 30, None),  # nothing stored, nothing asked
        ("2025-01-01", None, "2025-03-31", 30, ("2025-01-01", "2025-03-31")),  # from on: up to the newest
        ("2025-06-01", None, "2025-03-31", 30, ("2025-06-01", "2025-06-01")),  # from after the newest: that day
        (None, "2025-01-10", "2025-03-31", 7, ("2025-01-04", "2025-01-10")),  # days up to to
        (None, "2024-03-01", None, 2, ("2024-02-29", "2024-03-01")),  # calendar days, leap day included
    ],
)
def test_an_open_range_is_filled_from_the_newest_stored_date_and_the_days(
    first: str | None, last: str | None, newest: str | None, days: int, expected: tuple[str, str] | None
) -> None:
    got = period(first, last, newest, days)
    assert (None if got is None else (got.first.isoformat(), got.last.isoformat())) == expected
