"""A first load's merge, fanned out: a plan, parallel parts by staging bucket, and a small final step.

A first load (keyed state still empty) is the biggest merge there is, and the only one whose work splits cleanly:

* with no stored rows, an order group holds only rows of the delivery, and every order and item of one staging
  bucket (``order_id mod buckets``) lies in that bucket; items the delivery holds twice are resolved to one version
  (and so one order) before anything is applied, as the single-task merge does. Parts that own disjoint buckets
  therefore touch disjoint order groups and write disjoint keys;
* what the groups add up to is additive: each part's daily, category and pending figures are deltas that sum.
  Only the customers per date are not: a customer with orders in two parts counts once, so the parts hand over
  their (user, date) counts and the final step counts distinct pairs.

The steps, each a task of its own on AWS (a Map over ECS tasks) or a thread locally:

1. :func:`plan` (under the merge lock, which it keeps): the delivery, its file numbers, the latest products, the
   item ids held twice, and bucket groups of about equal rows, written to ``state/g=<G>/plan.json``;
2. :func:`run_part` for each group: the single-task merge's own steps (:func:`processor.apply.apply_steps`) on
   that group, writing the keyed tables' files and the aggregates' deltas under ``state/g=<G>/p<i>/`` and, last,
   ``result.json`` (a retried part that finds it answers it);
3. :func:`finish`: adopts the parts' files into one run per table, sums the deltas, counts the customers, then
   publishes, commits the head and deletes what it no longer names, exactly as the single-task merge ends.

Nothing is visible before the head moves: a plan or part abandoned half-way leaves files the next merge sweeps.
Later deliveries are not fanned out: an item moving to an order of another bucket changes the groups of two parts,
which the sequential steps handle and parallel ones would not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import polars as pl

from processor import kpis as K
from processor.apply import CustomerCounter, apply_products, apply_steps, duplicate_items
from processor.errors import StalePlan
from processor.keyed import Run
from processor.log import context, get_logger
from processor.merge import Publisher, commit_head, publication, register_files, summarise, waiting_items
from processor.model import CategoryKpi, MergeResult, OrderKpi
from processor.schema import PRODUCTS
from processor.stage import Segment, committed_segments
from processor.state import Head, MergeRun, State, collect_garbage, generation_prefix, load_head, put_frame, sweep
from processor.steps import bucket_groups, bucket_load, bucket_steps
from processor.store import Store

log = get_logger("fanout")

DELTAS = ("daily", "category", "pending")  # aggregates whose parts add up
KEYED = ("orders", "items", "order_items")  # keyed tables whose parts hold disjoint keys


class MergePlan(msgspec.Struct, kw_only=True):
    """What every part and the final step of one fanned-out merge work from."""

    generation: int  # the generation the final step commits
    base: int  # the head's generation the plan was made from: a part finding another one stops
    buckets: int
    owner: str  # the merge lock's holder (AWS): parts and the final step renew and check its lease...
    lease: int  # ... by the lock's generation (its fencing token)
    rows_per_pass: int
    delivery: list[Segment]
    numbers: dict[str, tuple[int, int]]  # file id -> (file number, arrival version)
    parts: list[list[int]]  # each part's staging buckets
    products: str  # the products after this delivery (a Parquet key)
    duplicates: str | None = None  # item ids delivered more than once -> latest version (a Parquet key)
    conflicts: int = 0  # products delivered with different values
    started: str = ""  # when the planning merge began (ISO 8601, UTC): the fanned-out merge's run starts there

    @property
    def prefix(self) -> str:
        return generation_prefix(self.generation)

    @property
    def key(self) -> str:
        return plan_key(self.generation)


class PartTask(msgspec.Struct, kw_only=True):
    """One item of the workflow's Map over the parts: which plan, which part."""

    plan: str
    part: int


class PartResult(msgspec.Struct, kw_only=True):
    """What one part wrote: the commit record of its work, written last."""

    index: int
    tables: dict[str, Run]  # keyed table -> the part's files (users: (user, date) counts, not yet summed)
    deltas: dict[str, str]  # aggregate -> Parquet key of the part's delta
    rejects: str | None = None  # items rejected at merge time (user_mismatch), unformatted
    conflicts: int = 0
    groups: int = 0
    mismatched: int = 0
    rows: int = 0  # staged rows the part applied
    seconds: float = 0.0


def plan_key(generation: int) -> str:
    return f"{generation_prefix(generation)}/plan.json"


