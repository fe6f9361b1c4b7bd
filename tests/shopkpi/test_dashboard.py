"""The dashboard serves the KPIs it reads: the page, its chart and the JSON endpoints; it refuses bad dates with a
400 and sends its security headers on every answer."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from urllib.parse import urlparse

import pytest

from processor.model import CategoryKpi, OrderKpi
from shopkpi.dashboard import make_server, serve
from tests.builders import BIG_DAY

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


def test_page_shows_daily_kpis_a_revenue_bar_per_day_and_the_latest_days_categories(url: str) -> None:
    status, page = get(url + "/")
    assert status == 200
    assert "209.49" in page and "50.00" in page  # revenue and return rate of 2025-03-01
    assert page.count("<rect") == 2
    assert "Category KPIs of 2025-03-02" in page
    assert "Books &amp; &lt;Toys&gt;" in page  # names are escaped


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
    server = make_server("127.0.0.1", 0, lambda f, t: [BIG_DAY], lambda c, f, t: [])
    serve(server)
    try:
        _, body = get(f"http://127.0.0.1:{server.server_address[1]}/api/daily")
    finally:
        server.shutdown()
        server.server_close()
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
        ("GET", "/dashboard.css", 200),
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
        "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )
    assert response.getheader("X-Content-Type-Options") == "nosniff"


def test_the_page_needs_nothing_inline_and_its_stylesheet_is_served(url: str) -> None:
    _, page = get(url + "/")
    assert "<style" not in page and "style=" not in page and "<script" not in page
    assert '<link rel="stylesheet" href="/dashboard.css">' in page
    response, css = request(url + "/dashboard.css")
    assert response.getheader("Content-Type") == "text/css; charset=utf-8"
    assert b"svg rect" in css


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

    server = make_server("127.0.0.1", 0, daily, lambda c, f, t: [])
    serve(server)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        failed, body = request(base + "/api/daily")
        again, _ = request(base + "/api/daily")
    finally:
        server.shutdown()
        server.server_close()
    assert failed.status == 500
    assert json.loads(body)["error"] == "internal"
    assert again.status == 200


def test_unknown_path_is_404(url: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        get(url + "/nope")
    assert e.value.code == 404
