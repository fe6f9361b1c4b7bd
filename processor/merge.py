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
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import polars as pl

from processor import kpis as K
from processor.apply import apply_steps, duplicate_items, move_customers
from processor.log import get_logger
from processor.model import CategoryKpi, MergeResult, OrderKpi
from processor.settings import Settings
from processor.stage import Segment, committed_segments
from processor.state import (
    FILES,
    HEAD_KEY,
    Head,
    MergeRun,
    State,
    collect_garbage,
    generation_prefix,
    load_head,
    put_frame,
    sweep,
)
from processor.steps import delivery_steps
from processor.store import Store

log = get_logger("merge")


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
    steps = delivery_steps(state.store, delivery, rows_per_pass)
    with run.timed("read"):
        run.duplicates = duplicate_items(state, delivery, numbers, rows_per_pass)
    apply_steps(state, run, steps, numbers)
    move_customers(state, run, rows_per_pass)
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
