"""The incremental merge: newly committed segments -> signed deltas -> the KPIs that moved, and nothing else.

One merge runs at a time (the caller holds the merge lock: the ledger's lease on AWS, a file lock locally). The
state it maintains lives in the staging store and is named by one small object, ``state/head.json``:

* keyed tables (:mod:`processor.keyed`): ``orders`` (latest version of each order), ``items`` (the record-level
  index: which order holds each item id now), ``order_items`` (items by order, what a group's contribution is
  computed from) and ``users`` (reference counts of (customer, date));
* small aggregates, read and rewritten whole: ``daily``, ``category``, ``pending`` (waiting items by reason and
  arrival), the latest ``products`` and the ``files`` already merged.

Each merge:

1. takes the committed segments not yet in ``files`` (the delivery), in arrival order, in steps of about
   ``rows_per_pass`` rows (a bigger file is cut by staging bucket), each step:
2. keeps each key's latest version (the higher arrival wins, whatever the order in which files are merged), finds
   the order groups it changes (changed orders; the old and the new order of changed items, so an item moved to
   another order leaves the first; the orders holding a product whose category changed), reads those groups' old
   rows by key, builds their new rows, and moves the aggregates by ``contributions(new) - contributions(old)``;
3. appends the changed rows to the keyed tables and compacts them (size-tiered);
4. publishes the KPIs whose figures moved and removes those whose group vanished, then commits ``head.json``,
   then deletes what the new head no longer names (superseded state files, merged segments).

A crash anywhere before the commit leaves the old head in force: the next merge redoes the same delivery from it
and publishes the same figures (publishing is idempotent). Nothing is deleted before the head that replaces it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import msgspec
import polars as pl

from processor import kpis as K
from processor.keyed import KeyedTable, Run, TableSpec
from processor.log import get_logger
from processor.model import CategoryKpi, MergeResult, OrderKpi
from processor.schema import BUCKET, ORDER_ITEMS, ORDERS, PRODUCTS
from processor.stage import Segment, committed_segments
from processor.store import Store

log = get_logger("merge")

HEAD_KEY = "state/head.json"
#: Staged rows (orders + items) applied in one step; bounds the merge's memory.
ROWS_PER_PASS = 2_000_000

SPECS = {
    "orders": TableSpec("orders", K.ORDER_STATE, ("order_id",), ("order_id",)),
    "items": TableSpec("items", K.ITEM_INDEX, ("id",), ("id",)),
    "order_items": TableSpec("order_items", K.ORDER_ITEMS, ("order_id", "id"), ("order_id",), deletes=True),
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
    tables: dict[str, list[Run]] = msgspec.field(default_factory=dict)
    aggregates: dict[str, str] = msgspec.field(default_factory=dict)  # name -> Parquet key
    mismatched: int = 0  # items currently rejected as user_mismatch
    rejects: list[str] = msgspec.field(default_factory=list)  # reports of rows rejected at merge time


@dataclass
class Publication:
    """What a merge asks the KPI store to hold: new figures, and the keys whose group no longer exists."""

    daily: list[OrderKpi]
    category: list[CategoryKpi]
    gone_daily: list[str] = field(default_factory=list)
    gone_category: list[tuple[str, str]] = field(default_factory=list)
    reconcile: tuple[str, str] | None = None  # reprocess: also remove stored items of this range not in the KPIs

    def __bool__(self) -> bool:
        return bool(self.daily or self.category or self.gone_daily or self.gone_category or self.reconcile)


Publisher = Callable[[Publication, int], int]


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

    @classmethod
    def open(cls, store: Store, head: Head, prefix: str) -> State:
        tables = {n: KeyedTable(store, spec, head.tables.get(n, []), prefix) for n, spec in SPECS.items()}
        agg = {}
        for name, schema in AGGREGATES.items():
            key = head.aggregates.get(name)
            agg[name] = pl.read_parquet(store.local_path(key)) if key else K.empty(schema)
        return cls(store, head, tables, agg)


@dataclass
class _Run:
    """What one merge accumulates across its steps."""

    scratch: Path
    conflicts: int = 0
    groups: int = 0
    mismatched: int = 0
    days: set[date] = field(default_factory=set)
    cats: set[tuple[str, date]] = field(default_factory=set)
    rejects: list[pl.DataFrame] = field(default_factory=list)


def merge(
    store: Store,
    *,
    generation: int,
    scratch: Path,
    publish: Publisher | None = None,
    force_dates: tuple[str, str] | None = None,
    orphan_grace_s: float = 86400.0,
    rows_per_pass: int = ROWS_PER_PASS,
    now: datetime | None = None,
    fence: Callable[[], None] | None = None,
) -> tuple[MergeResult, list[OrderKpi], list[CategoryKpi]]:
    """Bring the KPIs up to date with every committed segment. See the module docstring.

    ``publish(publication, generation)`` stores what changed (DynamoDB in the tasks; None locally) and returns how
    many items it wrote or removed. ``force_dates=(from, to)`` republishes that inclusive range even if nothing
    changed, and removes stored items of the range that no longer exist (reprocessing). ``fence()`` raises when
    this merge may no longer commit (its lease was lost); it is called before the head moves. Returns the summary
    and the KPIs that were published.
    """
    started = time.perf_counter()
    head = load_head(store)
    generation = max(generation, head.generation + 1)
    prefix = f"state/g={generation}"
    _sweep(store, head)
    state = State.open(store, head, prefix)
    segments = committed_segments(store)
    merged = set(state.agg["files"].get_column("file_id").to_list())
    delivery = [s for s in segments if s.file_id not in merged]
    run = _Run(scratch=scratch, mismatched=head.mismatched)
    scratch.mkdir(parents=True, exist_ok=True)
    if delivery:
        log.info("merge.start", files=len(delivery), generation=generation, state_rows=state.tables["order_items"].rows)
        numbers = _register(state, delivery)
        for step in _steps(delivery, rows_per_pass):
            _apply(state, run, step, numbers)
        for table in state.tables.values():
            table.compact(scratch, rows_per_file=rows_per_pass)

    pub = _publication(state, run, force_dates)
    written = publish(pub, generation) if publish and pub else 0
    changed = bool(delivery) or bool(run.rejects)
    if changed:
        if fence is not None:
            fence()
        new_head = _commit(state, run, generation, prefix)
        _collect_garbage(store, new_head, delivery)

    pending, orphans = _waiting(state.agg["pending"], orphan_grace_s, now or datetime.now(UTC))
    result = MergeResult(
        generation=generation,
        segments=len(segments),
        files_merged=len(delivery),
        groups_recomputed=run.groups,
        dates=sorted({k.order_date for k in pub.daily} | set(pub.gone_daily)),
        daily_kpis=len(pub.daily),
        category_kpis=len(pub.category),
        removed_kpis=len(pub.gone_daily) + len(pub.gone_category),
        published=written,
        pending=pending,
        orphans=orphans,
        late_rejects={"user_mismatch": run.mismatched} if run.mismatched else {},
        conflicts=run.conflicts,
        state_rows={n: t.rows for n, t in state.tables.items()},
        seconds=round(time.perf_counter() - started, 3),
    )
    if run.conflicts:
        log.warning("merge.conflicts", keys=run.conflicts, rule="later-arriving file wins")
    if orphans:
        log.warning("merge.orphans", **orphans)
    log.info("merge.done", **msgspec.structs.asdict(result) | {"dates": len(result.dates)})
    return result, pub.daily, pub.category


# --- the delivery ----------------------------------------------------------------------------------------------
def _register(state: State, delivery: list[Segment]) -> dict[str, tuple[int, int]]:
    """Number the delivery's files after those already merged; file id -> (file number, arrival version)."""
    files = state.agg["files"]
    start = files.height + 1  # files are numbered 1, 2, ... and never removed from this table
    rows = [
        {"fno": start + i, "file_id": s.file_id, "dataset": s.dataset, "source": s.source, "arrival_us": s.arrival_us}
        for i, s in enumerate(delivery)
    ]
    state.agg["files"] = pl.concat([files, pl.DataFrame(rows, schema=FILES)])
    return {s.file_id: (start + i, _version(s)) for i, s in enumerate(delivery)}


