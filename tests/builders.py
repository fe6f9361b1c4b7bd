"""Builders of small case files, shared by the test packages: tests write exactly the rows they reason about.

``order``, ``item`` and ``product`` build one row as a dict (columns left out are blank); :func:`write_rows` writes
rows as a CSV of their dataset. The ``write_csv`` fixture (tests/conftest.py) is :func:`write_rows` under the test's
temporary directory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from processor.model import OrderKpi
from processor.schema import DATASETS

#: The ``write_csv`` fixture: ``write_csv("orders_part1.csv", rows, folder="in") -> path``.
WriteCsv = Callable[..., Path]


def write_rows(folder: Path, name: str, rows: Sequence[dict[str, object]]) -> Path:
    """``folder/name``, a CSV of the dataset the name starts with: every column of the dataset, blanks for None."""
    dataset = next(DATASETS[n] for n in sorted(DATASETS, key=len, reverse=True) if name.startswith(n))
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(dataset.names)]
    for r in rows:
        lines.append(",".join("" if r.get(c) is None else str(r[c]) for c in dataset.names))
    path.write_text("\n".join(lines) + "\n")
    return path


def order(order_id: int, user_id: int, created: str, status: str = "complete", **kw: object) -> dict[str, object]:
    return {
        "order_id": order_id,
        "user_id": user_id,
        "status": status,
        "created_at": created,
        "num_of_item": 1,
        **kw,
    }


def item(
    item_id: int,
    order_id: int,
    user_id: int,
    product_id: int,
    price: str,
    status: str = "complete",
    **kw: object,
) -> dict[str, object]:
    return {
        "id": item_id,
        "order_id": order_id,
        "user_id": user_id,
        "product_id": product_id,
        "status": status,
        "created_at": "2025-03-01T00:00:00",
        "sale_price": price,
        **kw,
    }


def product(product_id: int, category: str, price: str = "10.00") -> dict[str, object]:
    return {"id": product_id, "category": category, "retail_price": price, "name": f"p{product_id}"}


def day_kpi(order_date: str, orders: int, returned: int, items: int, cents: int, customers: int) -> OrderKpi:
    """One day's order KPIs from their components (revenue in cents)."""
    return OrderKpi(
        order_date=order_date,
        total_orders=orders,
        returned_orders=returned,
        total_items_sold=items,
        revenue_cents=cents,
        unique_customers=customers,
    )


#: A day whose revenue (10,000,000,000,000,050.05) no binary float holds exactly: what ``--json`` and the dashboard's
#: API must print digit for digit.
BIG_DAY = day_kpi("2025-04-01", orders=3, returned=1, items=3, cents=1_000_000_000_000_005_005, customers=3)
