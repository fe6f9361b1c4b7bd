"""The correctness invariant of SPEC section 3, as property tests on what the KPI tables hold.

Hypothesis generates a small shop (products, orders, items), revised versions of some rows, and a delivery plan: the
rows split into files at random, the files shuffled, some re-delivered verbatim, items arriving before their orders
and products, revisions arriving later -- orders moved to another date, products moved to another category, items
moved to another order, so that groups vanish. The files are merged in batches (several incremental merges over one
staging area, sometimes a merge with nothing new). Every publish of every merge -- writes and removals, in order --
is applied to a simulated KPI table, which must equal an independent brute-force reference (``tests/reference.py``:
plain Python, none of the processor's code) over the files delivered so far, after every batch.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.merge import Publication, merge
from processor.pipeline import process_local, stage_local
from processor.schema import DATASETS
from processor.settings import Settings
from processor.state import current_kpis
from processor.store import LocalStore
from tests.reference import reference_kpis

CATEGORIES = ["Books", "Toys", "Garden"]
STATUSES = ["complete", "shipped", "returned", "cancelled", "processing", "Delivered"]
ZONES = ["", "Z", "+02:00", "-05:00"]


@dataclass
class Plan:
    deliveries: list[tuple[str, list[dict[str, Any]]]]  # (dataset, rows) in arrival order
    batches: list[int]  # how many deliveries each merge takes (0: a merge with nothing new)


def _ts(day: int, minute: int, zone: str) -> str:
    h, m = divmod(minute, 60)
    sep = " " if minute % 7 == 0 else "T"
    return f"2025-03-{day:02d}{sep}{h:02d}:{m:02d}:00{zone}"


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """A whole delivery plan (products, orders, items, revisions, file splits, arrival order, repeats) drawn in one
    composite, so that hypothesis shrinks a failing example as one plan; hence its length."""
    n_products = draw(st.integers(1, 4))
    products = [
        {"id": p, "category": draw(st.sampled_from(CATEGORIES)), "retail_price": "10.00", "name": f"p{p}"}
        for p in range(1, n_products + 1)
    ]
    n_orders = draw(st.integers(1, 8))
    orders = []
    for o in range(1, n_orders + 1):
        day, minute = draw(st.integers(1, 3)), draw(st.integers(0, 1439))
        zone = draw(st.sampled_from(ZONES))
        returned = draw(st.booleans())
        orders.append(
            {
                "order_id": o,
                "user_id": draw(st.integers(1, 4)),
                "status": draw(st.sampled_from(STATUSES)),
                "created_at": _ts(day, minute, zone),
                "returned_at": _ts(day, minute, zone).replace("2025-03-", "2025-04-") if returned else None,
                "num_of_item": draw(st.integers(1, 3)),
            }
        )
    items = []
    for i in range(1, draw(st.integers(0, 14)) + 1):
        # Mostly items of known orders and products, sometimes of rows that never arrive (they must wait).
        o = draw(st.integers(1, n_orders + 1))
        user = next((x["user_id"] for x in orders if x["order_id"] == o), 1)
        if draw(st.integers(0, 9)) == 0:
            user += 1  # disagrees with its order: rejected when joined
        items.append(
            {
                "id": i,
                "order_id": o,
                "user_id": user,
                "product_id": draw(st.integers(1, n_products + 1)),
                "status": draw(st.sampled_from(STATUSES)),
                "created_at": "2025-03-01T00:00:00",
                "returned_at": "2025-04-01T00:00:00" if draw(st.booleans()) else None,
                "sale_price": f"{draw(st.integers(0, 50000)) / 100:.2f}",
            }
        )

    # Revisions: later versions of some rows (the later arrival must win), some moving a row to another group.
    revisions: list[tuple[str, dict[str, Any]]] = []
    for row in draw(st.lists(st.sampled_from(orders), max_size=3, unique_by=lambda r: r["order_id"])):
        revisions.append(
            (
                "orders",
                {
                    **row,
                    "status": draw(st.sampled_from(STATUSES)),
                    "created_at": _ts(draw(st.integers(1, 3)), draw(st.integers(0, 1439)), ""),
                },
            )
        )
    if items:
        for row in draw(st.lists(st.sampled_from(items), max_size=3, unique_by=lambda r: r["id"])):
            revisions.append(("order_items", {**row, "sale_price": "1.25", "status": "returned"}))
        for row in draw(st.lists(st.sampled_from(items), max_size=2, unique_by=lambda r: r["id"])):
            target = draw(st.sampled_from(orders))  # re-parented: the item now belongs to another order
            revisions.append(("order_items", {**row, "order_id": target["order_id"], "user_id": target["user_id"]}))
    for row in draw(st.lists(st.sampled_from(products), max_size=2, unique_by=lambda r: r["id"])):
        revisions.append(("products", {**row, "category": draw(st.sampled_from(CATEGORIES))}))

    deliveries: list[tuple[str, list[dict[str, Any]]]] = []
    for dataset, rows in (("products", products), ("orders", orders), ("order_items", items)):
        parts = draw(st.integers(1, 3))
        for p in range(parts):
            chunk = rows[p::parts]
            if chunk:
                deliveries.append((dataset, chunk))
    order = draw(st.permutations(range(len(deliveries))))
    deliveries = [deliveries[i] for i in order]
    for dataset, row in revisions:  # revisions arrive after the originals
        deliveries.append((dataset, [row]))
    for i in draw(st.lists(st.integers(0, len(deliveries) - 1), max_size=3)):  # verbatim re-deliveries
        deliveries.insert(draw(st.integers(i + 1, len(deliveries))), deliveries[i])
    batches: list[int] = []
    while sum(batches) < len(deliveries):
        batches.append(min(draw(st.integers(1, 4)), len(deliveries) - sum(batches)))
        if draw(st.integers(0, 5)) == 5:
            batches.append(0)  # a merge with nothing new changes nothing
    return Plan(deliveries, batches)


def _write(folder: Path, n: int, dataset: str, rows: list[dict[str, Any]]) -> Path:
    names = DATASETS[dataset].names
    path = folder / f"{dataset}_part{n}.csv"
    lines = [",".join(names)] + [",".join("" if r.get(c) is None else str(r[c]) for c in names) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def _delivered(plan: Plan) -> Iterator[tuple[Path, list[Path], Settings]]:
    """A scratch folder with the plan's files written in arrival order, and settings with three buckets."""
    root = Path(tempfile.mkdtemp(prefix="shopkpi-prop-"))
    try:
        files = [_write(root, n, dataset, rows) for n, (dataset, rows) in enumerate(plan.deliveries)]
        yield root, files, Settings.load(env={}, buckets=3, work_dir=root / "work")
    finally:
        shutil.rmtree(root, ignore_errors=True)


