"""The merge's committed state: the head that names it, its keyed tables and small aggregates, and clean-up.

``state/head.json`` (:class:`Head`) is written last by a merge and read first by the next: it names the files of
every keyed table (:mod:`processor.keyed`) and every aggregate. Anything under ``state/`` it does not name is an
unfinished merge's leftover, deleted by :func:`sweep`; nothing is deleted before the head that replaces it is
written. :class:`State` is that state opened for one merge, and :class:`MergeRun` what the merge accumulates.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import msgspec
import polars as pl

from processor import kpis as K
from processor.keyed import KeyedTable, Run, TableSpec
from processor.model import CategoryKpi, OrderKpi
from processor.stage import Segment
from processor.steps import Step
from processor.store import Store

HEAD_KEY = "state/head.json"


def specs(buckets: int) -> dict[str, TableSpec]:
    """The keyed tables; those keyed by order_id know the staging buckets, so a lookup skips the files of others."""
    return {
        "orders": TableSpec("orders", K.ORDER_STATE, ("order_id",), ("order_id",), modulus=buckets),
        "items": TableSpec("items", K.ITEM_INDEX, ("id",), ("id",)),
        "order_items": TableSpec(
            "order_items", K.ORDER_ITEMS, ("order_id", "id"), ("order_id",), deletes=True, modulus=buckets
        ),
        "users": TableSpec("users", K.USERS, ("user_id", "order_date"), ("user_id", "order_date"), additive=True),
    }


FILES: dict[str, pl.DataType] = {
    "fno": pl.Int32(),
    "file_id": pl.String(),
    "dataset": pl.String(),
    "source": pl.String(),
    "arrival_us": pl.Int64(),
}

AGGREGATES = {
    "daily": K.DAILY,
    "category": K.CATEGORY,
    "pending": K.PENDING,
    "products": K.PRODUCT_STATE,
    "files": FILES,
}


class Head(msgspec.Struct, kw_only=True):
    """The committed state: written last by a merge, read first by the next."""

    generation: int = 0
    buckets: int = 0  # staging buckets the order-keyed tables' files record their residues for (fixed at the first)
    tables: dict[str, list[Run]] = msgspec.field(default_factory=dict)
    aggregates: dict[str, str] = msgspec.field(default_factory=dict)  # name -> Parquet key
    mismatched: int = 0  # items currently rejected as user_mismatch
    rejects: list[str] = msgspec.field(default_factory=list)  # reports of rows rejected at merge time


def load_head(store: Store) -> Head:
    data = store.get_bytes(HEAD_KEY)
    return msgspec.json.decode(data, type=Head) if data else Head()


@dataclass
class State:
    """The head's tables and aggregates, open for one merge."""

    store: Store
    head: Head
    tables: dict[str, KeyedTable]
    agg: dict[str, pl.DataFrame]
    start: dict[str, int] = field(default_factory=dict)  # files of each table before this merge

    @classmethod
    def open(cls, store: Store, head: Head, prefix: str) -> State:
        spec = specs(head.buckets)
        tables = {n: KeyedTable(store, spec[n], head.tables.get(n, []), prefix) for n in spec}
        agg = {}
        for name, schema in AGGREGATES.items():
            key = head.aggregates.get(name)
            agg[name] = pl.read_parquet(store.local_path(key), glob=False) if key else K.empty(schema)
        return cls(store, head, tables, agg, {n: len(t.files) for n, t in tables.items()})


@dataclass
class MergeRun:
    """What one merge accumulates across its steps."""

    scratch: Path
    generation: int
    started: float  # time.perf_counter() when the merge began
    conflicts: int = 0
    groups: int = 0
    mismatched: int = 0
    days: set[date] = field(default_factory=set)
    cats: set[tuple[str, date]] = field(default_factory=set)
    rejects: list[pl.DataFrame] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    duplicates: pl.DataFrame | None = None  # item ids the delivery holds more than once -> latest version
    writer: ThreadPoolExecutor | None = None  # writes keyed files behind the steps (processor.apply.apply_steps)
    writing: list[Future[None]] = field(default_factory=list)  # the writes of the last step, while in flight
    upcoming: Step | None = None  # the step after the one being applied
    ahead: dict[str, pl.DataFrame] = field(default_factory=dict)  # its rows, read with this step's (apply._read)
    staged_as_facts: dict[str, bool] = field(default_factory=dict)  # by file id: its segment holds facts (apply._read)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - started


def put_frame(store: Store, scratch: Path, frame: pl.DataFrame, key: str) -> str:
    """Write a small frame (an aggregate, a delta) as ``key`` of the store, through a scratch file; the key."""
    scratch.mkdir(parents=True, exist_ok=True)
    local = scratch / key.replace("/", "_")
    frame.write_parquet(local, compression="zstd")
    store.put_file(local, key)
    local.unlink(missing_ok=True)
    return key


def generation_prefix(generation: int) -> str:
    """Where the files a merge of this generation writes go."""
    return f"state/g={generation}"


def _named(head: Head) -> set[str]:
    keys = {HEAD_KEY, *head.aggregates.values(), *head.rejects}
    for runs in head.tables.values():
        for run in runs:
            for f in run:
                keys.add(f.key)
                if f.bloom:
                    keys.add(f.bloom)
    return keys


def collect_garbage(store: Store, new: Head, delivery: list[Segment]) -> None:
    """Delete what the committed head no longer names: superseded state files, and the merged segments (their
    rows now live in the keyed tables; their manifests stay as the record that the file was staged)."""
    sweep(store, new)  # also catches this merge's own intermediate files (a run it compacted at once)
    for s in delivery:
        for key in s.objects():
            store.delete(key)


def sweep(store: Store, head: Head) -> None:
    """Delete state files a crashed merge wrote but never committed (only the lock holder runs this)."""
    live = _named(head)
    for key in list(store.list_keys("state/")):
        if key not in live:
            store.delete(key)


def current_kpis(store: Store) -> tuple[list[OrderKpi], list[CategoryKpi]]:
    """Every KPI the committed state holds (all dates)."""
    state = State.open(store, load_head(store), "state/read-only")
    return K.order_kpis(state.agg["daily"]), K.category_kpis(state.agg["category"])
