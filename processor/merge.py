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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import pairwise
from pathlib import Path

import msgspec
import numpy as np
import polars as pl
import pyarrow.parquet as pq

from processor import kpis as K
from processor.keyed import KeyedTable, Run, TableFile, TableSpec
from processor.log import get_logger
from processor.model import CategoryKpi, MergeResult, OrderKpi
from processor.schema import BUCKET, ORDER_ITEMS, ORDERS, PRODUCTS, ROUTE
from processor.settings import Settings
from processor.stage import Segment, committed_segments, scan_segment
from processor.store import Store

log = get_logger("merge")

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

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - started


def merge(
    store: Store,
    *,
    generation: int,
    scratch: Path,
    publish: Publisher | None = None,
    force_dates: tuple[str, str] | None = None,
    orphan_grace_s: float = 86400.0,
    rows_per_pass: int = Settings.merge_rows,
    now: datetime | None = None,
    fence: Callable[[], None] | None = None,
    buckets: int = 32,
) -> tuple[MergeResult, list[OrderKpi], list[CategoryKpi]]:
    """Bring the KPIs up to date with every committed segment. See the module docstring.

    ``publish(publication, generation)`` stores what changed (DynamoDB in the tasks; None locally) and returns how
    many items it wrote or removed. ``force_dates=(from, to)`` republishes that inclusive range even if nothing
    changed, and removes stored items of the range that no longer exist (reprocessing). ``fence()`` raises when
    this merge may no longer commit (its lease was lost); it is called before the head moves. ``buckets`` is the
    staging bucket count (``SHOPKPI_BUCKETS``), recorded by the first merge; ``rows_per_pass``
    (``SHOPKPI_MERGE_ROWS``) bounds the staged rows of one step. Returns the summary and the KPIs that were published.
    """
    started = time.perf_counter()
    head = load_head(store)
    head.buckets = head.buckets or buckets
    generation = max(generation, head.generation + 1)
    prefix = generation_prefix(generation)
    sweep(store, head)
    state = State.open(store, head, prefix)
    segments = committed_segments(store)
    merged = set(state.agg["files"].get_column("file_id").to_list())
    delivery = [s for s in segments if s.file_id not in merged]
    run = MergeRun(scratch=scratch, generation=generation, started=started, mismatched=head.mismatched)
    scratch.mkdir(parents=True, exist_ok=True)
    if delivery:
        _apply_delivery(state, run, delivery, rows_per_pass)

    pub = publication(state, run, force_dates)
    written = publish(pub, generation) if publish and pub else 0
    changed = bool(delivery) or bool(run.rejects)
    if changed:
        if fence is not None:
            fence()
        new_head = commit_head(state, run, generation, prefix)
        collect_garbage(store, new_head, delivery)

    waiting = waiting_items(state.agg["pending"], orphan_grace_s, now or datetime.now(UTC))
    result = summarise(
        state, run, pub, segments=len(segments), files_merged=len(delivery), written=written, waiting=waiting
    )
    return result, pub.daily, pub.category


def _apply_delivery(state: State, run: MergeRun, delivery: list[Segment], rows_per_pass: int) -> None:
    """Steps 1 to 3 of the module docstring: the delivery in steps, applied one after the other, then compacted."""
    log.info("merge.start", files=len(delivery), generation=run.generation, state_rows=state.tables["order_items"].rows)
    numbers = register_files(state, delivery)
    steps = _steps(state.store, delivery, rows_per_pass)
    with run.timed("read"):
        run.duplicates = duplicate_items(state, delivery, numbers, rows_per_pass)
    for step in steps:
        apply_step(state, run, step, numbers)
    _move_customers(state, run, rows_per_pass)
    with run.timed("compact"):
        for table in state.tables.values():
            table.compact(run.scratch, rows_per_file=rows_per_pass)


