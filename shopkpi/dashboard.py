"""``shopkpi dashboard``: a read-only KPI dashboard over the DynamoDB tables, for a shop analyst.

The page is static (``shopkpi/static/``: HTML, CSS, one script, and Chart.js vendored under ``static/vendor/``,
served from package data so it works offline). Its script reads the JSON API below, draws the charts, and polls
every 10 s. The server does the arithmetic, on the exact integer components the KPI store keeps (cents, order and
return counts), so every figure the page shows is the exact one ``shopkpi kpis`` would give.

    GET /                            the page (``?from=&to=&days=&date=`` pick the range and the day; validated here)
    GET /static/...                  its files (page, stylesheet, script, Chart.js and its licence)
    GET /api/daily?from=&to=         order-level KPIs (the objects of ``kpis daily --json``)
    GET /api/category?date=          category-level KPIs of one date (the objects of ``kpis category --json``)
    GET /api/summary?from=&to=&days= everything the page draws for a range: totals and their change against the
                                     previous period of equal length, every day of the range, the per-category
                                     ranking and trend. Open ends: ``to`` is the newest stored date, ``from`` is
                                     ``days`` (default 30) days up to ``to``
    GET /api/health                  pipeline health (:mod:`shopkpi.health`); 404 when the server has no reader
    GET /api/daily.csv?from=&to=     the daily KPIs of the range, as CSV
    GET /api/categories.csv?from=&to=&days=  the category ranking of the range, as CSV
    GET /api/category.csv?date=      one day's category KPIs, as CSV

HEAD answers the same headers without the body. A malformed date, ``from`` after ``to``, or a range longer than
:data:`MAX_DAYS` is a 400 naming the parameter; every response carries the Content-Security-Policy and
``X-Content-Type-Options: nosniff``. docs/dashboard.md describes the panels and the API.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import parse_qs, urlparse

from processor.log import get_logger
from processor.model import CENT, CategoryKpi, OrderKpi, cents_to_decimal, ratio, to_json
from shopkpi.health import Health

DailyReader = Callable[[str | None, str | None], list[OrderKpi]]
CategoryReader = Callable[[str | None, str | None, str | None], list[CategoryKpi]]
HealthReader = Callable[[], Health]

log = get_logger("dashboard")

# Scripts and styles come only from this server's files: nothing inline, no CDN. base-uri, form-action and
# frame-ancestors do not fall back to default-src, so they are named.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: The data contract carries prices without a currency; the shop the generator models sells in US dollars.
CURRENCY = "USD"
#: The range the page opens on, in days, ending at the newest stored date.
DEFAULT_DAYS = 30
#: The longest range served (ten years): a bound on the work one request can ask for.
MAX_DAYS = 3660
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
CSV = "text/csv; charset=utf-8"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".svg": "image/svg+xml",
}
# ASCII digits only: "\d" would also take other scripts' digits, which date.fromisoformat refuses anyway.
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class BadParameter(Exception):
    """A query parameter the dashboard cannot use: answered 400, naming the parameter."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


# --- parameters ----------------------------------------------------------------------------------------------------
def _date(query: dict[str, str], name: str) -> str | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        # fromisoformat alone also takes "20250301" and "2025-W09-6"; the KPI keys are YYYY-MM-DD only.
        if _DATE.fullmatch(value):
            date.fromisoformat(value)
            return value
    except ValueError:
        pass
    raise BadParameter(name, f"{name} must be a date written YYYY-MM-DD, got {value!r}")


def _range(query: dict[str, str]) -> tuple[str | None, str | None]:
    first, last = _date(query, "from"), _date(query, "to")
    if first is not None and last is not None and first > last:
        raise BadParameter("from", f"from ({first}) is after to ({last}): give the earlier date (YYYY-MM-DD) as from")
    return first, last


@dataclass(frozen=True)
class Period:
    """An inclusive range of calendar days."""

    first: date
    last: date

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    @property
    def previous(self) -> Period:
        """The period of equal length that ends the day before this one starts."""
        return Period(self.first - timedelta(days=self.days), self.first - timedelta(days=1))

    def dates(self) -> Iterator[str]:
        return ((self.first + timedelta(days=i)).isoformat() for i in range(self.days))

    def holds(self, day: str) -> bool:
        return self.first.isoformat() <= day <= self.last.isoformat()

    def public(self) -> dict[str, object]:
        return {"from": self.first.isoformat(), "to": self.last.isoformat(), "days": self.days}


def _days(query: dict[str, str]) -> int:
    value = query.get("days", str(DEFAULT_DAYS))
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_DAYS:
        raise BadParameter("days", f"days must be a whole number from 1 to {MAX_DAYS}, got {value!r}")
    return int(value)


def period(first: str | None, last: str | None, newest: str | None, days: int = DEFAULT_DAYS) -> Period | None:
    """The range asked for, its open ends filled: ``to`` defaults to the newest stored date (or ``from``), ``from``
    to ``days`` days up to ``to``. None when nothing is stored and no bound is given."""
    if last is None:
        last = max(first, newest) if first and newest else first or newest
    if last is None:
        return None
    end = date.fromisoformat(last)
    start = date.fromisoformat(first) if first else end - timedelta(days=days - 1)
    chosen = Period(start, end)
    if chosen.days > MAX_DAYS:
        raise BadParameter("from", f"the range spans {chosen.days} days; at most {MAX_DAYS} are served: narrow it")
    return chosen