class KpiTable:
    """What a KPI store holds after a sequence of publishes: items put, items removed, ranges reconciled."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, ...], dict[str, Any]] = {}

    def publish(self, pub: Publication, generation: int) -> int:
        if pub.reconcile is not None:
            lo, hi = pub.reconcile
            for key in [k for k in self.items if lo <= k[-1] <= hi]:
                del self.items[key]
        for k in pub.daily:
            self.items[("daily", k.order_date)] = k.public()
        for c in pub.category:
            self.items[("category", c.category, c.order_date)] = c.public()
        for d in pub.gone_daily:
            self.items.pop(("daily", d), None)
        for cat, d in pub.gone_category:
            self.items.pop(("category", cat, d), None)
        return len(pub.daily) + len(pub.category)

    def kpis(self) -> dict[str, list[dict[str, Any]]]:
        daily = [v for k, v in sorted(self.items.items()) if k[0] == "daily"]
        category = sorted(
            (v for k, v in self.items.items() if k[0] == "category"), key=lambda v: (v["order_date"], v["category"])
        )
        return {"daily": daily, "category": category}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
@given(plans())
def test_stored_kpis_equal_brute_force_reference_after_every_merge(plan: Plan) -> None:
    with _delivered(plan) as (root, files, config):
        store = LocalStore(root / "staging")
        table = KpiTable()
        done = 0
        for size in plan.batches:
            stage_local(files[done : done + size], store, config, root / "work")
            done += size
            merge(store, generation=0, scratch=root / "merge", publish=table.publish, rows_per_pass=7)
            assert table.kpis() == reference_kpis(files[:done])
        daily, category = current_kpis(store)
        expected = reference_kpis(files)
        assert [k.public() for k in daily] == expected["daily"]
        assert [k.public() for k in category] == expected["category"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
@given(plans())
def test_one_run_equals_many_merges(plan: Plan) -> None:
    """The same files in one ``shopkpi process`` call: the same KPIs as the batched merges above."""
    with _delivered(plan) as (root, files, config):
        run = process_local(files, root / "staging", config)
        expected = reference_kpis(files)
        assert [k.public() for k in run.daily] == expected["daily"]
        assert [k.public() for k in run.category] == expected["category"]
