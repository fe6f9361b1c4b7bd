"""The merge under failure: killed at every write, run twice at once, or after losing its lease."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from processor.merge import Publication, merge
from processor.pipeline import stage_local
from processor.settings import Settings
from processor.state import HEAD_KEY, current_kpis
from processor.store import LocalStore
from tests.builders import WriteCsv, item, order, product
from tests.processor.test_invariant import KpiTable
from tests.reference import reference_kpis


class Killed(Exception):
    """Stands for kill -9: the process stops between two writes, whatever it was doing."""


class DyingStore(LocalStore):
    """A local store that dies at its ``fatal``-th write (put, delete) or publish."""

    def __init__(self, root: Path, fatal: int) -> None:
        super().__init__(root)
        self.fatal = fatal
        self.writes = 0

    def tick(self) -> None:
        self.writes += 1
        if self.writes == self.fatal:
            raise Killed(f"killed at write {self.writes}")

    def put_file(self, local: Path, key: str) -> None:
        self.tick()
        super().put_file(local, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.tick()
        super().put_bytes(key, data)

    def delete(self, key: str) -> None:
        self.tick()
        super().delete(key)


def _history(write_csv: WriteCsv) -> list[Path]:
    return [
        write_csv("products.csv", [product(1, "Books"), product(2, "Toys")]),
        write_csv(
            "orders.csv",
            [order(10, 100, "2025-03-01T08:00:00"), order(11, 101, "2025-03-02T08:00:00", status="returned")],
        ),
        write_csv(
            "order_items.csv",
            [item(1, 10, 100, 1, "4.00"), item(2, 10, 100, 2, "6.00"), item(3, 11, 101, 2, "1.50")],
        ),
    ]


def _delivery(write_csv: WriteCsv) -> list[Path]:
    """A product changes category, an order changes date, an item moves to another order, an item waits."""
    return [
        write_csv("products_v2.csv", [product(2, "Garden")], folder="d"),
        write_csv(
            "orders_v2.csv", [order(11, 101, "2025-03-04T08:00:00"), order(12, 100, "2025-03-01T09:00:00")], folder="d"
        ),
        write_csv("order_items_v2.csv", [item(1, 12, 100, 1, "4.00"), item(4, 99, 100, 1, "9.99")], folder="d"),
    ]


def test_killed_at_every_write_of_a_merge_then_rerun_is_exact(
    write_csv: WriteCsv, tmp_path: Path, settings: Settings
) -> None:
    history, delivery = _history(write_csv), _delivery(write_csv)
    base = tmp_path / "base"
    table = KpiTable()
    stage_local(history, LocalStore(base), settings, tmp_path / "w")
    merge(LocalStore(base), generation=0, scratch=tmp_path / "m", publish=table.publish)
    stage_local(delivery, LocalStore(base), settings, tmp_path / "w")
    expected = reference_kpis(history + delivery)
    published_before = dict(table.items)

    fatal = 1
    while True:
        staging = tmp_path / f"run{fatal}"
        shutil.copytree(base, staging)
        store = DyingStore(staging, fatal)
        crashed = KpiTable()
        crashed.items = dict(published_before)

        def publish(pub: Publication, generation: int, store: DyingStore = store, table: KpiTable = crashed) -> int:
            store.tick()  # dying in the middle of a publish: half the figures are out
            half = Publication(pub.daily[: len(pub.daily) // 2], pub.category[: len(pub.category) // 2])
            table.publish(half, generation)
            store.tick()
            return table.publish(pub, generation)

        try:
            merge(store, generation=0, scratch=tmp_path / "m", publish=publish)
        except Killed:
            # The rerun (a retried task) on the same staging area and the same KPI table.
            merge(LocalStore(staging), generation=0, scratch=tmp_path / "m", publish=crashed.publish)
            assert crashed.kpis() == expected, f"killed at write {fatal}"
            daily, category = current_kpis(LocalStore(staging))
            assert [k.public() for k in daily] == expected["daily"], f"killed at write {fatal}"
            assert [k.public() for k in category] == expected["category"]
            shutil.rmtree(staging)
            fatal += 1
            continue
        assert crashed.kpis() == expected
        break
    assert fatal > 10  # every write of the merge was a kill point: state files, aggregates, head, deletions


def test_two_local_runs_on_one_staging_directory_at_once_give_the_union(write_csv: WriteCsv, tmp_path: Path) -> None:
    history, delivery = _history(write_csv), _delivery(write_csv)
    staging = tmp_path / "staging"
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "shopkpi.cli", "process", *map(str, files), "--staging", str(staging), "--json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "SHOPKPI_WORK_DIR": str(tmp_path / "work")},
        )
        for files in (history, delivery)
    ]
    for p in runs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    # The two runs staged at the same time, so either may have arrived first: the union is the reference over
    # the arrival order the staging area recorded.
    stored = current_kpis(LocalStore(staging))
    order_a = reference_kpis(history + delivery)
    order_b = reference_kpis(delivery + history)
    got = {"daily": [k.public() for k in stored[0]], "category": [c.public() for c in stored[1]]}
    assert got in (order_a, order_b)


def test_a_merge_that_lost_its_lease_changes_nothing(write_csv: WriteCsv, tmp_path: Path, settings: Settings) -> None:
    staging = tmp_path / "staging"
    store = LocalStore(staging)
    stage_local(_history(write_csv), store, settings, tmp_path / "w")
    merge(store, generation=0, scratch=tmp_path / "m")
    stage_local(_delivery(write_csv), store, settings, tmp_path / "w")
    before = {p.relative_to(staging).as_posix(): p.read_bytes() for p in staging.rglob("*") if p.is_file()}

    def lost() -> None:
        raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        merge(store, generation=0, scratch=tmp_path / "m", fence=lost)
    after = {p.relative_to(staging).as_posix(): p.read_bytes() for p in staging.rglob("*") if p.is_file()}
    assert after[HEAD_KEY] == before[HEAD_KEY]
    assert set(before) <= set(after), "nothing it did not write was deleted"
    assert all(after[k] == v for k, v in before.items())