# --- the arithmetic ------------------------------------------------------------------------------------------------
def totals(days: Sequence[OrderKpi], span: Period) -> dict[str, Any]:
    """The range's figures from the exact daily components. Customers are counted per day (the store keeps no
    customer ids), so the range figure is the average of the daily unique customers over its calendar days."""
    orders = sum(k.total_orders for k in days)
    cents = sum(k.revenue_cents for k in days)
    return {
        "total_revenue": cents_to_decimal(cents),
        "total_orders": orders,
        "total_items_sold": sum(k.total_items_sold for k in days),
        "avg_order_value": ratio(Decimal(cents) / 100, orders),
        "return_rate": ratio(sum(k.returned_orders for k in days), orders, 100),
        "avg_daily_customers": ratio(sum(k.unique_customers for k in days), span.days),
        "days_with_orders": len(days),
    }


def change(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Decimal | None]:
    """Change against the previous period: percent for amounts and counts, percentage points for the return rate;
    None when the previous period had nothing to compare with."""
    out: dict[str, Decimal | None] = {}
    for name in ("total_revenue", "total_orders", "total_items_sold", "avg_order_value", "avg_daily_customers"):
        old = Decimal(before[name])
        out[name] = ((Decimal(now[name]) - old) * 100 / old).quantize(CENT, ROUND_HALF_UP) if old else None
    out["return_rate"] = now["return_rate"] - before["return_rate"] if before["total_orders"] else None
    return out


_EMPTY_DAY = dict.fromkeys(("total_orders", "total_revenue", "total_items_sold", "return_rate", "unique_customers"))


def every_day(days: Sequence[OrderKpi], span: Period) -> list[dict[str, object]]:
    """One row per calendar day of the period, nulls on days without orders (a gap, not a zero, on the charts)."""
    by_date = {k.order_date: k for k in days}
    return [by_date[d].public() if d in by_date else {"order_date": d, **_EMPTY_DAY} for d in span.dates()]


