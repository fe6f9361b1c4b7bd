"""``shopkpi dashboard``: a small read-only KPI dashboard over the DynamoDB tables (the brief's bonus).

Server-side rendered HTML (no JavaScript, no build step): daily order KPIs with an SVG revenue chart, and the
category KPIs of one day; plus JSON endpoints for tools. It reads through the same adapter as ``shopkpi kpis``.

    GET /                          the page (``?date=YYYY-MM-DD`` picks the day of the category table)
    GET /api/daily?from=&to=       order-level KPIs (the objects of ``kpis daily --json``)
    GET /api/category?date=        category-level KPIs of one date
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable, Sequence
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import orjson

from processor.model import CategoryKpi, OrderKpi

DailyReader = Callable[[str | None, str | None], list[OrderKpi]]
CategoryReader = Callable[[str | None, str | None, str | None], list[CategoryKpi]]


def _json(value: object) -> bytes:
    return orjson.dumps(value, default=lambda d: float(d) if isinstance(d, Decimal) else str(d))


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
            f"<title>{k.order_date}: {k.total_revenue:,}</title></rect>"
        )
    return f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="daily revenue">{"".join(bars)}</svg>'


def render_page(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi], day: str | None) -> str:
    rows = "".join(
        f"<tr><td><a href='/?date={k.order_date}'>{k.order_date}</a></td><td>{k.total_orders:,}</td>"
        f"<td>{k.total_revenue:,}</td><td>{k.total_items_sold:,}</td><td>{k.return_rate}</td>"
        f"<td>{k.unique_customers:,}</td></tr>"
        for k in daily
    )
    cats = "".join(
        f"<tr><td>{html.escape(k.category)}</td><td>{k.daily_revenue:,}</td><td>{k.avg_order_value:,}</td>"
        f"<td>{k.avg_return_rate}</td></tr>"
        for k in category
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>shopkpi dashboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2rem; }}
td, th {{ padding: .25rem .75rem; border-bottom: 1px solid #ddd; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
svg rect {{ fill: #3b6ea5; }} svg {{ width: 100%; max-width: 900px; }}
</style></head><body>
<h1>shopkpi</h1>
<h2>Daily revenue</h2>{_chart(daily)}
<h2>Order KPIs per day</h2>
<table><tr><th>order_date</th><th>total_orders</th><th>total_revenue</th><th>total_items_sold</th>
<th>return_rate %</th><th>unique_customers</th></tr>{rows}</table>
<h2>Category KPIs of {html.escape(day or "-")}</h2>
<table><tr><th>category</th><th>daily_revenue</th><th>avg_order_value</th><th>avg_return_rate %</th></tr>{cats}</table>
</body></html>"""


def make_server(host: str, port: int, daily: DailyReader, category: CategoryReader) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet: stdout is for the URL
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/api/daily":
                self._send(200, _json([k.public() for k in daily(q.get("from"), q.get("to"))]), "application/json")
            elif url.path == "/api/category":
                day = q.get("date")
                found = category(None, day, day) if day else []
                self._send(200, _json([k.public() for k in found]), "application/json")
            elif url.path == "/":
                days = daily(None, None)
                day = q.get("date") or (days[-1].order_date if days else None)
                page = render_page(days, category(None, day, day) if day else [], day)
                self._send(200, page.encode(), "text/html; charset=utf-8")
            else:
                self._send(404, b"not found", "text/plain")

    return ThreadingHTTPServer((host, port), Handler)


def serve(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    return thread
