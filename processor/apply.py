"""Applying one step of a delivery to the state (steps 2 and 3 of :mod:`processor.merge`).

For each step: the latest products, orders and items against their stored versions (:func:`_winners`), the order
groups they change, those groups' old rows read by key and their new rows built, the aggregates moved by
``contributions(new) - contributions(old)``, and the changed rows appended to the keyed tables. The (user, date)
counts wait for the end of the merge (:func:`move_customers`).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl

from processor import kpis as K
from processor.log import get_logger
from processor.schema import BUCKET, ORDER_ITEMS, ORDERS, PRODUCTS
from processor.stage import Segment, scan_segment
from processor.state import MergeRun, State
from processor.steps import Cut, Step

log = get_logger("merge")


def _read(state: State, run: MergeRun, step: Step, numbers: dict[str, tuple[int, int]], dataset: str) -> pl.DataFrame:
    """The step's staged rows of ``dataset``, as rows of the state (:func:`processor.kpis.item_rows` and others).

    A staged row group holds a few buckets (:func:`processor.ingest.bucket_row_groups`: two, at 32 buckets), and a
    step of a big delivery often reads one bucket: the next step's bucket is in the same row groups, which would be
    decoded twice (a third of the reading of a 2 GB first load). So when the next step reads other whole buckets of
    the same files, its rows are read with this step's and kept for it (``run.ahead``); they cost one step's staged
    rows of memory, not its working set."""
    if (rows := run.ahead.pop(dataset, None)) is not None:
        return rows
    names = {ORDERS.name: ORDERS, ORDER_ITEMS.name: ORDER_ITEMS, PRODUCTS.name: PRODUCTS}[dataset].names
    mine = [(seg, cut) for seg, cut in step if seg.dataset == dataset]
    later = _read_with(mine, run.upcoming, dataset)
    frames = []
    for seg, cut in mine:
        lf = scan_segment(state.store, seg)
        if later:
            assert cut is not None
            cut = Cut(cut.buckets + later)  # whole buckets: _read_with checked there is no order-id range
        if cut is not None:
            lf = lf.filter(cut.predicate())
        fno, ver = numbers[seg.file_id]
        lf = lf.with_columns(pl.lit(ver, pl.Int64).alias(K.VER), pl.lit(fno, pl.Int32).alias("_fno"))
        keep = [BUCKET] if later else []
        if dataset == PRODUCTS.name:
            frames.append(K.product_rows(lf, names, keep))
            continue
        # Whether the file was staged as facts, asked once per merge: the answer parses the file's footer.
        if (facts := run.staged_as_facts.get(seg.file_id)) is None:
            facts = run.staged_as_facts[seg.file_id] = K.HASH in lf.collect_schema()
        to_rows = K.order_rows if dataset == ORDERS.name else K.item_rows
        frames.append(to_rows(lf, names, keep, facts=facts))
    if not frames:
        return pl.DataFrame()
    rows = pl.concat(frames).collect()
    if not later:
        return rows
    ahead = rows.get_column(BUCKET).is_in(later)
    run.ahead[dataset] = rows.filter(ahead).drop(BUCKET)
    return rows.filter(~ahead).drop(BUCKET)


def _read_with(mine: Step, upcoming: Step | None, dataset: str) -> list[int]:
    """The buckets of the next step to read with this step's rows (:func:`_read`), if any: both steps read whole
    buckets of the same files."""
    theirs = [(seg, cut) for seg, cut in upcoming or [] if seg.dataset == dataset]
    if not mine or [s.file_id for s, _ in mine] != [s.file_id for s, _ in theirs]:
        return []
    cuts = [cut for _, cut in mine + theirs]
    if any(c is None or c.lo is not None or c.hi is not None for c in cuts):
        return []
    return sorted({b for _, c in theirs if c is not None for b in c.buckets})


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
    """Apply one step of the delivery to the state (step 2 of :mod:`processor.merge`): the latest products, orders
    and items against the stored ones, the order groups they change recomputed, the changed rows appended."""
    t = state.tables
    products_old = state.agg["products"]
    moved_products = apply_products(state, run, step, numbers)

    affected: list[pl.Series] = []
    order_wins = K.empty(K.ORDER_STATE)
    all_changed = True  # every winning order changed (then all of them are groups to recompute)
    incoming = _incoming(state, run, step, numbers, ORDERS.name, "orders")
    if incoming is not None:
        wins, changed = incoming
        order_wins = wins.select(list(K.ORDER_STATE))
        all_changed = changed.height == wins.height  # the changed ones are some of the winners
        affected.append(changed.get_column("order_id"))
    item_wins, item_changed, tombstones = _item_changes(state, run, step, numbers, affected)
    if moved_products:
        with run.timed("write"):
            drain(run)  # every order of the moved products, those of this merge's earlier steps included
        affected.append(t["order_items"].scan_column("product_id", moved_products, "order_id"))

    group_ids = _distinct(affected)
    users = K.empty(K.USERS)
    if group_ids.len():
        grouped = order_wins  # the winners of the groups: all of them, unless one was re-sent unchanged
        if not all_changed:
            grouped = order_wins.join(pl.DataFrame({"order_id": group_ids}), on="order_id", how="semi")
        users = _recompute_groups(state, run, group_ids, grouped, item_changed, products_old)
    writes = [
        (t["orders"].append, order_wins),
        (t["items"].append, item_wins),
        (t["order_items"].append, pl.concat([tombstones, item_changed])),
        # the (user, date) counts wait for the end of the merge (see move_customers)
        (t["users"].defer, users),
    ]
    with run.timed("write"):
        drain(run)  # the previous step's files: one step's writes in flight at a time, so memory stays bounded
    # The tables' files are independent: one table's sort, Parquet and Bloom filter overlap the others', and all
    # of them the next step's reads and joins (see apply_steps).
    assert run.writer is not None, "steps are applied by apply_steps"
    run.writing = [run.writer.submit(write, rows, run.scratch) for write, rows in writes]


def apply_steps(state: State, run: MergeRun, steps: Iterable[Step], numbers: dict[str, tuple[int, int]]) -> None:
    """Apply the steps in order, each step's keyed files written while the next step is read and joined.

    The writes take about as long as the rest of a step, and each alone leaves one of the two cores idle part of
    the time. Overlapping them is exact: a step's lookups read only the files from before the merge, or (a later
    delivery, :func:`_recompute_groups`) wait for the writes first; all other state a step changes (the
    aggregates, the products) is changed by this thread only."""
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="keyed-write") as pool:
        run.writer = pool
        steps = list(steps)
        try:
            for i, step in enumerate(steps):
                run.upcoming = steps[i + 1] if i + 1 < len(steps) else None
                apply_step(state, run, step, numbers)
            with run.timed("write"):
                drain(run)
        except BaseException:
            # The step's own error is the one raised; a write that failed meanwhile is logged, not lost.
            for done in run.writing:
                if (error := done.exception()) is not None:
                    log.error("merge.write_failed", error=repr(error))
            run.writing = []
            raise
        finally:
            run.writer = None
            run.upcoming = None
            run.ahead = {}


def drain(run: MergeRun) -> None:
    """Wait for the keyed files being written (raising what a write raised)."""
    writing, run.writing = run.writing, []
    for done in writing:
        done.result()


def apply_products(state: State, run: MergeRun, step: Step, numbers: dict[str, tuple[int, int]]) -> list[int]:
    """Products, a small table kept whole: the step's winning versions replace the stored ones. Returns the ids of
    the products whose category changed (their orders' groups move between categories)."""
    raw = _read(state, run, step, numbers, PRODUCTS.name)
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


def _distinct(parts: list[pl.Series]) -> pl.Series:
    """The distinct order ids of ``parts``, ascending. A stable sort merges runs already in order in linear time (a
    step of files delivered in key order holds two or three), where polars' ``unique`` sorts them all again."""
    if not parts:
        return pl.Series("order_id", [], dtype=pl.Int64)
    ids = np.concatenate([p.drop_nulls().cast(pl.Int64).to_numpy() for p in parts])
    ids.sort(kind="stable")
    first = np.ones(ids.size, dtype=bool)
    np.not_equal(ids[1:], ids[:-1], out=first[1:])
    return pl.Series("order_id", ids[first])


def _recompute_groups(
    state: State,
    run: MergeRun,
    group_ids: pl.Series,
    order_wins: pl.DataFrame,
    item_changed: pl.DataFrame,
    products_old: pl.DataFrame,
) -> pl.DataFrame:
    """Read the changed order groups' old rows by key, build their new rows, and move the aggregates by
    ``contributions(new) - contributions(old)`` (``order_wins``: the step's winning orders of these groups;
    ``products_old``: the products before this step). Returns the change of the (user, date) counts, for the
    caller to write beside the step's other keyed rows."""
    t = state.tables
    keys = pl.DataFrame({"order_id": group_ids})
    # Keyed state empty before this merge (a first load): a group's old rows could only be in this merge's own
    # files, and those hold other orders (steps never share an order: :class:`Cut`; no item has an old order).
    before = 0 if state.start["orders"] == state.start["order_items"] == 0 else None
    if before is None:  # an item's old order may be one an earlier step of this merge wrote
        with run.timed("write"):
            drain(run)
    with run.timed("lookup"):
        orders_old = t["orders"].lookup(keys, files=before)
        items_old = t["order_items"].lookup(keys, files=before)
    with run.timed("delta"):
        orders_new = order_wins
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
        raw = _read(state, run, step, numbers, dataset)
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
    move in :func:`move_customers`, once per merge)."""
    change = d.daily.with_columns(pl.lit(0, pl.Int64).alias("customers"))
    state.agg["daily"] = K.add(state.agg["daily"], change, ["order_date"])
    state.agg["category"] = K.add(state.agg["category"], d.category, ["category", "order_date"])
    state.agg["pending"] = K.add(state.agg["pending"], d.pending, ["reason", "arrival_us"])
    run.days.update(change.get_column("order_date").to_list())
    run.cats.update(d.category.select("category", "order_date").iter_rows())
    if d.mismatched.height:
        run.rejects.append(d.mismatched)


def move_customers(state: State, run: MergeRun, rows_per_pass: int) -> None:
    """Customers per date move when a (user, date) count leaves or reaches zero.

    The steps deferred their (user, date) counts; flushing sums them per (user, date) into files of disjoint user
    ranges, and each file's counts are compared, before it is written, with the counts before the merge (a lookup
    in the files the merge started with). A step never looks up what an earlier step of the same merge wrote:
    (user, date) pairs recur across the steps of a big delivery, and that would read every earlier file at every
    step."""
    counter = CustomerCounter(state)
    with run.timed("write"):
        state.tables["users"].flush(run.scratch, rows_per_pass, each=counter.add)
    counter.apply(state, run)


class CustomerCounter:
    """Moves the daily customer counts by (user, date) counts, given a key range at a time (each range's rows
    once: a flush or a rewrite of the users table shows it each file's rows, :data:`processor.keyed.Visitor`),
    compared with the counts in the files the merge started with."""

    def __init__(self, state: State) -> None:
        self.users = state.tables["users"]
        self.before = state.start["users"]
        self.moved: list[pl.DataFrame] = []

    def add(self, counts: pl.DataFrame) -> None:
        dn = counts.select("user_id", "order_date", "n")
        was = self.users.lookup(dn.select("user_id", "order_date"), files=self.before).rename({"n": "old"})
        j = dn.join(was, on=["user_id", "order_date"], how="left").with_columns(pl.col("old").fill_null(0))
        flips = ((pl.col("old") + pl.col("n")) > 0).cast(pl.Int64) - (pl.col("old") > 0).cast(pl.Int64)
        self.moved.append(j.group_by("order_date").agg(flips.sum().alias("customers")))

    def apply(self, state: State, run: MergeRun) -> None:
        if not self.moved:
            return
        customers = (
            pl.concat(self.moved).group_by("order_date").agg(pl.col("customers").sum()).filter(pl.col("customers") != 0)
        )
        change = customers.with_columns(
            pl.lit(0, pl.Int64).alias(c) for c in ("orders", "returned_orders", "items", "revenue")
        )
        state.agg["daily"] = K.add(state.agg["daily"], change, ["order_date"])
        run.days.update(customers.get_column("order_date").to_list())
