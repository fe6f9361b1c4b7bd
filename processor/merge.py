"""The incremental merge: committed segments -> bucket partials -> KPIs of the dates that changed.

One merge runs at a time (the caller holds the merge lock; see :mod:`processor.tasks`). Each merge:

1. lists the committed segments and numbers them in arrival order (the ordinal decides which version of a key wins);
2. finds the *dirty* buckets, whose set of segments (plus the set of product segments, which every bucket joins)
   differs from the one their current partials were computed from -- so a merge that crashed, or a segment committed
   while another merge ran, is simply picked up by the next merge;
3. recomputes each dirty bucket from all of its segments (exact: deduplicated, joined, reduced), one bucket at a time,
   so memory is bounded by a bucket, not by the data set;
4. compares the new partials with the old ones to find the dates whose figures changed, and combines the partials of
   every bucket into the KPIs of those dates only (plus any dates the caller forces, for reprocessing);
5. publishes those KPIs, then moves the state pointer to the new partials, then deletes the replaced ones.

A crash before step 5's pointer move leaves the old state in force: the next merge recomputes the same buckets, finds
the same changed dates and publishes again (publishing is idempotent). Nothing is deleted before its successor is in
place.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import msgspec
import polars as pl

from processor.kpis import ORD, Partials, bucket_partials, combine, latest_versions
from processor.log import get_logger
from processor.model import CategoryKpi, MergeResult, OrderKpi
from processor.schema import BUCKET, ORDER_ITEMS, ORDERS, PRODUCTS, Dataset
from processor.stage import Segment, committed_segments
from processor.store import Store

log = get_logger("merge")

STATE_KEY = "state/current.json"
PARTS = ("daily", "users", "category", "pending", "late")
#: Upper bound of (date, customer) pairs combined at once; bounds memory of the distinct-customer union.
USERS_PER_PASS = 4_000_000
#: Staged rows (orders + items) recomputed in one pass; bounds the merge's memory.
ROWS_PER_PASS = 6_000_000

Publisher = Callable[[list[OrderKpi], list[CategoryKpi], int], int]


class BucketRef(msgspec.Struct, kw_only=True):
    prefix: str  # partials/g=G/p=N: the partials of the pass that computed this bucket (shared by its buckets)
    fingerprint: str  # digest of the segment ids the partials were computed from


class MergeState(msgspec.Struct, kw_only=True):
    generation: int = 0
    buckets: dict[str, BucketRef] = msgspec.field(default_factory=dict)


@dataclass
class _Run:
    store: Store
    scratch: Path
    generation: int
    ordinals: dict[str, int]
    arrivals: dict[int, int] = field(default_factory=dict)  # ordinal -> arrival_us
    conflicts: int = 0
    pending_conflicts: list[pl.LazyFrame] = field(default_factory=list)  # collected with the partials


def load_state(store: Store) -> MergeState:
    data = store.get_bytes(STATE_KEY)
    return msgspec.json.decode(data, type=MergeState) if data else MergeState()


def merge(
    store: Store,
    *,
    buckets: int,
    generation: int,
    scratch: Path,
    publish: Publisher | None = None,
    force_dates: tuple[str, str] | None = None,
    orphan_grace_s: float = 86400.0,
    rows_per_pass: int = ROWS_PER_PASS,
    now: datetime | None = None,
) -> tuple[MergeResult, list[OrderKpi], list[CategoryKpi]]:
    """Bring the KPIs up to date with every committed segment. See the module docstring.

    ``publish(daily, category, generation)`` stores the recomputed KPIs (DynamoDB in the tasks; None locally) and
    returns how many items it wrote. ``force_dates=(from, to)`` recomputes and republishes that inclusive range even
    if nothing changed (reprocessing). Dirty buckets are recomputed in passes of about ``rows_per_pass`` staged rows,
    which bounds memory. Returns the result summary and the KPIs that were recomputed.
    """
    started = time.perf_counter()
    segments = committed_segments(store)
    state = load_state(store)
    generation = max(generation, state.generation + 1)
    run = _Run(store=store, scratch=scratch, generation=generation, ordinals={})
    run.ordinals = {s.file_id: i + 1 for i, s in enumerate(segments)}
    run.arrivals = {run.ordinals[s.file_id]: s.arrival_us for s in segments}
    scratch.mkdir(parents=True, exist_ok=True)

    products_segs = [s for s in segments if s.dataset == PRODUCTS.name]
    product_ids = "|".join(s.file_id for s in products_segs)
    by_bucket: dict[int, list[Segment]] = {b: [] for b in range(buckets)}
    for s in segments:
        if s.dataset != PRODUCTS.name:
            for b in s.buckets:
                by_bucket[b].append(s)

    dirty: dict[int, str] = {}
    for b, segs in by_bucket.items():
        if not segs and str(b) not in state.buckets:
            continue
        fp = hashlib.sha256((product_ids + "#" + "|".join(s.file_id for s in segs)).encode()).hexdigest()[:32]
        ref = state.buckets.get(str(b))
        if ref is None or ref.fingerprint != fp:
            dirty[b] = fp

    changed_dates: set[date] = set()
    new_refs: dict[str, BucketRef] = {}
    if dirty:
        log.info("merge.start", dirty_buckets=len(dirty), segments=len(segments), generation=generation)
        products = _latest(run, products_segs, PRODUCTS, None).collect()
        run.conflicts += _collect_conflicts(run)
        for group in _passes(dirty, by_bucket, rows_per_pass):
            in_pass = list({s.file_id: s for b in group for s in by_bucket[b]}.values())
            orders = _latest(run, [s for s in in_pass if s.dataset == ORDERS.name], ORDERS, group)
            items = _latest(run, [s for s in in_pass if s.dataset == ORDER_ITEMS.name], ORDER_ITEMS, group)
            new = bucket_partials(orders, items, products)
            run.conflicts += _collect_conflicts(run)
            old = _read_partials(store, {str(b): state.buckets[str(b)] for b in group if str(b) in state.buckets})
            changed_dates |= _changed_dates(old, new)
            prefix = _write_partials(run, len(new_refs), new)
            for b in group:
                new_refs[str(b)] = BucketRef(prefix=prefix, fingerprint=dirty[b])

    refs = {**state.buckets, **new_refs}
    dates = {d.isoformat() for d in changed_dates}
    if force_dates is not None:
        dates |= _forced_dates(store, refs, *force_dates)
    daily, category = combine_dates(store, refs, sorted(dates))
    written = publish(daily, category, generation) if publish and dates else 0

    pending, orphans, late = _waiting(run, store, refs, orphan_grace_s, now or datetime.now(UTC))
    if new_refs:
        store.put_bytes(STATE_KEY, msgspec.json.encode(MergeState(generation=generation, buckets=refs)))
        live = {r.prefix for r in refs.values()}
        for prefix in {r.prefix for r in state.buckets.values()} - live:
            for part in PARTS:
                store.delete(f"{prefix}/{part}.parquet")
    result = MergeResult(
        generation=generation,
        segments=len(segments),
        buckets_recomputed=len(dirty),
        dates=sorted(dates),
        daily_kpis=len(daily),
        category_kpis=len(category),
        published=written,
        pending=pending,
        orphans=orphans,
        late_rejects=late,
        conflicts=run.conflicts,
        seconds=round(time.perf_counter() - started, 3),
    )
    if run.conflicts:
        log.warning("merge.conflicts", keys=run.conflicts, rule="later-arriving file wins")
    if orphans:
        log.warning("merge.orphans", **orphans)
    log.info("merge.done", **msgspec.structs.asdict(result) | {"dates": len(result.dates)})
    return result, daily, category


def _passes(dirty: dict[int, str], by_bucket: dict[int, list[Segment]], rows_per_pass: int) -> list[list[int]]:
    """Group dirty buckets so each pass reads about ``rows_per_pass`` staged rows (estimated from the manifests)."""
    groups: list[list[int]] = [[]]
    load = 0
    for b in sorted(dirty):
        rows = sum(s.rows // max(len(s.buckets), 1) for s in by_bucket[b])
        if groups[-1] and load + rows > rows_per_pass:
            groups.append([])
            load = 0
        groups[-1].append(b)
        load += rows
    return groups


def _latest(run: _Run, segs: Sequence[Segment], dataset: Dataset, group: list[int] | None) -> pl.LazyFrame:
    """Rows of ``segs`` (of the buckets in ``group``, or all) tagged with their file's ordinal, latest per key."""
    frames = []
    for s in segs:
        lf = pl.scan_parquet(run.store.local_path(s.key))
        if group is not None:
            lf = lf.filter(pl.col(BUCKET).is_in(group))
        frames.append(lf.with_columns(pl.lit(run.ordinals[s.file_id], pl.Int64).alias(ORD)))
    if not frames:
        schema = dataset.staged_schema() | {BUCKET: pl.Int32(), ORD: pl.Int64()}
        return pl.LazyFrame(schema=schema)
    latest, conflicts = latest_versions(pl.concat(frames), dataset.key, len(frames))
    if conflicts is not None:
        run.pending_conflicts.append(conflicts)
    return latest