def plan_generation(key: str) -> int:
    """The generation a plan's key names (``state/g=<G>/plan.json``)."""
    try:
        return int(key.split("/")[1].removeprefix("g="))
    except (IndexError, ValueError):
        raise StalePlan(f"not a merge plan's key: {key!r}") from None


def load_plan(store: Store, key: str) -> MergePlan:
    data = store.get_bytes(key) if key.startswith("state/g=") else None
    if data is None:
        raise StalePlan(f"merge plan {key} is gone: another merge took over and swept it")
    return msgspec.json.decode(data, type=MergePlan)


def plan(
    store: Store,
    *,
    generation: int,
    scratch: Path,
    buckets: int,
    parts: int,
    min_rows: int,
    rows_per_pass: int,
    owner: str = "",
    lease: int = 0,
    started: str = "",
) -> MergePlan | None:
    """The plan of a fanned-out first load, written to the store; None when this merge is better run as one task
    (fewer than two parts asked for, keyed state not empty, or fewer than ``min_rows`` staged rows to merge)."""
    head = load_head(store)
    if parts < 2 or any(runs for runs in head.tables.values()):
        return None
    head.buckets = head.buckets or buckets
    state = State.open(store, head, "state/plan")
    merged = set(state.agg["files"].get_column("file_id").to_list())
    delivery = [s for s in committed_segments(store) if s.file_id not in merged]
    big = [s for s in delivery if s.dataset != PRODUCTS.name]
    load = bucket_load(big)
    total = sum(load.values())
    if total < min_rows or len(load) < 2:
        return None
    generation = max(generation, head.generation + 1)
    sweep(store, head)  # files of an earlier attempt that never committed
    run = MergeRun(scratch=scratch, generation=generation, started=time.perf_counter())
    numbers = register_files(state, delivery)
    apply_products(state, run, [(s, None) for s in delivery if s.dataset == PRODUCTS.name], numbers)
    prefix = generation_prefix(generation)
    the_plan = MergePlan(
        generation=generation,
        base=head.generation,
        buckets=head.buckets,
        owner=owner,
        lease=lease,
        rows_per_pass=rows_per_pass,
        delivery=delivery,
        numbers=numbers,
        parts=[g for g in bucket_groups(load, total / parts) if g],
        products=put_frame(store, scratch, state.agg["products"], f"{prefix}/plan-products.parquet"),
        conflicts=run.conflicts,
        started=started,
    )
    dups = duplicate_items(state, delivery, numbers, rows_per_pass)
    if dups is not None:
        the_plan.duplicates = put_frame(store, scratch, dups, f"{prefix}/plan-duplicates.parquet")
    store.put_bytes(the_plan.key, msgspec.json.encode(the_plan))
    log.info("fanout.planned", generation=generation, parts=len(the_plan.parts), rows=int(total), files=len(delivery))
    return the_plan


def run_part(
    store: Store, the_plan: MergePlan, index: int, scratch: Path, fence: Callable[[], None] | None = None
) -> PartResult:
    """Apply one part's buckets of the delivery (see the module docstring, step 2). Idempotent."""
    key = _result_key(the_plan, index)
    done = store.get_bytes(key)
    if done is not None:
        return msgspec.json.decode(done, type=PartResult)
    started = time.perf_counter()
    state = _open(store, the_plan, f"{the_plan.prefix}/p{index}")
    for name in DELTAS:  # the part's aggregates start empty, so that what it leaves is its delta
        state.agg[name] = state.agg[name].clear()
    run = MergeRun(scratch=scratch, generation=the_plan.generation, started=started)
    if the_plan.duplicates is not None:
        run.duplicates = pl.read_parquet(store.local_path(the_plan.duplicates), glob=False)
    big = [s for s in the_plan.delivery if s.dataset != PRODUCTS.name]
    mine = set(the_plan.parts[index])
    load = {b: n for b, n in bucket_load(big).items() if b in mine}
    apply_steps(state, run, bucket_steps(store, big, load, the_plan.rows_per_pass), the_plan.numbers)
    users = state.tables["users"].flush(scratch, the_plan.rows_per_pass)
    prefix = f"{the_plan.prefix}/p{index}"
    result = PartResult(
        index=index,
        tables={n: state.tables[n].written for n in KEYED} | {"users": users},
        deltas={n: put_frame(store, scratch, state.agg[n], f"{prefix}/{n}.parquet") for n in DELTAS},
        conflicts=run.conflicts,
        groups=run.groups,
        mismatched=run.mismatched,
        rows=int(sum(load.values())),
    )
    if run.rejects:
        result.rejects = put_frame(store, scratch, pl.concat(run.rejects), f"{prefix}/rejects.parquet")
    result.seconds = round(time.perf_counter() - started, 3)
    if fence is not None:
        fence()
    store.put_bytes(key, msgspec.json.encode(result))
    log.info("fanout.part_done", part=index, rows=result.rows, groups=result.groups, seconds=result.seconds)
    return result


