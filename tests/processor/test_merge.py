"""The incremental merge under the failures SPEC section 3 names: late, repeated, conflicting and split deliveries."""

from __future__ import annotations

import csv
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from processor import apply
from processor.keyed import KeyedTable, TableFile
from processor.kpis import HASH
from processor.merge import Publication, merge
from processor.pipeline import LocalRun, process_local, stage_local
from processor.settings import Settings
from processor.stage import committed_segments, scan_segment
from processor.state import HEAD_KEY, current_kpis, load_head
from processor.steps import bucket_load, bucket_steps
from processor.store import LocalStore
from tests.builders import WriteCsv, day_kpi, item, order, product
from tests.processor.test_invariant import KpiTable


def run(paths: list[Path], staging: Path, settings: Settings) -> LocalRun:
    return process_local(paths, staging, settings)


def one_order(write_csv: WriteCsv) -> list[Path]:
    """A shop of one book, one order of 2025-03-01 and one item of 4.00."""
    return [
        write_csv("products.csv", [product(1, "Books")]),
        write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
        write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00")]),
    ]


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
    run(one_order(write_csv), staging, settings)
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
    run(one_order(write_csv), staging, settings)
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


def test_crash_before_the_head_moves_is_repaired_by_next_merge(
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
    before = store.get_bytes(HEAD_KEY)

    def crash(*_: object) -> int:
        raise RuntimeError("killed while publishing")

    with pytest.raises(RuntimeError):
        merge(store, generation=0, scratch=tmp_path / "m", publish=crash)
    assert store.get_bytes(HEAD_KEY) == before  # the head did not move: nothing half-done is in force
    published: list[Publication] = []

    def keep(pub: Publication, generation: int) -> int:
        published.append(pub)
        return len(pub.daily) + len(pub.category)

    result, daily, _ = merge(store, generation=0, scratch=tmp_path / "m", publish=keep)
    assert [[k.order_date for k in p.daily] for p in published] == [["2025-03-01"]]
    assert result.dates == ["2025-03-01"]  # the same delivery applied again from the old head
    assert daily[0].total_revenue == Decimal("4.00")
    assert current_kpis(store)[0] == daily


def test_reprocessing_unchanged_inputs_recomputes_nothing(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    first = run(
        one_order(write_csv),
        staging,
        settings,
    )
    store = LocalStore(staging)
    head = store.get_bytes(HEAD_KEY)
    result, daily, category = merge(
        store, generation=0, scratch=tmp_path / "m", force_dates=("2025-03-01", "2025-03-31")
    )
    assert result.groups_recomputed == 0 and result.dates == ["2025-03-01"]
    assert daily == first.daily and category == first.category
    assert store.get_bytes(HEAD_KEY) == head  # nothing new: the head did not move
    assert current_kpis(store) == (first.daily, first.category)


def test_items_waiting_past_the_grace_period_are_reported_as_orphans(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    run([write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00")])], staging, settings)
    store = LocalStore(staging)
    soon, _, _ = merge(store, generation=0, scratch=tmp_path / "m", orphan_grace_s=3600)
    assert soon.orphans == {}
    later = datetime.now(UTC) + timedelta(hours=2)
    result, _, _ = merge(store, generation=0, scratch=tmp_path / "m", orphan_grace_s=3600, now=later)
    assert result.orphans == {"orphan_order": 1}
    assert result.pending == {"waiting_order": 1}  # reported, never dropped: it still counts if the order comes


def test_item_resent_under_another_order_counts_once_in_its_new_order(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    run(
        [
            write_csv("products.csv", [product(1, "Jewelry")]),
            write_csv("orders.csv", [order(1, 100, "2025-03-01T08:00:00"), order(2, 100, "2025-03-01T09:00:00")]),
            write_csv("order_items_1.csv", [item(1, 1, 100, 1, "10.00")]),
        ],
        staging,
        settings,
    )
    r = run([write_csv("order_items_2.csv", [item(1, 2, 100, 1, "10.00")])], staging, settings)
    [k] = r.daily
    assert (k.total_items_sold, k.total_revenue) == (1, Decimal("10.00"))
    assert r.merge.conflicts == 1  # the same item id with another order_id: logged, the later file wins
    [c] = r.category
    assert (c.orders, c.items) == (1, 1)


def test_vanished_groups_are_published_as_removals(write_csv: WriteCsv, tmp_path: Path, settings: Settings) -> None:
    staging = tmp_path / "staging"
    run(one_order(write_csv), staging, settings)
    store = LocalStore(staging)
    stage_local(
        [
            write_csv("products_v2.csv", [product(1, "Comics")], folder="b"),
            write_csv("orders_v2.csv", [order(10, 100, "2025-03-05T08:00:00")], folder="b"),
        ],
        store,
        settings,
        tmp_path / "w",
    )
    seen: list[Publication] = []

    def publish(publication: Publication, generation: int) -> int:
        seen.append(publication)
        return 0

    merge(store, generation=0, scratch=tmp_path / "m", publish=publish)
    [pub] = seen
    assert pub.gone_daily == ["2025-03-01"] and pub.gone_category == [("Books", "2025-03-01")]
    assert [(k.order_date, k.total_orders) for k in pub.daily] == [("2025-03-05", 1)]
    assert [(c.category, c.order_date) for c in pub.category] == [("Comics", "2025-03-05")]


def test_rows_rejected_at_merge_time_are_kept_with_file_line_reason_and_values(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    items_file = write_csv("order_items.csv", [item(1, 10, 100, 1, "1.00"), item(2, 10, 999, 1, "2.50")])
    r = run(
        [
            write_csv("products.csv", [product(1, "Books")]),
            write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]),
            items_file,
        ],
        staging,
        settings,
    )
    assert r.merge.late_rejects == {"user_mismatch": 1}
    [report] = load_head(LocalStore(staging)).rejects
    rows = list(csv.DictReader((staging / report).open()))
    assert [(row["source"], row["_line"], row["_reason"], row["_column"]) for row in rows] == [
        (str(items_file.resolve()), "3", "user_mismatch", "user_id")
    ]
    assert (rows[0]["user_id"], rows[0]["order_user_id"], rows[0]["sale_price"]) == ("999", "100", "2.5")
    # The order is corrected to the item's user: the item counts, and the state no longer holds a reject.
    fixed = run([write_csv("orders_fix.csv", [order(10, 999, "2025-03-01T08:00:00")], folder="b")], staging, settings)
    assert fixed.merge.late_rejects == {"user_mismatch": 1}  # now item 1 disagrees with its order's new user
    assert fixed.daily[0].total_revenue == Decimal("2.50")


def test_merge_applies_only_the_delivery_and_compacts_as_it_grows(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    run([write_csv("products.csv", [product(1, "Books")])], staging, settings)
    for n in range(1, 13):
        r = run(
            [
                write_csv(f"orders_{n}.csv", [order(n, 100 + n, f"2025-03-{n:02d}T08:00:00")], folder=f"d{n}"),
                write_csv(f"order_items_{n}.csv", [item(n, n, 100 + n, 1, "1.00")], folder=f"d{n}"),
            ],
            staging,
            settings,
        )
        assert r.merge.files_merged == 2 and r.merge.groups_recomputed == 1
    head = load_head(LocalStore(staging))
    assert all(len(runs) <= 3 for runs in head.tables.values())  # size-tiered: a few runs, not one per merge
    assert len(r.daily) == 12 and r.merge.state_rows["order_items"] == 12
    # Only what the head names is left: superseded files and merged segments are gone.
    files = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()}
    assert not any(f.startswith("segments/") for f in files)
    named = {f.key for runs in head.tables.values() for run in runs for f in run}
    assert {f for f in files if f.endswith(".parquet") and "/orders-" in f} <= named


def move_the_item_to_an_order_of_the_next_day(write_csv: WriteCsv, staging: Path, settings: Settings) -> None:
    """After :func:`one_order`: its item arrives again under a new order of 2025-03-02. The merge must read the old
    item and order back from the state files to take them out of 2025-03-01."""
    later = run(
        [
            write_csv("orders.csv", [order(11, 100, "2025-03-02T08:00:00")], folder="d2"),
            write_csv("order_items.csv", [item(1, 11, 100, 1, "4.00")], folder="d2"),
        ],
        staging,
        settings,
    )
    assert [(k.order_date, k.total_items_sold) for k in later.daily] == [("2025-03-01", 0), ("2025-03-02", 1)]


def test_keyed_state_is_delta_encoded_uncompressed_and_read_back_by_the_next_merge(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    staging = tmp_path / "staging"
    run(one_order(write_csv), staging, settings)
    move_the_item_to_an_order_of_the_next_day(write_csv, staging, settings)
    files = [p for p in (staging / "state").rglob("*.parquet") if p.name.split("-")[0] in ("orders", "order_items")]
    assert files
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for c in range(meta.num_columns):
            col = meta.row_group(0).column(c)
            assert col.compression == "UNCOMPRESSED", (path.name, col.path_in_schema)
            kind = meta.schema.column(c).physical_type
            if col.path_in_schema == HASH:
                assert "DELTA_BINARY_PACKED" not in col.encodings  # random 64-bit values: plain
            elif kind in ("INT64", "INT32"):
                assert "DELTA_BINARY_PACKED" in col.encodings, (path.name, col.path_in_schema)


def test_state_written_with_the_former_encoding_is_read_as_it_is(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    # A staging area from before processor/parquet.py (plain values, LZ4) keeps working: no migration.
    staging = tmp_path / "staging"
    run(one_order(write_csv), staging, settings)
    for path in (staging / "state").rglob("*.parquet"):
        pl.read_parquet(path).write_parquet(path, compression="lz4", row_group_size=8192)
    move_the_item_to_an_order_of_the_next_day(write_csv, staging, settings)


def test_a_customer_whose_counts_fill_several_row_groups_moves_between_dates_exactly(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    """One customer ordered on 9,000 distinct days: the customer's (user, date) counts fill two row groups of one
    keyed file (8,192 rows each), sorted by user only. A later delivery moves three of those orders to days the
    customer had none: each lookup must find its (user, date) count wherever it sits among them."""
    start = datetime(2000, 1, 1, 8, tzinfo=UTC)
    days = [(start + timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%S") for d in range(9000)]
    staging = tmp_path / "staging"
    first = run(
        [
            write_csv("products.csv", [product(1, "Books")]),
            write_csv("orders.csv", [order(i + 1, 7, day) for i, day in enumerate(days)]),
            write_csv("order_items.csv", [item(i + 1, i + 1, 7, 1, "1.00") for i in range(9000)]),
        ],
        staging,
        settings,
    )
    assert len(first.daily) == 9000 and all(k.unique_customers == 1 for k in first.daily)
    users = [p for p in (staging / "state").rglob("users-*.parquet")]
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in users] == [2]
    moved = {1: "2030-01-01", 4500: "2030-01-02", 9000: "2030-01-03"}
    later = run(
        [write_csv("orders.csv", [order(o, 7, f"{day}T08:00:00") for o, day in moved.items()], folder="d2")],
        staging,
        settings,
    )
    left = {days[o - 1][:10] for o in moved}
    assert sorted(later.merge.dates) == sorted([*left, *moved.values()])
    by_date = {k.order_date: (k.total_orders, k.unique_customers) for k in later.daily}
    assert [by_date.get(d, (0, 0)) for d in sorted(left)] == [(0, 0)] * 3
    assert [by_date[d] for d in moved.values()] == [(1, 1)] * 3
    assert sum(n for n, _ in by_date.values()) == sum(c for _, c in by_date.values()) == 9000


def test_items_swapping_orders_are_exact_while_the_keyed_writes_lag_behind_the_steps(
    write_csv: WriteCsv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orders 10 and 11 both move to new dates and swap an item: each is merged in its own step, and the step that
    takes an item out of the other order must read that order as the previous step left it, even though a step's
    files are written while the next step runs. Slow writes make the overlap certain."""
    write = KeyedTable._write

    def slow_write(self: KeyedTable, rows: pl.DataFrame, scratch: Path) -> TableFile:
        time.sleep(0.2)
        return write(self, rows, scratch)

    monkeypatch.setattr(KeyedTable, "_write", slow_write)
    settings = Settings.load(env={}, buckets=4, work_dir=tmp_path / "work", merge_rows=2)
    staging = tmp_path / "staging"
    run(
        [
            write_csv("products.csv", [product(1, "Books")]),
            write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00"), order(11, 100, "2025-03-02T08:00:00")]),
            write_csv(
                "order_items.csv", [item(i, 10 + (i + 1) % 2, 100, 1, f"{2 ** (i - 1)}.00") for i in range(1, 5)]
            ),
        ],
        staging,
        settings,
    )
    later = run(
        [
            write_csv(
                "orders.csv", [order(10, 100, "2025-03-05T08:00:00"), order(11, 100, "2025-03-06T08:00:00")], "d2"
            ),
            write_csv("order_items.csv", [item(1, 11, 100, 1, "1.00"), item(2, 10, 100, 1, "2.00")], "d2"),
        ],
        staging,
        settings,
    )
    assert later.merge.dates == ["2025-03-01", "2025-03-02", "2025-03-05", "2025-03-06"]
    assert [k for k in later.daily if k.total_orders] == [
        day_kpi("2025-03-05", 1, 0, 2, 600, 1),  # order 10: items 3 and 2
        day_kpi("2025-03-06", 1, 0, 2, 900, 1),  # order 11: items 4 and 1
    ]


def test_a_write_that_fails_while_a_step_fails_is_logged_and_nothing_is_committed(
    write_csv: WriteCsv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first step's orders file fails to write (in the background) while the second step fails too: the
    merge raises the step's error, logs the write's, and leaves the state as it was."""
    write, step = KeyedTable._write, apply.apply_step
    calls = 0

    def failing_write(self: KeyedTable, rows: pl.DataFrame, scratch: Path) -> TableFile:
        if self.spec.name == "orders":
            raise OSError("No space left on device")
        return write(self, rows, scratch)

    def failing_step(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            time.sleep(0.2)  # the first step's writes have finished (and failed) by now
            raise RuntimeError("the second step failed")
        step(*args)

    monkeypatch.setattr(KeyedTable, "_write", failing_write)
    monkeypatch.setattr(apply, "apply_step", failing_step)
    settings = Settings.load(env={}, buckets=4, work_dir=tmp_path / "work", merge_rows=2)
    staging = tmp_path / "staging"
    orders = [order(10, 100, "2025-03-01T08:00:00"), order(11, 100, "2025-03-02T08:00:00")]
    items = [item(1, 10, 100, 1, "1.00"), item(2, 11, 100, 1, "2.00")]
    files = [write_csv("products.csv", [product(1, "Books")]), write_csv("orders.csv", orders)]
    with pytest.raises(RuntimeError, match="the second step failed"):
        run([*files, write_csv("order_items.csv", items)], staging, settings)
    failed = [r for r in caplog.records if r.getMessage() == "merge.write_failed"]
    assert len(failed) == 1 and "No space left on device" in failed[0].fields["error"]  # type: ignore[attr-defined]
    assert load_head(LocalStore(staging)).generation == 0


def test_file_names_with_glob_characters_merge_like_any_other(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    # Staged files are named after their source: brackets, '*' and '?' must be read as names, never as patterns.
    staging = tmp_path / "staging"
    first = run(
        [
            write_csv("products.csv", [product(1, "Books")]),
            write_csv("orders_[1].csv", [order(10, 100, "2025-03-01T08:00:00")]),
            write_csv("order_items_*?.csv", [item(1, 10, 100, 1, "4.00")]),
        ],
        staging,
        settings,
    )
    assert [f.outcome for f in first.files] == ["accepted"] * 3
    later = run([write_csv("orders_part2.csv", [order(11, 101, "2025-03-01T09:00:00")])], staging, settings)
    [k] = later.daily
    assert (k.total_orders, k.total_items_sold, k.total_revenue) == (2, 1, Decimal("4.00"))


def test_a_bucket_bigger_than_a_step_is_merged_in_order_ranges_with_the_same_kpis(
    write_csv: WriteCsv, tmp_path: Path
) -> None:
    """One staging bucket holds everything; with steps of 12 rows the merge cuts it by order id (each step a
    range of orders with their items) and publishes what one step would."""
    orders = [order(i, 100 + i % 5, f"2025-03-0{1 + i % 3}T08:00:00") for i in range(1, 61)]
    items = [item(i, 1 + i % 60, 100 + (1 + i % 60) % 5, 1 + i % 2, f"{i}.50") for i in range(1, 121)]
    files = [
        write_csv("products.csv", [product(1, "Books"), product(2, "Toys")]),
        write_csv("orders.csv", orders),
        write_csv("order_items.csv", items),
    ]
    one_bucket = Settings.load(env={}, buckets=1, work_dir=tmp_path / "work")
    whole = run(files, tmp_path / "whole", one_bucket)

    store = LocalStore(tmp_path / "cut")
    stage_local(files, store, one_bucket, tmp_path / "work")
    big = [s for s in committed_segments(store) if s.dataset != "products"]
    steps = bucket_steps(store, big, bucket_load(big), rows_per_pass=12)
    assert len(steps) == 15  # 180 staged rows in ranges of about 12
    staged = pl.concat([scan_segment(store, s) for s in big], how="diagonal").collect()
    cuts = [step[0][1] for step in steps]
    per_step = [staged.filter(cut.predicate()).height for cut in cuts if cut is not None]
    assert sum(per_step) == 180 and max(per_step) <= 12  # every row in exactly one step, none too big

    table = KpiTable()
    merge(store, generation=0, scratch=tmp_path / "m", publish=table.publish, rows_per_pass=12)
    daily, category = current_kpis(store)
    assert (daily, category) == (whole.daily, whole.category)
    assert [k.public() for k in daily] == table.kpis()["daily"]


def test_steps_of_one_bucket_read_the_next_steps_rows_ahead_and_stay_exact(
    write_csv: WriteCsv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight buckets of 15 staged rows, steps of at most 20 rows: one bucket a step, each reading the next step's
    bucket with its own (they share row groups). A first load and a delivery that moves items between orders of
    different buckets and orders between dates give exactly the KPIs of the same merges without the read-ahead."""
    orders = [order(o, 100 + o % 7, f"2025-03-{1 + o % 5:02d}T08:00:00") for o in range(1, 41)]
    items = [item(i, 1 + (i - 1) % 40, 100 + (1 + (i - 1) % 40) % 7, 1 + i % 3, f"{i}.25") for i in range(1, 81)]
    first = [
        write_csv("products.csv", [product(1, "Books"), product(2, "Games"), product(3, "Tools")]),
        write_csv("orders.csv", orders),
        write_csv("order_items.csv", items),
    ]
    moved = [item(i, 1 + (i + 4) % 40, 100 + (1 + (i + 4) % 40) % 7, 1 + i % 3, f"{i}.50") for i in range(1, 81, 3)]
    later = [
        write_csv("orders.csv", [order(o, 100 + o % 7, "2025-03-09T08:00:00") for o in range(3, 41, 6)], "d2"),
        write_csv("order_items.csv", moved, "d2"),
    ]
    settings = Settings.load(env={}, buckets=8, work_dir=tmp_path / "work", merge_rows=20)
    read_with = apply._read_with
    shared: list[int] = []

    def spy(*args: Any) -> list[int]:
        buckets = read_with(*args)
        shared.extend(buckets)
        return buckets

    monkeypatch.setattr(apply, "_read_with", spy)
    ahead = [run(first, tmp_path / "ahead", settings), run(later, tmp_path / "ahead", settings)]
    assert len(shared) >= 8  # orders and items of at least four steps were read ahead
    monkeypatch.setattr(apply, "_read_with", lambda *args: [])
    plain = [run(first, tmp_path / "plain", settings), run(later, tmp_path / "plain", settings)]
    for a, p in zip(ahead, plain, strict=True):
        assert a.merge.groups_recomputed == p.merge.groups_recomputed
        assert (a.daily, a.category) == (p.daily, p.category)
    assert plain[1].merge.dates and any(k.order_date == "2025-03-09" and k.total_orders for k in plain[1].daily)