def _collect_conflicts(run: _Run) -> int:
    found = sum(int(f.item()) for f in pl.collect_all(run.pending_conflicts)) if run.pending_conflicts else 0
    run.pending_conflicts = []
    return found


def _write_partials(run: _Run, first_bucket: int, p: Partials) -> str:
    """One file per part for a whole pass (several buckets, keyed by ``_b``): few objects, however many buckets."""
    prefix = f"partials/g={run.generation}/p={first_bucket:05d}"
    for part, frame in zip(PARTS, p.frames(), strict=True):
        local = run.scratch / f"{part}.parquet"
        frame.sort(BUCKET).write_parquet(local, compression="zstd", statistics=True)
        run.store.put_file(local, f"{prefix}/{part}.parquet")
        local.unlink()
    return prefix


def _by_prefix(refs: dict[str, BucketRef]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for b, r in refs.items():
        out.setdefault(r.prefix, []).append(int(b))
    return out


def scan_part(store: Store, refs: dict[str, BucketRef], part: str) -> pl.LazyFrame:
    """One part of the partials of the buckets in ``refs`` (a file may also hold other, superseded buckets)."""
    frames = [
        pl.scan_parquet(store.local_path(f"{prefix}/{part}.parquet")).filter(pl.col(BUCKET).is_in(bs))
        for prefix, bs in _by_prefix(refs).items()
    ]
    return pl.concat(frames) if frames else pl.LazyFrame()


def _read_partials(store: Store, refs: dict[str, BucketRef]) -> Partials:
    if not refs:
        return Partials.empty()
    return Partials(*(scan_part(store, refs, part).collect() for part in PARTS))


def _changed_dates(old: Partials, new: Partials) -> set[date]:
    """Dates on which the two partials differ (rows present on one side only)."""
    if old.daily.is_empty() and old.category.is_empty():
        return set(new.daily.get_column("order_date").to_list())  # first computation: every date is new
    out: set[date] = set()
    for a, b in ((old.daily, new.daily), (old.users, new.users), (old.category, new.category)):
        both = pl.concat([a, b], how="vertical_relaxed")
        only_one = both.filter(~both.is_duplicated())
        out.update(only_one.get_column("order_date").unique().to_list())
    return out


def _forced_dates(store: Store, refs: dict[str, BucketRef], date_from: str, date_to: str) -> set[str]:
    """Dates of the inclusive range that have data (reprocessing republishes exactly these)."""
    if not refs:
        return set()
    lo, hi = date.fromisoformat(date_from), date.fromisoformat(date_to)
    found = (
        scan_part(store, refs, "daily")
        .filter(pl.col("order_date").is_between(lo, hi))
        .select(pl.col("order_date").unique())
        .collect()
        .get_column("order_date")
    )
    return {d.isoformat() for d in found.to_list()}


def combine_dates(
    store: Store, refs: dict[str, BucketRef], dates: list[str]
) -> tuple[list[OrderKpi], list[CategoryKpi]]:
    """Combine partials date group by date group, so the distinct-customer union stays within USERS_PER_PASS."""
    if not dates or not refs:
        return [], []
    sizes = dict(
        scan_part(store, refs, "daily")
        .filter(pl.col("order_date").is_in([date.fromisoformat(d) for d in dates]))
        .group_by("order_date")
        .agg(pl.col("orders").sum())
        .collect()
        .iter_rows()
    )
    groups: list[list[str]] = [[]]
    budget = 0
    for d in dates:
        n = int(sizes.get(date.fromisoformat(d), 0))
        if groups[-1] and budget + n > USERS_PER_PASS:
            groups.append([])
            budget = 0
        groups[-1].append(d)
        budget += n
    daily: list[OrderKpi] = []
    category: list[CategoryKpi] = []
    for g in groups:
        dk, ck = combine(
            scan_part(store, refs, "daily"), scan_part(store, refs, "users"), scan_part(store, refs, "category"), g
        )
        daily += dk
        category += ck
    return daily, category


def _waiting(
    run: _Run, store: Store, refs: dict[str, BucketRef], grace_s: float, now: datetime
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Items still waiting for their order/product, those waiting past the grace period, and late rejects."""
    pending: dict[str, int] = {}
    orphans: dict[str, int] = {}
    if not refs:
        return pending, orphans, {}
    cutoff_us = int(now.timestamp() * 1_000_000 - grace_s * 1_000_000)
    rows = scan_part(store, refs, "pending").group_by("reason", ORD).agg(pl.col("rows").sum()).collect()
    for reason, ordinal, n in rows.iter_rows():
        pending[f"waiting_{reason}"] = pending.get(f"waiting_{reason}", 0) + n
        if run.arrivals.get(ordinal, cutoff_us + 1) <= cutoff_us:
            code = f"orphan_{reason}"
            orphans[code] = orphans.get(code, 0) + n
    late_n = scan_part(store, refs, "late").select(pl.len()).collect().item()
    return pending, orphans, ({"user_mismatch": int(late_n)} if late_n else {})
