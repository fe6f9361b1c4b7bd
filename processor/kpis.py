"""Exact KPIs (SPEC section 3) as pure functions over polars frames, maintained by signed deltas.

The unit of work is the *order group*: an order with all of its items (and their products). Every KPI is a sum of
per-group contributions -- a group adds 1 to its date's orders, 1 to (its user, its date), 1 to each (category,
date) in which it has a counted item, its items and cents -- so when a delivery changes some groups, the stored
aggregates move by ``contributions(new groups) - contributions(old groups)``: a Z-set delta in the sense of DBSP.
Distinct counts stay exact under retraction because the contribution of a group to a distinct count is 0 or 1 and
the one distinct count that spans groups, customers per date, is kept as reference counts per (user, date):
a customer counts while their count is above zero.

Money is integer cents from staging on; rates are derived from the exact components only when shown or stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import polars as pl

from processor.model import CategoryKpi, OrderKpi
from processor.pairs import group_by_pair

#: Arrival version of a row: arrival time in microseconds shifted left 10 bits, plus 10 bits of a digest of the
#: file, so versions are totally ordered (the later arrival wins) and files landing in the same microsecond tie
#: deterministically.
VER = "_ver"
TIE_BITS = 10
HASH = "_h"  # digest of a row's staged values: a new version that differs is a conflict

ORDER_STATE: dict[str, pl.DataType] = {
    "order_id": pl.Int64(),
    "user_id": pl.Int64(),
    "order_date": pl.Date(),
    "o_ret": pl.Boolean(),
    VER: pl.Int64(),
    HASH: pl.UInt64(),
}
#: The record-level index of items: which order holds an item id now, and which version it is.
ITEM_INDEX: dict[str, pl.DataType] = {"id": pl.Int64(), "order_id": pl.Int64(), VER: pl.Int64(), HASH: pl.UInt64()}
#: Items by order: what a group's contribution is computed from.
ORDER_ITEMS: dict[str, pl.DataType] = {
    "order_id": pl.Int64(),
    "id": pl.Int64(),
    "user_id": pl.Int64(),
    "product_id": pl.Int64(),
    "cents": pl.Int64(),
    "i_ret": pl.Boolean(),
    VER: pl.Int64(),
    "_line": pl.Int64(),
    "_fno": pl.Int32(),  # the file it came from (number in the merged-files table), for reject reports
    "_del": pl.Boolean(),
}
USERS: dict[str, pl.DataType] = {"user_id": pl.Int64(), "order_date": pl.Date(), "n": pl.Int64()}
PRODUCT_STATE: dict[str, pl.DataType] = {
    "product_id": pl.Int64(),
    "category": pl.String(),
    VER: pl.Int64(),
    HASH: pl.UInt64(),
}

DAILY: dict[str, pl.DataType] = {
    "order_date": pl.Date(),
    "orders": pl.Int64(),
    "returned_orders": pl.Int64(),
    "items": pl.Int64(),
    "revenue": pl.Int64(),  # cents
    "customers": pl.Int64(),
}
CATEGORY: dict[str, pl.DataType] = {
    "category": pl.String(),
    "order_date": pl.Date(),
    "orders": pl.Int64(),
    "returned_orders": pl.Int64(),
    "items": pl.Int64(),
    "revenue": pl.Int64(),
}
PENDING: dict[str, pl.DataType] = {"reason": pl.String(), "arrival_us": pl.Int64(), "rows": pl.Int64()}
MISMATCH: dict[str, pl.DataType] = {
    "id": pl.Int64(),
    "order_id": pl.Int64(),
    "user_id": pl.Int64(),
    "order_user_id": pl.Int64(),
    "product_id": pl.Int64(),
    "cents": pl.Int64(),
    "_line": pl.Int64(),
    "_fno": pl.Int32(),
}
#: The key columns of each aggregate (and of the (user, date) counts): what deltas are summed by.
KEYS = {"daily": ["order_date"], "users": ["user_id", "order_date"], "category": ["category", "order_date"]}
KEYS["pending"] = ["reason", "arrival_us"]


def row_digest(columns: Sequence[str]) -> pl.Expr:
    """A 64-bit digest of a row's values (per-column hashes combined; nulls hash to a constant)."""
    exprs = [pl.col(c).hash(seed=i) for i, c in enumerate(columns)]
    out = exprs[0]
    for e in exprs[1:]:
        out = out * 1_000_003 + e
    return out.alias(HASH)