def summarise(
    state: State,
    run: MergeRun,
    pub: Publication,
    *,
    segments: int,
    files_merged: int,
    written: int,
    waiting: tuple[dict[str, int], dict[str, int]],
) -> MergeResult:
    """The merge's result, logged (with a warning for conflicting versions and for orphans)."""
    pending, orphans = waiting
    result = MergeResult(
        generation=run.generation,
        segments=segments,
        files_merged=files_merged,
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
        seconds=round(time.perf_counter() - run.started, 3),
    )
    if run.conflicts:
        log.warning("merge.conflicts", keys=run.conflicts, rule="later-arriving file wins")
    if orphans:
        log.warning("merge.orphans", **orphans)
    timings = {k: round(v, 3) for k, v in run.timings.items()}
    log.info("merge.done", **msgspec.structs.asdict(result) | {"dates": len(result.dates), "timings": timings})
    return result


# --- the delivery ----------------------------------------------------------------------------------------------
def register_files(state: State, delivery: list[Segment]) -> dict[str, tuple[int, int]]:
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


@dataclass(frozen=True)
class Cut:
    """The staged rows of a file that one step reads: those of some buckets and, when one bucket holds more rows
    than a step may, those of a range of order ids within it (orders and their items route by order id, so a cut
    keeps an order and its items together whichever way it is made)."""

    buckets: list[int]
    lo: int | None = None  # order ids from ``lo`` (inclusive) ...
    hi: int | None = None  # ... to ``hi`` (exclusive); None: no bound

    def predicate(self) -> pl.Expr:
        rows = pl.col(BUCKET).is_in(self.buckets)
        if self.lo is not None:
            rows &= pl.col(ROUTE) >= self.lo
        if self.hi is not None:
            rows &= pl.col(ROUTE) < self.hi
        return rows


#: A step: the files it reads and which of their rows (None: all of them).
Step = list[tuple[Segment, Cut | None]]


def _steps(store: Store, delivery: list[Segment], rows_per_pass: int) -> list[Step]:
    """The delivery in steps of about ``rows_per_pass`` staged rows.

    A small delivery is one step. A bigger one is cut by staging bucket (``order_id mod buckets``) across all of its
    files, and a bucket bigger than a step by order id (:class:`RouteIndex`), so that an order and its items,
    wherever they were delivered, are applied in the same step and each order group is computed once (the whole
    products delivery goes with the first step). Any cut would be exact: a step compares every row with the state
    as the earlier steps left it.
    """
    big = [s for s in delivery if s.dataset != PRODUCTS.name]
    total = sum(s.rows for s in big)
    if total <= rows_per_pass:
        return [[(s, None) for s in delivery]]
    small: Step = [(s, None) for s in delivery if s.dataset == PRODUCTS.name]
    steps = bucket_steps(store, big, bucket_load(big), rows_per_pass)
    return [(small if i == 0 else []) + step for i, step in enumerate(steps)]


def bucket_load(segments: list[Segment]) -> dict[int, float]:
    """Staged rows per bucket (a file's rows spread evenly over the buckets it holds)."""
    load: dict[int, float] = {}
    for s in segments:
        for b in s.buckets:
            load[b] = load.get(b, 0.0) + s.rows / max(len(s.buckets), 1)
    return load


def bucket_groups(load: dict[int, float], limit: float) -> list[list[int]]:
    """Consecutive buckets in groups of at most about ``limit`` rows (a bucket bigger than that is a group)."""
    groups: list[list[int]] = [[]]
    acc = 0.0
    for b in sorted(load):
        if groups[-1] and acc + load[b] > limit:
            groups.append([])
            acc = 0.0
        groups[-1].append(b)
        acc += load[b]
    return groups


