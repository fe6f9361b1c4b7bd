"""The KPI definitions of SPEC section 3, each on a case small enough to check by hand."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

from processor.model import CategoryKpi, OrderKpi, ratio
from processor.pipeline import LocalRun, process_local
from processor.settings import Settings
from tests.builders import WriteCsv, item, order, product


def run(paths: list[Path], tmp_path: Path, settings: Settings) -> LocalRun:
    return process_local(paths, tmp_path / "staging", settings)


def daily_of(r: LocalRun) -> dict[str, OrderKpi]:
    return {k.order_date: k for k in r.daily}


def category_of(r: LocalRun) -> dict[tuple[str, str], CategoryKpi]:
    return {(k.category, k.order_date): k for k in r.category}


def test_order_level_kpis_of_one_day(write_csv: WriteCsv, tmp_path: Path, settings: Settings) -> None:
    files = [
        write_csv("products.csv", [product(1, "Books"), product(2, "Toys")]),
        write_csv(
            "orders.csv",
            [
                order(10, 100, "2025-03-01T08:00:00"),
                order(11, 100, "2025-03-01T09:00:00", status="returned"),
                order(12, 200, "2025-03-01T10:00:00", returned_at="2025-03-05T00:00:00"),  # returned by timestamp
                order(13, 300, "2025-03-01T11:00:00"),  # no items: counts as an order with no revenue
            ],
        ),
        write_csv(
            "order_items.csv",
            [
                item(1, 10, 100, 1, "10.10"),
                item(2, 10, 100, 2, "0.05"),
                item(3, 11, 100, 1, "5.00"),
                item(4, 12, 200, 2, "1.00"),
            ],
        ),
    ]
    k = daily_of(run(files, tmp_path, settings))["2025-03-01"]
    assert (k.total_orders, k.unique_customers, k.total_items_sold) == (4, 3, 4)
    assert k.total_revenue == Decimal("16.15")
    assert k.return_rate == Decimal("50.00")


def test_an_item_belongs_to_its_orders_utc_date_not_its_own(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    files = [
        write_csv("products.csv", [product(1, "Books")]),
        write_csv("orders.csv", [order(10, 100, "2025-03-01T22:00:00-05:00")]),  # 2025-03-02 03:00 UTC
        write_csv("order_items.csv", [item(1, 10, 100, 1, "3.00", created_at="2025-03-01T00:00:00")]),
    ]
    r = run(files, tmp_path, settings)
    assert list(daily_of(r)) == ["2025-03-02"]
    assert list(category_of(r)) == [("Books", "2025-03-02")]


def test_category_kpis_count_distinct_orders_and_item_returns(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    files = [
        write_csv("products.csv", [product(1, "Books"), product(2, "Books"), product(3, "Toys")]),
        write_csv(
            "orders.csv",
            [
                order(10, 100, "2025-03-01T08:00:00"),
                order(11, 101, "2025-03-01T09:00:00"),
                order(12, 102, "2025-03-01T10:00:00"),
            ],
        ),
        write_csv(
            "order_items.csv",
            [
                item(1, 10, 100, 1, "10.00"),
                item(2, 10, 100, 2, "5.00", status="returned"),  # returned item: order 10 counts as returned
                item(3, 11, 101, 1, "20.00"),
                item(4, 12, 102, 3, "7.00", returned_at="2025-03-03T00:00:00"),
            ],
        ),
    ]
    c = category_of(run(files, tmp_path, settings))
    books = c[("Books", "2025-03-01")]
    assert (books.orders, books.returned_orders, books.items) == (2, 1, 3)
    assert books.daily_revenue == Decimal("35.00")
    assert books.avg_order_value == Decimal("17.50")
    assert books.avg_return_rate == Decimal("50.00")
    toys = c[("Toys", "2025-03-01")]
    assert (toys.avg_return_rate, toys.avg_order_value) == (Decimal("100.00"), Decimal("7.00"))


def test_rates_and_averages_round_half_up_only_when_shown() -> None:
    assert ratio(1, 3, 100) == Decimal("33.33")
    assert ratio(2, 3, 100) == Decimal("66.67")
    assert ratio(1, 8, 100) == Decimal("12.50")
    assert ratio(Decimal("0.125"), 1) == Decimal("0.13")  # half-up, not banker's rounding
    assert ratio(5, 0, 100) == Decimal("0.00")
    k = CategoryKpi(category="x", order_date="2025-03-01", orders=3, returned_orders=1, items=3, revenue_cents=1000)
    assert k.avg_order_value == Decimal("3.33") and k.revenue_cents == 1000  # exact component kept


def test_money_sums_are_exact_over_many_cents(write_csv: WriteCsv, tmp_path: Path, settings: Settings) -> None:
    # 0.10 added 3000 times is 300.00 exactly; a float sum drifts.
    files = [
        write_csv("products.csv", [product(1, "Books")]),
        write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
        write_csv("order_items.csv", [item(i, 10, 100, 1, "0.10") for i in range(1, 3001)]),
    ]
    k = daily_of(run(files, tmp_path, settings))["2025-03-01"]
    assert k.total_revenue == Decimal("300.00") and k.revenue_cents == 30000


def test_item_with_other_user_than_its_order_is_rejected_at_merge(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    files = [
        write_csv("products.csv", [product(1, "Books")]),
        write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
        write_csv("order_items.csv", [item(1, 10, 100, 1, "1.00"), item(2, 10, 999, 1, "2.00")]),
    ]
    r = run(files, tmp_path, settings)
    assert daily_of(r)["2025-03-01"].total_revenue == Decimal("1.00")
    assert r.merge.late_rejects == {"user_mismatch": 1}


def test_files_in_key_order_and_shuffled_give_the_same_kpis(write_csv: WriteCsv, tmp_path: Path) -> None:
    # Rows in key order take polars' merge join (processor.kpis.in_key_order); shuffled ones its hash join. Items
    # whose order is missing wait, and items naming another user than their order are rejected, either way.
    rng = random.Random(7)
    products = [product(p, f"cat{p % 3}") for p in range(1, 6)]
    orders = [
        order(o, o % 17, f"2025-03-{1 + o % 5:02d}T10:00:00", status=rng.choice(["complete", "returned"]))
        for o in range(1, 301)
    ]
    items = [
        item(
            i,
            rng.randint(1, 330),
            rng.choice([0, 1, 2]) if i % 50 == 0 else 0,
            rng.randint(1, 6),
            f"{rng.randint(1, 9999) / 100:.2f}",
        )
        for i in range(1, 901)
    ]
    for it in items:  # the user of the order, but for every 50th item (a mismatch, or an order that is missing)
        if it["id"] % 50 and it["order_id"] <= 300:
            it["user_id"] = it["order_id"] % 17
    items.sort(key=lambda r: (r["order_id"], r["id"]))
    runs = []
    for name, shuffle in (("sorted", False), ("shuffled", True)):
        o, i = list(orders), list(items)
        if shuffle:
            rng.shuffle(o)
            rng.shuffle(i)
        files = [
            write_csv("products.csv", products, folder=name),
            write_csv("orders.csv", o, folder=name),
            write_csv("order_items.csv", i, folder=name),
        ]
        settings = Settings.load(env={}, buckets=4, work_dir=tmp_path / name / "work")
        runs.append(process_local(files, tmp_path / name / "staging", settings))
    (a, b) = runs
    assert a.daily == b.daily and a.category == b.category
    assert a.merge.pending == b.merge.pending and a.merge.late_rejects == b.merge.late_rejects
    assert a.merge.pending and a.merge.late_rejects  # the case has both