def _returned() -> pl.Expr:
    return (pl.col("status") == "returned") | pl.col("returned_at").is_not_null()


def _cents() -> pl.Expr:
    return (pl.col("sale_price").cast(pl.Decimal(20, 2)) * 100).cast(pl.Int64).alias("cents")


def order_facts(data_columns: Sequence[str]) -> list[pl.Expr]:
    """What the merge needs of a typed order row, from its typed values: staged instead of the row itself
    (:func:`processor.ingest.ingest`), or computed from a segment staged whole (:func:`order_rows`)."""
    return [
        pl.col("order_id"),
        pl.col("user_id"),
        pl.col("created_at").dt.date().alias("order_date"),
        _returned().alias("o_ret"),
        row_digest(data_columns),
    ]


def item_facts(data_columns: Sequence[str]) -> list[pl.Expr]:
    """What the merge needs of a typed item row (see :func:`order_facts`)."""
    return [
        pl.col("order_id"),
        pl.col("id"),
        pl.col("user_id"),
        pl.col("product_id"),
        _cents(),
        _returned().alias("i_ret"),
        row_digest(data_columns),
    ]


def staged_facts(staged: pl.LazyFrame, facts: list[pl.Expr], as_facts: bool | None = None) -> list[pl.Expr]:
    """``facts`` as columns of a segment that holds them already (``as_facts``; when None, whether it has the
    digest), else computed from its typed rows (a segment staged whole: a file validated in parts, or one staged
    before facts were)."""
    if as_facts is None:
        as_facts = HASH in staged.collect_schema()
    return [pl.col(e.meta.output_name()) for e in facts] if as_facts else facts


def order_rows(
    staged: pl.LazyFrame, data_columns: Sequence[str], keep: Sequence[str] = (), *, facts: bool | None = None
) -> pl.LazyFrame:
    """Staged orders (with ``_ver``) -> rows of the orders state (and the staged columns ``keep``); ``facts``: see
    :func:`staged_facts`."""
    *values, digest = staged_facts(staged, order_facts(data_columns), facts)  # the digest is the last fact
    return staged.select(*values, VER, digest, *keep)


def item_rows(
    staged: pl.LazyFrame, data_columns: Sequence[str], keep: Sequence[str] = (), *, facts: bool | None = None
) -> pl.LazyFrame:
    """Staged items (with ``_ver`` and ``_fno``) -> rows of the items-by-order state, plus their digest (and the
    staged columns ``keep``); ``facts``: see :func:`staged_facts`."""
    *values, digest = staged_facts(staged, item_facts(data_columns), facts)  # the digest is the last fact
    return staged.select(*values, VER, "_line", "_fno", pl.lit(False).alias("_del"), digest, *keep)


def product_rows(staged: pl.LazyFrame, data_columns: Sequence[str], keep: Sequence[str] = ()) -> pl.LazyFrame:
    return staged.select(pl.col("id").alias("product_id"), "category", VER, row_digest(data_columns), *keep)


def latest(rows: pl.DataFrame, key: str) -> tuple[pl.DataFrame, int]:
    """The latest version of each key in one batch, and how many keys came in versions that disagree."""
    if rows.is_empty():
        return rows, 0
    conflicts = rows.group_by(key).agg(pl.col(HASH).n_unique().alias("v")).filter(pl.col("v") > 1).height
    return rows.sort(VER).unique(subset=[key], keep="last", maintain_order=False), conflicts