def bucket_steps(store: Store, segments: list[Segment], load: dict[int, float], rows_per_pass: int) -> list[Step]:
    """One step per group of the buckets in ``load`` (:func:`bucket_groups`: the files holding rows of those
    buckets, read for those buckets only), and per order id range of a bucket that holds more than
    ``rows_per_pass`` rows (:class:`RouteIndex`)."""
    index: RouteIndex | None = None
    steps: list[Step] = []
    for g in bucket_groups(load, rows_per_pass):
        files = [s for s in segments if set(g).intersection(s.buckets)]
        pieces = -(-int(sum(load.get(b, 0.0) for b in g)) // rows_per_pass)
        if len(g) == 1 and pieces > 1:
            index = index or RouteIndex.of(store, segments)
            ranges = index.ranges(g[0], rows_per_pass, pieces)
        else:
            ranges = [(None, None)]
        steps += [[(s, Cut(g, lo, hi)) for s in files] for lo, hi in ranges]
    return steps


Range = tuple[int | None, int | None]


@dataclass
class RouteIndex:
    """Where a big delivery's order ids lie, to cut a bucket that is bigger than a step into order-id ranges.

    Why: a step is at least one bucket, and with the bucket count fixed at the first load a bucket grows with the
    data, and a step's memory with it (at 5 GB of CSV a bucket of 32 held 1.8 M staged rows, and the merge peaked
    above 1 GiB). The staged files' row groups each hold a bucket or two of one chunk, and their statistics say
    which order ids and how many rows; read once per merge from the files' footers, they give cuts of about
    ``rows_per_pass`` rows each however the ids are spread (:func:`_quantiles`). Files staged before those
    statistics were kept give only the span of the ids: ranges of equal width (ids are usually dense; skewed ones
    give uneven steps, never wrong ones: any cut is exact).
    """

    groups: np.ndarray | None  # per row group: lowest and highest bucket, lowest and highest order id, rows
    span: tuple[int, int] | None = None

    @classmethod
    def of(cls, store: Store, segments: list[Segment]) -> RouteIndex:
        found: list[np.ndarray] = []
        for seg in segments:
            for key in [p.key for p in seg.pieces] or [seg.key]:
                with store.open(key) as handle:
                    groups = _route_groups(pq.read_metadata(handle))
                if groups is None:
                    return cls(None, route_span(store, segments))
                found.append(groups)
        return cls(np.concatenate(found) if found else np.empty((0, 5), dtype=np.int64))

    def ranges(self, bucket: int, rows_per_pass: int, pieces: int) -> list[Range]:
        """Order-id ranges that together hold every row of ``bucket`` (the first and the last open-ended)."""
        if self.groups is None:
            assert self.span is not None
            lo, hi = self.span
            width = max(1, -(-(hi - lo + 1) // pieces))
            cuts = [lo + width * j for j in range(1, pieces) if lo + width * j <= hi]
        else:
            g = self.groups[(self.groups[:, 0] <= bucket) & (bucket <= self.groups[:, 1])]
            rows = g[:, 4] / (g[:, 1] - g[:, 0] + 1)  # a group of several buckets: its rows shared evenly
            cuts = _quantiles(g[:, 2], g[:, 3], rows, rows_per_pass)
        bounds: list[int | None] = [None, *cuts, None]
        return list(pairwise(bounds))


def _quantiles(low: np.ndarray, high: np.ndarray, rows: np.ndarray, step: int) -> list[int]:
    """Order ids that cut ``rows`` spread evenly over the ranges ``[low, high]`` into parts of about ``step``.

    The row groups' ranges overlap (orders and items files, chunks out of order), so their rows are summed as a
    density over the ids, whose running total is inverted at each multiple of ``step``."""
    points = np.concatenate([low, high + 1]).astype(np.float64)
    width = np.maximum(high + 1 - low, 1).astype(np.float64)
    order = np.argsort(points, kind="stable")
    points = points[order]
    density = np.maximum(np.cumsum(np.concatenate([rows / width, -rows / width])[order])[:-1], 0.0)
    between = density * np.diff(points)  # rows in [points[i], points[i + 1])
    before = np.concatenate([[0.0], np.cumsum(between)])
    targets = np.arange(1, int(np.ceil(before[-1] / step))) * float(step)
    i = np.clip(np.searchsorted(before, targets, side="right") - 1, 0, between.size - 1)
    frac = (targets - before[i]) / np.where(between[i] > 0, between[i], 1.0)
    at = np.ceil(points[i] + frac * (points[i + 1] - points[i])).astype(np.int64)
    return sorted(set(at.tolist()))


def _route_groups(md: pq.FileMetaData) -> np.ndarray | None:
    """(lowest bucket, highest bucket, lowest order id, highest order id, rows) of each row group; None without
    their statistics."""
    names = md.schema.names
    if BUCKET not in names or ROUTE not in names:
        return None
    b_col, r_col = names.index(BUCKET), names.index(ROUTE)
    out = np.empty((md.num_row_groups, 5), dtype=np.int64)
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        b, r = rg.column(b_col).statistics, rg.column(r_col).statistics
        if b is None or r is None or not (b.has_min_max and r.has_min_max):
            return None
        out[i] = (b.min, b.max, r.min, r.max, rg.num_rows)
    return out


def route_span(store: Store, segments: list[Segment]) -> tuple[int, int]:
    """The lowest and highest order id of the segments' rows (one integer column read by the streaming engine, so
    the column is never held whole)."""
    scans = [scan_segment(store, s).select(ROUTE) for s in segments]
    span = pl.concat(scans).select(pl.col(ROUTE).min().alias("lo"), pl.col(ROUTE).max().alias("hi"))
    lo, hi = span.collect(engine="streaming").row(0)
    return int(lo), int(hi)


def _read(state: State, step: Step, numbers: dict[str, tuple[int, int]], dataset: str) -> pl.DataFrame:
    rows = {ORDERS.name: K.order_rows, ORDER_ITEMS.name: K.item_rows, PRODUCTS.name: K.product_rows}[dataset]
    names = {ORDERS.name: ORDERS, ORDER_ITEMS.name: ORDER_ITEMS, PRODUCTS.name: PRODUCTS}[dataset].names
    frames = []
    for seg, cut in step:
        if seg.dataset != dataset:
            continue
        lf = scan_segment(state.store, seg)
        if cut is not None:
            lf = lf.filter(cut.predicate())
        fno, ver = numbers[seg.file_id]
        lf = lf.with_columns(pl.lit(ver, pl.Int64).alias(K.VER), pl.lit(fno, pl.Int32).alias("_fno"))
        frames.append(rows(lf, names))
    return pl.concat(frames).collect() if frames else pl.DataFrame()


def duplicate_items(
    state: State, delivery: list[Segment], numbers: dict[str, tuple[int, int]], rows_per_pass: int
) -> pl.DataFrame | None:
    """Item ids that more than one file of the delivery holds, with their latest version.

    Steps cut the delivery by order, so two versions of one item under different orders could land in different
    steps; resolving them here first lets every step look items up in the state as it was before the merge only.
    Read in passes by id (the id column only), so memory stays bounded on a first load of many part files."""
    files = [s for s in delivery if s.dataset == ORDER_ITEMS.name]
    if len(files) < 2:
        return None
    scans = [scan_segment(state.store, s).select("id", pl.lit(numbers[s.file_id][1]).alias("best")) for s in files]
    passes = max(1, -(-sum(s.rows for s in files) // rows_per_pass))
    found = []
    for p in range(passes):
        part = pl.concat(scans)
        if passes > 1:
            part = part.filter(pl.col("id") % passes == p)
        found.append(part.filter(pl.col("id").is_duplicated()).group_by("id").agg(pl.col("best").max()).collect())
    dups = pl.concat(found)
    return dups if dups.height else None


def _winners(run: MergeRun, new: pl.DataFrame, old: pl.DataFrame, key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """New versions that beat the stored ones (or have none), and of those the ones whose values differ.

    For items, both frames also have the old order (``order_id_old``)."""
    carried = ["order_id"] if key == "id" else []  # an item's old order: the group it may leave
    if old.is_empty():  # all new (a first load): every row wins and is a change
        fresh = new.with_columns(pl.lit(None, old.schema[c]).alias(f"{c}_old") for c in carried)
        return fresh, fresh
    j = new.join(old.select(key, *carried, K.VER, K.HASH), on=key, how="left", suffix="_old")
    seen = pl.col(f"{K.VER}_old").is_not_null()
    run.conflicts += j.filter(seen & (pl.col(K.HASH) != pl.col(f"{K.HASH}_old"))).height
    wins = j.filter(~seen | (pl.col(K.VER) > pl.col(f"{K.VER}_old")))
    changed = wins.filter(~seen | (pl.col(K.HASH) != pl.col(f"{K.HASH}_old")))
    return wins, changed


def apply_step(state: State, run: MergeRun, step: Step, numbers: dict[str, tuple[int, int]]) -> None:
    """Apply one step of the delivery to the state (see the module docstring, step 2): the latest products, orders
    and items against the stored ones, the order groups they change recomputed, the changed rows appended."""
    t = state.tables
    products_old = state.agg["products"]
    moved_products = apply_products(state, run, step, numbers)

    affected: list[pl.Series] = []
    order_wins = K.empty(K.ORDER_STATE)
    incoming = _incoming(state, run, step, numbers, ORDERS.name, "orders")
    if incoming is not None:
        wins, changed = incoming
        order_wins = wins.select(list(K.ORDER_STATE))
        affected.append(changed.get_column("order_id"))
    item_wins, item_changed, tombstones = _item_changes(state, run, step, numbers, affected)
    if moved_products:
        affected.append(t["order_items"].scan_column("product_id", moved_products, "order_id"))

    group_ids = pl.concat([s.cast(pl.Int64) for s in affected]).unique() if affected else pl.Series([], dtype=pl.Int64)
    users = K.empty(K.USERS)
    if group_ids.len():
        users = _recompute_groups(state, run, group_ids, order_wins, item_changed, products_old)
    with run.timed("write"):
        writes = [
            (t["orders"].append, order_wins),
            (t["items"].append, item_wins),
            (t["order_items"].append, pl.concat([tombstones, item_changed])),
            # the (user, date) counts wait for the end of the merge (see _move_customers)
            (t["users"].defer, users),
        ]
        # The tables' files are independent: one table's sort, Parquet and Bloom filter overlap the others'.
        with ThreadPoolExecutor(max_workers=len(writes), thread_name_prefix="keyed-write") as pool:
            for done in [pool.submit(write, rows, run.scratch) for write, rows in writes]:
                done.result()


def apply_products(state: State, run: MergeRun, step: Step, numbers: dict[str, tuple[int, int]]) -> list[int]:
    """Products, a small table kept whole: the step's winning versions replace the stored ones. Returns the ids of
    the products whose category changed (their orders' groups move between categories)."""
    raw = _read(state, step, numbers, PRODUCTS.name)
    if not raw.height:
        return []
    products_old = state.agg["products"]
    new, c = K.latest(raw, "product_id")
    run.conflicts += c
    wins, changed = _winners(run, new, products_old, "product_id")
    old_cat = products_old.select("product_id", pl.col("category").alias("old"))
    moved = changed.join(old_cat, on="product_id", how="left").filter(pl.col("old").ne_missing(pl.col("category")))
    state.agg["products"] = pl.concat(
        [
            products_old.join(wins.select("product_id"), on="product_id", how="anti"),
            wins.select(list(K.PRODUCT_STATE)),
        ]
    )
    return moved.get_column("product_id").to_list()


def _item_changes(
    state: State, run: MergeRun, step: Step, numbers: dict[str, tuple[int, int]], affected: list[pl.Series]
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The step's items against the stored ones: the winners (for the item index), those whose values changed, and
    tombstones for the items that left their order. Appends to ``affected`` the order groups they change: the new
    order of a changed item, and the old one of a moved item."""
    incoming = _incoming(state, run, step, numbers, ORDER_ITEMS.name, "items")
    if incoming is None:
        return K.empty(K.ITEM_INDEX), K.empty(K.ORDER_ITEMS), K.empty(K.ORDER_ITEMS)
    wins, changed = incoming
    moved = changed.filter(pl.col("order_id_old").is_not_null() & (pl.col("order_id_old") != pl.col("order_id")))
    tombstones = moved.select(
        pl.col("order_id_old").alias("order_id"),
        "id",
        *(pl.lit(None).alias(c) for c in list(K.ORDER_ITEMS)[2:-1]),
        pl.lit(True).alias("_del"),
    ).cast(K.ORDER_ITEMS)  # type: ignore[arg-type]
    affected += [changed.get_column("order_id"), moved.get_column("order_id_old")]
    return wins.select(list(K.ITEM_INDEX)), changed.select(list(K.ORDER_ITEMS)), tombstones


def _recompute_groups(
    state: State,
    run: MergeRun,
    group_ids: pl.Series,
    order_wins: pl.DataFrame,
    item_changed: pl.DataFrame,
    products_old: pl.DataFrame,
) -> pl.DataFrame:
    """Read the changed order groups' old rows by key, build their new rows, and move the aggregates by
    ``contributions(new) - contributions(old)`` (``products_old``: the products before this step). Returns the
    change of the (user, date) counts, for the caller to write beside the step's other keyed rows."""
    t = state.tables
    keys = pl.DataFrame({"order_id": group_ids})
    # Keyed state empty before this merge (a first load): a group's old rows could only be in this merge's own
    # files, and those hold other orders (steps never share an order: :class:`Cut`; no item has an old order).
    before = 0 if state.start["orders"] == state.start["order_items"] == 0 else None
    with run.timed("lookup"):
        orders_old = t["orders"].lookup(keys, files=before)
        items_old = t["order_items"].lookup(keys, files=before)
    with run.timed("delta"):
        orders_new = order_wins.join(keys, on="order_id", how="semi")
        items_new = item_changed
        if orders_old.height or items_old.height:
            orders_new = _newest(pl.concat([orders_old, orders_new]), "order_id")
            items_new = pl.concat([items_old.join(item_changed.select("id"), on="id", how="anti"), item_changed])
            new_c = K.contributions(orders_new, items_new, state.agg["products"])
            old_c = K.contributions(orders_old, items_old, products_old)
            d = K.delta(new_c, old_c)
        else:  # all new groups: the delta is their contribution (which holds no zero figure)
            new_c = d = K.contributions(orders_new, items_new, state.agg["products"])
            old_c = K.nothing()
    _move_aggregates(state, run, d)
    run.mismatched += new_c.mismatched.height - old_c.mismatched.height
    run.groups += group_ids.len()
    return d.users


def _incoming(
    state: State, run: MergeRun, step: Step, numbers: dict[str, tuple[int, int]], dataset: str, table: str
) -> tuple[pl.DataFrame, pl.DataFrame] | None:
    """The step's rows of ``dataset``, latest per key, against their stored versions (see :func:`_winners`)."""
    with run.timed("read"):
        raw = _read(state, step, numbers, dataset)
    if not raw.height:
        return None
    key = state.tables[table].spec.lookup[0]
    if dataset == ORDER_ITEMS.name and run.duplicates is not None:
        # An item id the delivery holds more than once is applied in one step only, at its latest version.
        raw = (
            raw.join(run.duplicates, on="id", how="left")
            .filter(pl.col("best").is_null() | (pl.col(K.VER) == pl.col("best")))
            .drop("best")
        )
    if sum(1 for seg, _ in step if seg.dataset == dataset) > 1:
        new, conflicts = K.latest(raw, key)
        run.conflicts += conflicts
    else:
        new = raw  # one file: its keys are unique (validation rejects a repeated key)
    with run.timed("lookup"):
        # Only the files from before this merge: no other step of it holds these keys (orders: steps never share
        # an order; items: an id the delivery holds twice was resolved to one step, see above).
        old = state.tables[table].lookup(new.select(key), files=state.start[table])
    return _winners(run, new, old, key)


def _newest(rows: pl.DataFrame, key: str) -> pl.DataFrame:
    return rows.sort(K.VER).unique(subset=[key], keep="last", maintain_order=False)


def _move_aggregates(state: State, run: MergeRun, d: K.Contribution) -> None:
    """Add a delta to the aggregates (not the (user, date) counts: :func:`apply_step` defers them, and customers
    move in :func:`_move_customers`, once per merge)."""
    change = d.daily.with_columns(pl.lit(0, pl.Int64).alias("customers"))
    state.agg["daily"] = K.add(state.agg["daily"], change, ["order_date"])
    state.agg["category"] = K.add(state.agg["category"], d.category, ["category", "order_date"])
    state.agg["pending"] = K.add(state.agg["pending"], d.pending, ["reason", "arrival_us"])
    run.days.update(change.get_column("order_date").to_list())
    run.cats.update(d.category.select("category", "order_date").iter_rows())
    if d.mismatched.height:
        run.rejects.append(d.mismatched)


def _move_customers(state: State, run: MergeRun, rows_per_pass: int) -> None:
    """Customers per date move when a (user, date) count leaves or reaches zero.

    The steps deferred their (user, date) counts; flushing sums them per (user, date) into files of disjoint user
    ranges, and each is compared with the counts before the merge (a lookup in the files the merge started with).
    A step never looks up what an earlier step of the same merge wrote: (user, date) pairs recur across the steps
    of a big delivery, and that would read every earlier file at every step."""
    with run.timed("write"):
        mine = state.tables["users"].flush(run.scratch, rows_per_pass)
    count_customers(state, run, mine)


def count_customers(state: State, run: MergeRun, mine: list[TableFile]) -> None:
    """Move the daily customer counts by the (user, date) counts of ``mine`` (this merge's files of the users
    table, of disjoint user ranges), compared with the counts in the files the merge started with."""
    users = state.tables["users"]
    moved: list[pl.DataFrame] = []
    for f in mine:
        dn = pl.read_parquet(state.store.local_path(f.key), glob=False)
        with run.timed("lookup"):
            was = users.lookup(dn.select("user_id", "order_date"), files=state.start["users"]).rename({"n": "old"})
        j = dn.join(was, on=["user_id", "order_date"], how="left").with_columns(pl.col("old").fill_null(0))
        flips = ((pl.col("old") + pl.col("n")) > 0).cast(pl.Int64) - (pl.col("old") > 0).cast(pl.Int64)
        moved.append(j.group_by("order_date").agg(flips.sum().alias("customers")))
    if not moved:
        return
    customers = pl.concat(moved).group_by("order_date").agg(pl.col("customers").sum()).filter(pl.col("customers") != 0)
    change = customers.with_columns(
        pl.lit(0, pl.Int64).alias(c) for c in ("orders", "returned_orders", "items", "revenue")
    )
    state.agg["daily"] = K.add(state.agg["daily"], change, ["order_date"])
    run.days.update(customers.get_column("order_date").to_list())


# --- publish, commit, clean up ---------------------------------------------------------------------------------
def publication(state: State, run: MergeRun, force: tuple[str, str] | None) -> Publication:
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


def commit_head(state: State, run: MergeRun, generation: int, prefix: str) -> Head:
    """Write the aggregates and the merge rejects, then the head: the commit point."""
    store = state.store
    keys = {name: put_frame(store, run.scratch, frame, f"{prefix}/{name}.parquet") for name, frame in state.agg.items()}
    rejects = list(state.head.rejects)
    if run.rejects:
        rejects.append(_write_rejects(state, run, prefix))
    head = Head(
        generation=generation,
        buckets=state.head.buckets,
        tables={n: t.runs for n, t in state.tables.items()},
        aggregates=keys,
        mismatched=run.mismatched,
        rejects=rejects,
    )
    store.put_bytes(HEAD_KEY, msgspec.json.encode(head))
    return head


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


def _write_rejects(state: State, run: MergeRun, prefix: str) -> str:
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


def waiting_items(pending: pl.DataFrame, grace_s: float, now: datetime) -> tuple[dict[str, int], dict[str, int]]:
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