def _version(s: Segment) -> int:
    tie = int.from_bytes(hashlib.sha256(f"{s.source}\0{s.file_id}".encode()).digest()[:2]) & ((1 << K.TIE_BITS) - 1)
    return (s.arrival_us << K.TIE_BITS) | tie


Step = list[tuple[Segment, list[int] | None]]


def _steps(delivery: list[Segment], rows_per_pass: int) -> list[Step]:
    """Consecutive files of about ``rows_per_pass`` rows per step; a bigger file alone, cut by staging bucket."""
    steps: list[Step] = [[]]
    load = 0
    for s in delivery:
        if s.rows > rows_per_pass and s.dataset != PRODUCTS.name and len(s.buckets) > 1:
            per_bucket = s.rows / len(s.buckets)
            size = max(1, int(rows_per_pass // max(per_bucket, 1)))
            steps += [[(s, s.buckets[i : i + size])] for i in range(0, len(s.buckets), size)]
            steps.append([])
            load = 0
            continue
        if steps[-1] and load + s.rows > rows_per_pass:
            steps.append([])
            load = 0
        steps[-1].append((s, None))
        load += s.rows
    return [s for s in steps if s]


def _read(state: State, step: Step, numbers: dict[str, tuple[int, int]], dataset: str) -> pl.DataFrame:
    rows = {ORDERS.name: K.order_rows, ORDER_ITEMS.name: K.item_rows, PRODUCTS.name: K.product_rows}[dataset]
    names = {ORDERS.name: ORDERS, ORDER_ITEMS.name: ORDER_ITEMS, PRODUCTS.name: PRODUCTS}[dataset].names
    frames = []
    for seg, group in step:
        if seg.dataset != dataset:
            continue
        lf = pl.scan_parquet(state.store.local_path(seg.key))
        if group is not None:
            lf = lf.filter(pl.col(BUCKET).is_in(group))
        fno, ver = numbers[seg.file_id]
        lf = lf.with_columns(pl.lit(ver, pl.Int64).alias(K.VER), pl.lit(fno, pl.Int32).alias("_fno"))
        frames.append(rows(lf, names))
    return pl.concat(frames).collect() if frames else pl.DataFrame()


def _winners(run: _Run, new: pl.DataFrame, old: pl.DataFrame, key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """New versions that beat the stored ones (or have none), and of those the ones whose values differ.

    The second frame has the old order of items (``order_id_old``) when ``old`` has an order_id."""
    j = new.join(
        old.select(key, *(c for c in ("order_id",) if c in old.columns and c != key), K.VER, K.HASH),
        on=key,
        how="left",
        suffix="_old",
    )
    seen = pl.col(f"{K.VER}_old").is_not_null()
    run.conflicts += j.filter(seen & (pl.col(K.HASH) != pl.col(f"{K.HASH}_old"))).height
    wins = j.filter(~seen | (pl.col(K.VER) > pl.col(f"{K.VER}_old")))
    changed = wins.filter(~seen | (pl.col(K.HASH) != pl.col(f"{K.HASH}_old")))
    return wins, changed


def _apply(state: State, run: _Run, step: Step, numbers: dict[str, tuple[int, int]]) -> None:
    """Apply one step of the delivery to the state (see the module docstring, step 2)."""
    t = state.tables
    # Products: a small table, kept whole.
    products_old = state.agg["products"]
    products_new = products_old
    moved_products: list[int] = []
    raw = _read(state, step, numbers, PRODUCTS.name)
    if raw.height:
        new, c = K.latest(raw, "product_id")
        run.conflicts += c
        wins, changed = _winners(run, new, products_old, "product_id")
        old_cat = products_old.select("product_id", pl.col("category").alias("old"))
        moved = changed.join(old_cat, on="product_id", how="left").filter(pl.col("old").ne_missing(pl.col("category")))
        moved_products = moved.get_column("product_id").to_list()
        products_new = pl.concat(
            [
                products_old.join(wins.select("product_id"), on="product_id", how="anti"),
                wins.select(list(K.PRODUCT_STATE)),
            ]
        )
        state.agg["products"] = products_new

    affected: list[pl.Series] = []
    order_wins = K.empty(K.ORDER_STATE)
    incoming = _incoming(state, run, step, numbers, ORDERS.name, "orders")
    if incoming is not None:
        wins, changed = incoming
        order_wins = wins.select(list(K.ORDER_STATE))
        affected.append(changed.get_column("order_id"))

    item_wins = K.empty(K.ITEM_INDEX)
    item_changed = K.empty(K.ORDER_ITEMS)
    tombstones = K.empty(K.ORDER_ITEMS)
    incoming = _incoming(state, run, step, numbers, ORDER_ITEMS.name, "items")
    if incoming is not None:
        wins, changed = incoming
        item_wins = wins.select(list(K.ITEM_INDEX))
        item_changed = changed.select(list(K.ORDER_ITEMS))
        moved = changed.filter(pl.col("order_id_old").is_not_null() & (pl.col("order_id_old") != pl.col("order_id")))
        tombstones = moved.select(
            pl.col("order_id_old").alias("order_id"),
            "id",
            *(pl.lit(None).alias(c) for c in list(K.ORDER_ITEMS)[2:-1]),
            pl.lit(True).alias("_del"),
        ).cast(K.ORDER_ITEMS)  # type: ignore[arg-type]
        affected += [changed.get_column("order_id"), moved.get_column("order_id_old")]
    if moved_products:
        affected.append(t["order_items"].scan_column("product_id", moved_products, "order_id"))

    group_ids = pl.concat([s.cast(pl.Int64) for s in affected]).unique() if affected else pl.Series([], dtype=pl.Int64)
    if group_ids.len():
        keys = pl.DataFrame({"order_id": group_ids})
        orders_old = t["orders"].lookup(keys)
        orders_new = _newest(pl.concat([orders_old, order_wins.join(keys, on="order_id", how="semi")]), "order_id")
        items_old = t["order_items"].lookup(keys)
        items_new = pl.concat([items_old.join(item_changed.select("id"), on="id", how="anti"), item_changed])
        new_c = K.contributions(orders_new, items_new, products_new)
        old_c = K.contributions(orders_old, items_old, products_old)
        _move_aggregates(state, run, K.delta(new_c, old_c))
        run.mismatched += new_c.mismatched.height - old_c.mismatched.height
        run.groups += group_ids.len()
    t["orders"].append(order_wins, run.scratch)
    t["items"].append(item_wins, run.scratch)
    t["order_items"].append(pl.concat([tombstones, item_changed]), run.scratch)


def _incoming(
    state: State, run: _Run, step: Step, numbers: dict[str, tuple[int, int]], dataset: str, table: str
) -> tuple[pl.DataFrame, pl.DataFrame] | None:
    """The step's rows of ``dataset``, latest per key, against their stored versions (see :func:`_winners`)."""
    raw = _read(state, step, numbers, dataset)
    if not raw.height:
        return None
    key = state.tables[table].spec.lookup[0]
    new, conflicts = K.latest(raw, key)
    run.conflicts += conflicts
    return _winners(run, new, state.tables[table].lookup(new.select(key)), key)


def _newest(rows: pl.DataFrame, key: str) -> pl.DataFrame:
    return rows.sort(K.VER).unique(subset=[key], keep="last", maintain_order=False)


def _move_aggregates(state: State, run: _Run, d: K.Contribution) -> None:
    """Add a delta to the aggregates; customers move when a (user, date) count leaves or reaches zero."""
    users = state.tables["users"]
    customers = K.empty({"order_date": pl.Date(), "customers": pl.Int64()})
    if d.users.height:
        before = users.lookup(d.users.select("user_id", "order_date"))
        j = d.users.join(before.rename({"n": "old"}), on=["user_id", "order_date"], how="left").with_columns(
            pl.col("old").fill_null(0)
        )
        customers = (
            j.group_by("order_date")
            .agg(
                (((pl.col("old") + pl.col("n")) > 0).cast(pl.Int64) - (pl.col("old") > 0).cast(pl.Int64))
                .sum()
                .alias("customers")
            )
            .filter(pl.col("customers") != 0)
        )
        users.append(d.users, run.scratch)
    change = d.daily.join(customers, on="order_date", how="full", coalesce=True).with_columns(
        pl.col("orders", "returned_orders", "items", "revenue", "customers").fill_null(0)
    )
    state.agg["daily"], _ = K.add(state.agg["daily"], change, ["order_date"], alive="orders")
    state.agg["category"], _ = K.add(state.agg["category"], d.category, ["category", "order_date"], alive="orders")
    state.agg["pending"], _ = K.add(state.agg["pending"], d.pending, ["reason", "arrival_us"], alive="rows")
    run.days.update(change.get_column("order_date").to_list())
    run.cats.update(d.category.select("category", "order_date").iter_rows())
    if d.mismatched.height:
        run.rejects.append(d.mismatched)


# --- publish, commit, clean up ---------------------------------------------------------------------------------
def _publication(state: State, run: _Run, force: tuple[str, str] | None) -> Publication:
    daily, category = state.agg["daily"], state.agg["category"]
    days = pl.DataFrame({"order_date": sorted(run.days)}, schema={"order_date": pl.Date()})
    cats = pl.DataFrame(sorted(run.cats), schema={"category": pl.String(), "order_date": pl.Date()}, orient="row")
    if force is not None:
        days = pl.concat([days, K.in_range(daily, *force).select("order_date")]).unique()
        cats = pl.concat([cats, K.in_range(category, *force).select("category", "order_date")]).unique()
    pub_daily = daily.join(days, on="order_date", how="semi")
    pub_cat = category.join(cats, on=["category", "order_date"], how="semi")
    gone_daily = days.join(daily, on="order_date", how="anti").get_column("order_date")
    gone_cat = cats.join(category, on=["category", "order_date"], how="anti")
    return Publication(
        daily=K.order_kpis(pub_daily),
        category=K.category_kpis(pub_cat),
        gone_daily=sorted(d.isoformat() for d in gone_daily.to_list()),
        gone_category=sorted((c, d.isoformat()) for c, d in gone_cat.iter_rows()),
        reconcile=force,
    )


def _commit(state: State, run: _Run, generation: int, prefix: str) -> Head:
    """Write the aggregates and the merge rejects, then the head: the commit point."""
    store = state.store
    keys: dict[str, str] = {}
    for name, frame in state.agg.items():
        local = run.scratch / f"{name}.parquet"
        frame.write_parquet(local, compression="zstd")
        keys[name] = f"{prefix}/{name}.parquet"
        store.put_file(local, keys[name])
        local.unlink()
    rejects = list(state.head.rejects)
    if run.rejects:
        rejects.append(_write_rejects(state, run, prefix))
    head = Head(
        generation=generation,
        tables={n: t.runs for n, t in state.tables.items()},
        aggregates=keys,
        mismatched=run.mismatched,
        rejects=rejects,
    )
    store.put_bytes(HEAD_KEY, msgspec.json.encode(head))
    return head


def _write_rejects(state: State, run: _Run, prefix: str) -> str:
    """Rows rejected at merge time, with the file and line they came from, the rule and the values compared."""
    files = state.agg["files"].select("fno", "file_id", "source").rename({"fno": "_fno"})
    rows = (
        pl.concat(run.rejects)
        .join(files, on="_fno", how="left")
        .select(
            "file_id",
            "source",
            "_line",
            pl.lit("user_mismatch").alias("_reason"),
            pl.lit("user_id").alias("_column"),
            "id",
            "order_id",
            "user_id",
            "order_user_id",
            "product_id",
            (pl.col("cents") / 100).round(2).cast(pl.String).alias("sale_price"),
        )
        .sort("file_id", "_line")
    )
    local = run.scratch / "merge_rejects.csv"
    rows.write_csv(local)
    key = f"{prefix}/rejected_rows.csv"
    state.store.put_file(local, key)
    local.unlink()
    return key


def _named(head: Head) -> set[str]:
    keys = {HEAD_KEY, *head.aggregates.values(), *head.rejects}
    for runs in head.tables.values():
        for run in runs:
            for f in run:
                keys.add(f.key)
                if f.bloom:
                    keys.add(f.bloom)
    return keys


def _collect_garbage(store: Store, new: Head, delivery: list[Segment]) -> None:
    """Delete what the committed head no longer names: superseded state files, and the merged segments (their
    rows now live in the keyed tables; their manifests stay as the record that the file was staged)."""
    _sweep(store, new)  # also catches this merge's own intermediate files (a run it compacted at once)
    for s in delivery:
        store.delete(s.key)


def _sweep(store: Store, head: Head) -> None:
    """Delete state files a crashed merge wrote but never committed (only the lock holder runs this)."""
    live = _named(head)
    for key in list(store.list_keys("state/")):
        if key not in live:
            store.delete(key)


def _waiting(pending: pl.DataFrame, grace_s: float, now: datetime) -> tuple[dict[str, int], dict[str, int]]:
    """Items still waiting for their order/product, and those waiting past the grace period (orphans)."""
    cutoff_us = int(now.timestamp() * 1_000_000 - grace_s * 1_000_000)
    waiting: dict[str, int] = {}
    orphans: dict[str, int] = {}
    for reason, arrival, n in pending.iter_rows():
        waiting[f"waiting_{reason}"] = waiting.get(f"waiting_{reason}", 0) + n
        if arrival <= cutoff_us:
            orphans[f"orphan_{reason}"] = orphans.get(f"orphan_{reason}", 0) + n
    return waiting, orphans


def current_kpis(store: Store) -> tuple[list[OrderKpi], list[CategoryKpi]]:
    """Every KPI the committed state holds (all dates)."""
    state = State.open(store, load_head(store), "state/read-only")
    return K.order_kpis(state.agg["daily"]), K.category_kpis(state.agg["category"])