@dataclass
class Contribution:
    """What some order groups add to the aggregates (or, as a delta, how much they move them)."""

    daily: pl.DataFrame  # order_date -> orders, returned_orders, items, revenue
    users: pl.DataFrame  # (user_id, order_date, n): weights, one per order; a key may repeat (sum them)
    category: pl.DataFrame  # (category, order_date) -> orders, returned_orders, items, revenue
    pending: pl.DataFrame  # (reason, arrival_us) -> items waiting for their order or product
    mismatched: pl.DataFrame  # items whose user differs from their order's (rejected: user_mismatch)


def contributions(orders: pl.DataFrame, items: pl.DataFrame, products: pl.DataFrame) -> Contribution:
    """The contribution of the order groups in ``orders``/``items`` (current rows of the state tables).

    An item counts when its order and product are known and it has its order's user; it waits while its order or
    its product is missing; it is rejected (``user_mismatch``) when its order names another user.
    """
    o = in_key_order(orders.select("order_id", "user_id", "order_date", "o_ret"), "order_id")
    items = in_key_order(items, "order_id")
    daily_orders = o.group_by("order_date").agg(
        pl.len().cast(pl.Int64).alias("orders"), pl.col("o_ret").sum().cast(pl.Int64).alias("returned_orders")
    )
    # A weight of 1 per order: the merge sums (user, date) weights once, when it writes them (KeyedTable.flush);
    # summing them here too cost a group-by of every order at every step, a third of this function's time.
    users = o.select("user_id", "order_date", pl.lit(1, pl.Int64).alias("n"))
    # Items carry their category's number in the sorted list of categories, not its name: a join copies an
    # integer per item instead of a string, and (number, date) groups by one packed key (processor.pairs).
    names = products.select(pl.col("category").unique().sort()).with_row_index("cat").cast({"cat": pl.Int64})
    codes = products.join(names, on="category").select("product_id", "cat")
    it = items.join(
        o.select("order_id", pl.col("user_id").alias("order_user_id"), "order_date"), on="order_id", how="left"
    ).join(codes, on="product_id", how="left")
    state = (
        pl.when(pl.col("order_user_id").is_null())
        .then(pl.lit("order"))
        .when(pl.col("user_id") != pl.col("order_user_id"))
        .then(pl.lit("mismatch"))
        .when(pl.col("cat").is_null())
        .then(pl.lit("product"))
    )
    it = it.with_columns(state.alias("reason"))
    counted = it.filter(pl.col("reason").is_null())
    daily_items = counted.group_by("order_date").agg(
        pl.len().cast(pl.Int64).alias("items"), pl.col("cents").sum().cast(pl.Int64).alias("revenue")
    )
    daily = daily_orders.join(daily_items, on="order_date", how="left").with_columns(
        pl.col("items", "revenue").fill_null(0)
    )
    # Distinct orders per (category, date) with n_unique inside the group: a group-by on (category, date, order)
    # first gives the same counts several times slower.
    category = group_by_pair(
        counted,
        "cat",
        "order_date",
        [
            pl.col("order_id").n_unique().cast(pl.Int64).alias("orders"),
            pl.col("order_id").filter(pl.col("i_ret")).n_unique().cast(pl.Int64).alias("returned_orders"),
            pl.len().cast(pl.Int64).alias("items"),
            pl.col("cents").sum().cast(pl.Int64).alias("revenue"),
        ],
    ).join(names, on="cat")
    pending = (
        it.filter(pl.col("reason").is_in(["order", "product"]))
        .group_by("reason", (pl.col(VER) // (1 << TIE_BITS)).alias("arrival_us"))
        .agg(pl.len().cast(pl.Int64).alias("rows"))
    )
    mismatched = it.filter(pl.col("reason") == "mismatch").select(list(MISMATCH))
    return Contribution(
        daily=daily.select(list(DAILY)[:-1]),
        users=users.select(list(USERS)),
        category=category.select(list(CATEGORY)),
        pending=pending.select(list(PENDING)),
        mismatched=mismatched,
    )


def in_key_order(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    """``frame``, with ``key`` flagged sorted when it is (checked: one pass over the column). Polars joins two
    frames flagged sorted on their key by merging them, about four times faster than through a hash table; a step
    of a file delivered in key order reads its rows in key order, but polars cannot know it."""
    column = frame.get_column(key)
    return frame.with_columns(column.set_sorted()) if column.is_sorted() else frame


def nothing() -> Contribution:
    """The contribution of no group (the old side of groups that are all new)."""
    return Contribution(
        daily=empty({k: v for k, v in DAILY.items() if k != "customers"}),
        users=empty(USERS),
        category=empty(CATEGORY),
        pending=empty(PENDING),
        mismatched=empty(MISMATCH),
    )


def delta(new: Contribution, old: Contribution) -> Contribution:
    """``new - old``, keeping only the keys whose figures moved. Mismatched items: those newly rejected."""
    out = {}
    for name, key in KEYS.items():
        a, b = getattr(new, name), getattr(old, name)
        measures = [c for c in a.columns if c not in key]
        both = pl.concat([a, b.with_columns(-pl.col(m) for m in measures)], how="vertical_relaxed")
        summed = both.group_by(key).agg(pl.col(m).sum() for m in measures)
        out[name] = summed.filter(pl.any_horizontal(pl.col(m) != 0 for m in measures))
    fresh = new.mismatched.join(
        old.mismatched.select("id", "order_id", "user_id"), on=["id", "order_id", "user_id"], how="anti"
    )
    return Contribution(mismatched=fresh, **out)


def add(aggregate: pl.DataFrame, change: pl.DataFrame, key: list[str]) -> pl.DataFrame:
    """``aggregate + change`` by ``key``; rows whose measures all fall to 0 are dropped (their group is gone)."""
    if change.is_empty():
        return aggregate
    measures = [c for c in change.columns if c not in key]
    merged = (
        pl.concat([aggregate, change], how="diagonal_relaxed")
        .group_by(key)
        .agg(pl.col(c).fill_null(0).sum() for c in aggregate.columns if c not in key)
        .select(aggregate.columns)
        .cast(aggregate.schema)  # type: ignore[arg-type]
    )
    zero = pl.all_horizontal(pl.col(c) == 0 for c in aggregate.columns if c not in key)
    bad = merged.filter(pl.any_horizontal(pl.col(m) < 0 for m in measures if m in merged.columns))
    if not bad.is_empty():
        raise ValueError(f"negative aggregate after a delta (the state is inconsistent): {bad.head(3).to_dicts()}")
    return merged.filter(~zero)


def order_kpis(daily: pl.DataFrame) -> list[OrderKpi]:
    return [
        OrderKpi(
            order_date=r["order_date"].isoformat(),
            total_orders=r["orders"],
            returned_orders=r["returned_orders"],
            total_items_sold=r["items"],
            revenue_cents=r["revenue"],
            unique_customers=r["customers"],
        )
        for r in daily.sort("order_date").iter_rows(named=True)
    ]


def category_kpis(category: pl.DataFrame) -> list[CategoryKpi]:
    return [
        CategoryKpi(
            category=r["category"],
            order_date=r["order_date"].isoformat(),
            orders=r["orders"],
            returned_orders=r["returned_orders"],
            items=r["items"],
            revenue_cents=r["revenue"],
        )
        for r in category.sort("order_date", "category").iter_rows(named=True)
    ]


def empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def in_range(frame: pl.DataFrame, date_from: str, date_to: str) -> pl.DataFrame:
    return frame.filter(pl.col("order_date").is_between(date.fromisoformat(date_from), date.fromisoformat(date_to)))
