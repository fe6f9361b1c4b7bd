"""Small builders for case files: tests write exactly the rows they reason about."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from processor.schema import DATASETS
from processor.settings import Settings

WriteCsv = Callable[..., Path]


@pytest.fixture
def write_csv(tmp_path: Path) -> WriteCsv:
    """``write_csv("orders_part1.csv", [{"order_id": 1, ...}, ...])``: every column of the dataset, blanks for None."""

    def write(name: str, rows: Sequence[dict[str, object]], folder: str = "in") -> Path:
        dataset = next(DATASETS[n] for n in sorted(DATASETS, key=len, reverse=True) if name.startswith(n))
        path = tmp_path / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [",".join(dataset.names)]
        for r in rows:
            lines.append(",".join("" if r.get(c) is None else str(r[c]) for c in dataset.names))
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.load(env={}, buckets=4, work_dir=tmp_path / "work")


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