def ranking(rows: Sequence[CategoryKpi]) -> list[dict[str, object]]:
    """Each category over the range, by revenue (largest first). An order has one date, so the sums of the daily
    distinct orders are distinct orders over the range and the return rate is exact."""
    sums: dict[str, list[int]] = {}
    for k in rows:
        s = sums.setdefault(k.category, [0, 0, 0, 0])
        s[0] += k.revenue_cents
        s[1] += k.orders
        s[2] += k.returned_orders
        s[3] += k.items
    total = sum(s[0] for s in sums.values())
    ordered = sorted(sums.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [
        {
            "rank": rank,
            "category": name,
            "revenue": cents_to_decimal(cents),
            "revenue_share": ratio(cents, total, 100),
            "orders": orders,
            "items": items,
            "avg_order_value": ratio(Decimal(cents) / 100, orders),
            "return_rate": ratio(returned, orders, 100),
        }
        for rank, (name, (cents, orders, returned, items)) in enumerate(ordered, start=1)
    ]


def trend(rows: Sequence[CategoryKpi], span: Period) -> dict[str, object]:
    """Per category, its daily revenue and return rate over every day of the period. On a day with orders, a
    category without any sold nothing: revenue 0, return rate null (no orders to rate); on a day without orders
    both are null (a gap on the chart)."""
    dates = list(span.dates())
    index = {d: i for i, d in enumerate(dates)}
    trading = {k.order_date for k in rows}
    zeros = [Decimal("0.00") if d in trading else None for d in dates]
    series: dict[str, dict[str, list[Decimal | None]]] = {}
    for k in rows:
        s = series.setdefault(k.category, {"revenue": list(zeros), "return_rate": [None] * len(dates)})
        s["revenue"][index[k.order_date]] = k.daily_revenue
        s["return_rate"][index[k.order_date]] = k.avg_return_rate
    return {"dates": dates, "series": series}


def summary(stored: Sequence[OrderKpi], rows: Sequence[CategoryKpi], span: Period) -> dict[str, object]:
    """What the page draws for ``span``: ``stored`` is every stored day (sorted), ``rows`` the range's categories."""
    now = [k for k in stored if span.holds(k.order_date)]
    before = [k for k in stored if span.previous.holds(k.order_date)]
    current, previous = totals(now, span), totals(before, span.previous)
    return {
        "currency": CURRENCY,
        "stored": {
            "first": stored[0].order_date if stored else None,
            "last": stored[-1].order_date if stored else None,
            "days": len(stored),
        },
        "range": span.public(),
        "previous": span.previous.public(),
        "totals": current,
        "previous_totals": previous,
        "change": change(current, previous),
        "daily": every_day(now, span),
        "previous_daily": every_day(before, span.previous),
        "categories": ranking(rows),
        "category_trend": trend(rows, span),
    }


def to_csv(rows: Sequence[dict[str, object]], name: str) -> Response:
    """Rows as a CSV download: the API's field names as the header, numbers as the API writes them."""
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return Response(200, out.getvalue().encode(), CSV, {"Content-Disposition": f'attachment; filename="{name}.csv"'})


# --- serving -------------------------------------------------------------------------------------------------------
def static_files(root: Traversable | None = None, prefix: str = "/static/") -> dict[str, Response]:
    """The page's files by URL path, read once from the package (``shopkpi/static/``, package data)."""
    root = root or resources.files("shopkpi") / "static"
    found: dict[str, Response] = {}
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_dir():
            found |= static_files(entry, f"{prefix}{entry.name}/")
        elif suffix in _TYPES:
            found[prefix + entry.name] = Response(200, entry.read_bytes(), _TYPES[suffix])
    return found


def _error(status: int, api: bool, fields: dict[str, str]) -> Response:
    """A JSON object for the API, its message as text for the page (what a browser shows)."""
    return Response(status, to_json(fields), JSON) if api else Response(status, f"{fields['message']}\n".encode(), TEXT)


def _json(value: object) -> Response:
    return Response(200, to_json(value), JSON)


def make_router(
    daily: DailyReader, category: CategoryReader, health: HealthReader | None = None
) -> Callable[[str, dict[str, str]], Response]:
    """The dashboard's answers by path and query, without the HTTP server (which adds headers and errors)."""
    files = static_files()

    def span_of(query: dict[str, str]) -> tuple[list[OrderKpi], Period | None]:
        first, last = _range(query)
        days = _days(query)
        stored = daily(None, None)
        return stored, period(first, last, stored[-1].order_date if stored else None, days)

    def range_categories(span: Period | None) -> list[CategoryKpi]:
        return category(None, span.first.isoformat(), span.last.isoformat()) if span else []

    def day_categories(query: dict[str, str]) -> tuple[str | None, list[CategoryKpi]]:
        day = _date(query, "date")
        return day, category(None, day, day) if day else []

    def route(path: str, query: dict[str, str]) -> Response:
        if path in ("/", "/index.html"):
            # A bad link is refused here, with the message a person reads, not left to the script.
            _range(query)
            _days(query)
            _date(query, "date")
            return files["/static/index.html"]
        if path in files:
            return files[path]
        if path == "/api/daily":
            return _json([k.public() for k in daily(*_range(query))])
        if path == "/api/daily.csv":
            first, last = _range(query)
            return to_csv([k.public() for k in daily(first, last)], f"shopkpi-daily-{first or 'all'}-{last or 'all'}")
        if path == "/api/category":
            return _json([k.public() for k in day_categories(query)[1]])
        if path == "/api/category.csv":
            day, rows = day_categories(query)
            return to_csv([k.public() for k in rows], f"shopkpi-categories-{day or 'none'}")
        if path == "/api/summary":
            stored, span = span_of(query)
            return _json(summary(stored, range_categories(span), span) if span else {"currency": CURRENCY})
        if path == "/api/categories.csv":
            _, span = span_of(query)
            name = f"shopkpi-category-ranking-{span.first}-{span.last}" if span else "shopkpi-category-ranking"
            return to_csv(ranking(range_categories(span)), name)
        if path == "/api/health":
            if health is None:
                return _error(404, True, {"error": "unavailable", "message": "this dashboard has no health reader"})
            return _json(health())
        return Response(404, b"not found", TEXT)

    return route


def make_server(
    host: str, port: int, daily: DailyReader, category: CategoryReader, health: HealthReader | None = None
) -> ThreadingHTTPServer:
    route = make_router(daily, category, health)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet: stdout is for the URL
            pass

        def end_headers(self) -> None:
            # Here rather than in _send: the http.server's own answers (501 for POST, 400 for a bad request line)
            # pass through end_headers too, and get the headers as well.
            self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            self.send_header("X-Content-Type-Options", "nosniff")
            super().end_headers()

        def _answer(self) -> Response:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            api = url.path.startswith("/api/")
            try:
                return route(url.path, query)
            except BadParameter as e:
                return _error(400, api, {"error": "bad_parameter", "parameter": e.parameter, "message": e.message})
            except Exception as e:
                # Answered, not a dropped connection: the user sees a status, the log keeps the traceback.
                log.error("dashboard.failed", exc_info=True, path=url.path, error=type(e).__name__)
                message = "could not read the KPIs; the dashboard's log has the details"
                return _error(500, api, {"error": "internal", "message": message})

        def _send(self, with_body: bool) -> None:
            answer = self._answer()
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            # The figures change as files arrive: the page's polls must reach the server, never a cache.
            self.send_header("Cache-Control", "no-store")
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if with_body:
                self.wfile.write(answer.body)

        def do_GET(self) -> None:
            self._send(with_body=True)

        def do_HEAD(self) -> None:
            self._send(with_body=False)

    return ThreadingHTTPServer((host, port), Handler)


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    """Serve on a background thread while the block runs (its base URL), then shut the server down."""
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