def finish(
    store: Store,
    the_plan: MergePlan,
    scratch: Path,
    *,
    publish: Publisher | None = None,
    fence: Callable[[], None] | None = None,
    orphan_grace_s: float = 86400.0,
    now: datetime | None = None,
) -> tuple[MergeResult, list[OrderKpi], list[CategoryKpi]]:
    """Put the parts together and commit (see the module docstring, step 3)."""
    started = time.perf_counter()
    scratch.mkdir(parents=True, exist_ok=True)
    state = _open(store, the_plan, the_plan.prefix)
    results = [_part_result(store, the_plan, i) for i in range(len(the_plan.parts))]
    run = MergeRun(scratch=scratch, generation=the_plan.generation, started=started)
    run.conflicts = the_plan.conflicts
    run.mismatched = state.head.mismatched
    if register_files(state, the_plan.delivery) != the_plan.numbers:
        raise StalePlan(f"merge plan {the_plan.key} numbers its files differently from the state")
    for r in results:
        for name in KEYED:
            state.tables[name].adopt(r.tables[name])
        for name in DELTAS:
            delta = pl.read_parquet(store.local_path(r.deltas[name]), glob=False)
            state.agg[name] = K.add(state.agg[name], delta, K.KEYS[name])
        if r.rejects is not None:
            run.rejects.append(pl.read_parquet(store.local_path(r.rejects), glob=False))
        run.conflicts += r.conflicts
        run.groups += r.groups
        run.mismatched += r.mismatched
    counter = CustomerCounter(state)
    with run.timed("write"):
        counts = [f for r in results for f in r.tables["users"]]
        state.tables["users"].absorb(counts, scratch, the_plan.rows_per_pass, each=counter.add)
    counter.apply(state, run)
    run.days.update(state.agg["daily"].get_column("order_date").to_list())
    run.cats.update(state.agg["category"].select("category", "order_date").iter_rows())

    pub = publication(state, run, None)
    written = publish(pub, the_plan.generation) if publish and pub else 0
    if fence is not None:
        fence()
    new_head = commit_head(state, run, the_plan.generation, the_plan.prefix)
    collect_garbage(store, new_head, the_plan.delivery)
    result = summarise(
        state,
        run,
        pub,
        segments=len(committed_segments(store)),
        files_merged=len(the_plan.delivery),
        written=written,
        waiting=waiting_items(state.agg["pending"], orphan_grace_s, now or datetime.now(UTC)),
    )
    return result, pub.daily, pub.category


def merge_in_threads(
    store: Store,
    the_plan: MergePlan,
    scratch: Path,
    *,
    workers: int,
    orphan_grace_s: float = 86400.0,
) -> tuple[MergeResult, list[OrderKpi], list[CategoryKpi]]:
    """Every part in a pool of ``workers`` threads, then the final step: a fanned-out merge in one process (polars,
    pyarrow and numpy release the GIL for the heavy work, so the parts run side by side on the cores)."""

    def part(i: int) -> PartResult:
        with context(stage="merge", part=i):
            return run_part(store, the_plan, i, scratch / f"p{i}")

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="merge-part") as pool:
        list(pool.map(part, range(len(the_plan.parts))))
    return finish(store, the_plan, scratch / "finish", orphan_grace_s=orphan_grace_s)


# --- helpers -----------------------------------------------------------------------------------------------------
def _result_key(the_plan: MergePlan, index: int) -> str:
    return f"{the_plan.prefix}/p{index}/result.json"


def _part_result(store: Store, the_plan: MergePlan, index: int) -> PartResult:
    data = store.get_bytes(_result_key(the_plan, index))
    if data is None:
        raise StalePlan(f"part {index} of merge plan {the_plan.key} has no result: it did not finish")
    return msgspec.json.decode(data, type=PartResult)


def _open(store: Store, the_plan: MergePlan, prefix: str) -> State:
    """The state the plan was made from, with the delivery's products in place."""
    head: Head = load_head(store)
    if head.generation != the_plan.base:
        raise StalePlan(
            f"merge plan {the_plan.key} was made from generation {the_plan.base}; the state is at {head.generation}"
        )
    head.buckets = the_plan.buckets
    state = State.open(store, head, prefix)
    state.agg["products"] = pl.read_parquet(store.local_path(the_plan.products), glob=False)
    return state
