"""``shopkpi dashboard``: a small read-only KPI dashboard over the DynamoDB tables (the brief's bonus).

Server-side rendered HTML (no JavaScript, no build step): daily order KPIs with an SVG revenue chart, and the
category KPIs of one day; plus JSON endpoints for tools. It reads through the same adapter as ``shopkpi kpis``.

    GET /                          the page (``?date=YYYY-MM-DD`` picks the day of the category table)
    GET /dashboard.css             its stylesheet (a file, not inline, so the CSP needs no 'unsafe-inline')
    GET /api/daily?from=&to=       order-level KPIs (the objects of ``kpis daily --json``)
    GET /api/category?date=        category-level KPIs of one date

HEAD answers the same headers without the body. A malformed date, or ``from`` after ``to``, is a 400 naming the
parameter; every response carries the Content-Security-Policy and ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Sequence
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from processor.log import get_logger
from processor.model import CategoryKpi, OrderKpi, to_json

DailyReader = Callable[[str | None, str | None], list[OrderKpi]]
CategoryReader = Callable[[str | None, str | None, str | None], list[CategoryKpi]]

log = get_logger("dashboard")

# The page has no script and takes its style from /dashboard.css: nothing inline needs allowing. base-uri,
# form-action and frame-ancestors do not fall back to default-src, so they are named.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
STYLE = b"""body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin-bottom: 2rem; }
td, th { padding: .25rem .75rem; border-bottom: 1px solid #ddd; text-align: right; }
td:first-child, th:first-child { text-align: left; }
svg rect { fill: #3b6ea5; } svg { width: 100%; max-width: 900px; }
"""
JSON = "application/json"
# ASCII digits only: "\d" would also take other scripts' digits, which date.fromisoformat refuses anyway.
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class BadParameter(Exception):
    """A query parameter the dashboard cannot use: answered 400, naming the parameter."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


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


def _chart(daily: Sequence[OrderKpi], width: int = 900, height: int = 180) -> str:
    if not daily:
        return "<p>No KPIs yet.</p>"
    top = max(k.revenue_cents for k in daily) or 1
    bar = width / len(daily)
    bars = []
    for i, k in enumerate(daily):
        h = round(k.revenue_cents / top * (height - 20))
        bars.append(
            f'<rect x="{i * bar + 1:.1f}" y="{height - h}" width="{max(bar - 2, 1):.1f}" height="{h}">'
            f"<title>{html.escape(k.order_date)}: {k.total_revenue:,}</title></rect>"
        )
    return f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="daily revenue">{"".join(bars)}</svg>'


def render_page(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi], day: str | None) -> str:
    rows = "".join(
        f"<tr><td><a href='/?date={html.escape(k.order_date)}'>{html.escape(k.order_date)}</a></td>"
        f"<td>{k.total_orders:,}</td><td>{k.total_revenue:,}</td><td>{k.total_items_sold:,}</td>"
        f"<td>{k.return_rate}</td><td>{k.unique_customers:,}</td></tr>"
        for k in daily
    )
    cats = "".join(
        f"<tr><td>{html.escape(k.category)}</td><td>{k.daily_revenue:,}</td><td>{k.avg_order_value:,}</td>"
        f"<td>{k.avg_return_rate}</td></tr>"
        for k in category
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>shopkpi dashboard</title>
<link rel="stylesheet" href="/dashboard.css">
</head><body>
<h1>shopkpi</h1>
<h2>Daily revenue</h2>{_chart(daily)}
<h2>Order KPIs per day</h2>
<table><tr><th>order_date</th><th>total_orders</th><th>total_revenue</th><th>total_items_sold</th>
<th>return_rate %</th><th>unique_customers</th></tr>{rows}</table>
<h2>Category KPIs of {html.escape(day or "-")}</h2>
<table><tr><th>category</th><th>daily_revenue</th><th>avg_order_value</th><th>avg_return_rate %</th></tr>{cats}</table>
</body></html>"""


Response = tuple[int, bytes, str]  # status, body, Content-Type
TEXT = "text/plain; charset=utf-8"


def _error(status: int, api: bool, fields: dict[str, str]) -> Response:
    """A JSON object for the API, its message as text for the page (what a browser shows)."""
    return (status, to_json(fields), JSON) if api else (status, f"{fields['message']}\n".encode(), TEXT)


def make_server(host: str, port: int, daily: DailyReader, category: CategoryReader) -> ThreadingHTTPServer:
    def route(path: str, query: dict[str, str]) -> Response:
        if path == "/api/daily":
            first, last = _range(query)
            return 200, to_json([k.public() for k in daily(first, last)]), JSON
        if path == "/api/category":
            day = _date(query, "date")
            return 200, to_json([k.public() for k in category(None, day, day)] if day else []), JSON
        if path == "/":
            day = _date(query, "date")
            days = daily(None, None)
            day = day or (days[-1].order_date if days else None)
            page = render_page(days, category(None, day, day) if day else [], day)
            return 200, page.encode(), "text/html; charset=utf-8"
        if path == "/dashboard.css":
            return 200, STYLE, "text/css; charset=utf-8"
        return 404, b"not found", TEXT

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
            status, body, content_type = self._answer()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._send(with_body=True)

        def do_HEAD(self) -> None:
            self._send(with_body=False)

    return ThreadingHTTPServer((host, port), Handler)


def serve(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    return thread
