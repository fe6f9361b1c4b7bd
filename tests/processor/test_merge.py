"""The incremental merge under the failures SPEC section 3 names: late, repeated, conflicting and split deliveries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from processor.merge import STATE_KEY, load_state, merge
from processor.model import CategoryKpi, OrderKpi
from processor.pipeline import LocalRun, all_kpis, process_local, stage_local
from processor.settings import Settings
from processor.store import LocalStore
from tests.processor.conftest import WriteCsv, item, order, product


def run(paths: list[Path], staging: Path, settings: Settings) -> LocalRun:
    return process_local(paths, staging, settings)


def test_late_order_file_completes_pending_items(write_csv: WriteCsv, tmp_path: Path, settings: Settings) -> None:
    staging = tmp_path / "staging"
    first = run(
        [
            write_csv("products.csv", [product(1, "Books")]),
            write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00"), item(2, 10, 100, 1, "6.00")]),
        ],
        staging,
        settings,
    )
    assert first.daily == [] and first.merge.pending == {"waiting_order": 2}
    second = run([write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")])], staging, settings)
    assert second.merge.pending == {}
    assert second.merge.dates == ["2025-03-01"]
    [k] = second.daily
    assert (k.total_orders, k.total_items_sold, k.total_revenue) == (1, 2, Decimal("10.00"))


def test_late_product_file_completes_pending_items(write_csv: WriteCsv, tmp_path: Path, settings: Settings) -> None:
    staging = tmp_path / "staging"
    first = run(
        [
            write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
            write_csv("order_items.csv", [item(1, 10, 100, 7, "4.00")]),
        ],
        staging,
        settings,
    )
    assert first.daily[0].total_items_sold == 0 and first.category == []
    assert first.merge.pending == {"waiting_product": 1}
    second = run([write_csv("products.csv", [product(7, "Garden")])], staging, settings)
    assert [(c.category, c.daily_revenue) for c in second.category] == [("Garden", Decimal("4.00"))]
    assert second.daily[0].total_items_sold == 1


def test_duplicate_delivery_changes_nothing(write_csv: WriteCsv, tmp_path: Path, settings: Settings) -> None:
    staging = tmp_path / "staging"
    files = [
        write_csv("products.csv", [product(1, "Books")]),
        write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
        write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00")]),
    ]
    first = run(files, staging, settings)
    # The same files again, and a copy of the items file under another name (a re-export): same KPIs.
    copy = write_csv("order_items_copy.csv", [item(1, 10, 100, 1, "4.00")], folder="again")
    second = run([*files, copy], staging, settings)
    assert second.daily == first.daily and second.category == first.category
    assert second.merge.dates == []  # the copy's rows equal the staged ones: no date changed
    assert second.merge.conflicts == 0


def test_later_file_wins_on_conflicting_key_and_conflict_is_counted(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    run(
        [
            write_csv("products.csv", [product(1, "Books")]),
            write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
            write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00")]),
        ],
        staging,
        settings,
    )
    later = run(
        [
            write_csv("order_items_fix.csv", [item(1, 10, 100, 1, "5.00", status="returned")], folder="b"),
            write_csv("orders_fix.csv", [order(10, 100, "2025-03-02T08:00:00")], folder="b"),
        ],
        staging,
        settings,
    )
    assert later.merge.conflicts == 2
    assert sorted(later.merge.dates) == ["2025-03-01", "2025-03-02"]  # the order moved: both dates recomputed
    assert [(k.order_date, k.total_revenue) for k in later.daily] == [("2025-03-02", Decimal("5.00"))]
    assert later.category[0].avg_return_rate == Decimal("100.00")


def test_product_recategorised_moves_revenue_between_categories(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    run(
        [
            write_csv("products.csv", [product(1, "Books")]),
            write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
            write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00")]),
        ],
        staging,
        settings,
    )
    r = run([write_csv("products_v2.csv", [product(1, "Comics")], folder="b")], staging, settings)
    assert [c.category for c in r.category] == ["Comics"]


def test_files_split_in_parts_give_the_same_kpis_as_one_file(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    orders = [order(i, 100 + i % 7, f"2025-03-0{1 + i % 3}T08:00:00") for i in range(1, 40)]
    items = [item(i, 1 + i % 39, 100 + (1 + i % 39) % 7, 1 + i % 2, f"{i}.25") for i in range(1, 90)]
    products = [product(1, "Books"), product(2, "Toys")]
    whole = run(
        [
            write_csv("products.csv", products),
            write_csv("orders.csv", orders),
            write_csv("order_items.csv", items),
        ],
        tmp_path / "a",
        settings,
    )
    parts = [write_csv(f"order_items_part{i}.csv", items[i::3], folder="p") for i in range(3)]
    parts += [write_csv(f"orders_part{i}.csv", orders[i::2], folder="p") for i in range(2)]
    parts.append(write_csv("products.csv", products, folder="p"))
    split = run(parts, tmp_path / "b", settings)
    assert split.daily == whole.daily and split.category == whole.category


def test_crash_before_state_pointer_moves_is_repaired_by_next_merge(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    run(
        [
            write_csv("products.csv", [product(1, "Books")]),
            write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
        ],
        staging,
        settings,
    )
    store = LocalStore(staging)
    stage_local([write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00")])], store, settings, tmp_path / "w")
    before = store.get_bytes(STATE_KEY)

    def crash(*_: object) -> int:
        raise RuntimeError("killed while publishing")

    with pytest.raises(RuntimeError):
        merge(store, buckets=4, generation=0, scratch=tmp_path / "m", publish=crash)
    assert store.get_bytes(STATE_KEY) == before  # the pointer did not move: nothing half-done is in force
    published: list[tuple[int, int]] = []

    def keep(daily: list[OrderKpi], category: list[CategoryKpi], generation: int) -> int:
        published.append((generation, len(daily)))
        return len(daily) + len(category)

    result, daily, _ = merge(store, buckets=4, generation=0, scratch=tmp_path / "m", publish=keep)
    assert published == [(result.generation, 1)]
    assert result.dates == ["2025-03-01"]  # the same dates found again, since the old partials are still current
    assert daily[0].total_revenue == Decimal("4.00")


def test_reprocessing_unchanged_inputs_recomputes_nothing(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    first = run(
        [
            write_csv("products.csv", [product(1, "Books")]),
            write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
            write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00")]),
        ],
        staging,
        settings,
    )
    store = LocalStore(staging)
    gen = load_state(store).generation
    result, daily, category = merge(
        store, buckets=4, generation=0, scratch=tmp_path / "m", force_dates=("2025-03-01", "2025-03-31")
    )
    assert result.buckets_recomputed == 0 and result.dates == ["2025-03-01"]
    assert daily == first.daily and category == first.category
    assert load_state(store).generation == gen  # no new partials: the state pointer did not move
    assert all_kpis(store) == (first.daily, first.category)


def test_items_waiting_past_the_grace_period_are_reported_as_orphans(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    run([write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00")])], staging, settings)
    store = LocalStore(staging)
    soon, _, _ = merge(store, buckets=4, generation=0, scratch=tmp_path / "m", orphan_grace_s=3600)
    assert soon.orphans == {}
    later = datetime.now(UTC) + timedelta(hours=2)
    result, _, _ = merge(store, buckets=4, generation=0, scratch=tmp_path / "m", orphan_grace_s=3600, now=later)
    assert result.orphans == {"orphan_order": 1}
    assert result.pending == {"waiting_order": 1}  # reported, never dropped: it still counts if the order comes
