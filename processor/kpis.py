"""Exact KPIs (SPEC section 3) as pure functions over polars frames.

The work is split so that memory is bounded by one staging bucket, not by the data set:

1. :func:`latest_versions` -- within one bucket, keep each primary key's version from the latest-arriving file.
2. :func:`bucket_partials` -- join that bucket's items to their orders and products and reduce it to *partial
   aggregates*: per date and per (category, date) counts and exact sums, and the set of (date, user) pairs.
   Orders and their items share a bucket (both are routed by ``order_id``), so every distinct-order count is
   additive across buckets; distinct customers are not (a customer's orders spread over buckets), which is why the
   partials keep the (date, user) set and :func:`combine` takes the union.
3. :func:`combine` -- merge the partials of all buckets into the KPIs of the requested dates.

Money stays ``Decimal(38, 2)`` (exact) and is converted to integer cents at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import polars as pl

from processor.model import CategoryKpi, OrderKpi
from processor.schema import BUCKET

ORD = "_ord"  # arrival ordinal of the file a row came from: higher arrived later
SUM_DTYPE = pl.Decimal(38, 2)

DAILY_SCHEMA: dict[str, pl.DataType] = {
    BUCKET: pl.Int32(),
    "order_date": pl.Date(),
    "orders": pl.Int64(),
    "returned_orders": pl.Int64(),
    "items": pl.Int64(),
    "revenue": SUM_DTYPE,
}
#: The distinct customers of each (bucket, date), as a sorted list: compact, and compared exactly between merges.
USERS_SCHEMA: dict[str, pl.DataType] = {BUCKET: pl.Int32(), "order_date": pl.Date(), "users": pl.List(pl.Int64())}
CATEGORY_SCHEMA: dict[str, pl.DataType] = {
    BUCKET: pl.Int32(),
    "category": pl.String(),
    "order_date": pl.Date(),
    "orders": pl.Int64(),
    "returned_orders": pl.Int64(),
    "items": pl.Int64(),
    "revenue": SUM_DTYPE,
}
PENDING_SCHEMA: dict[str, pl.DataType] = {
    BUCKET: pl.Int32(),
    "reason": pl.String(),
    ORD: pl.Int64(),
    "rows": pl.Int64(),
}
LATE_SCHEMA: dict[str, pl.DataType] = {BUCKET: pl.Int32(), "id": pl.Int64(), "order_id": pl.Int64(), ORD: pl.Int64()}


@dataclass
class Partials:
    """The partial aggregates of one or more buckets, every frame keyed by ``_b``."""

    daily: pl.DataFrame  # DAILY_SCHEMA
    users: pl.DataFrame  # USERS_SCHEMA, distinct
    category: pl.DataFrame  # CATEGORY_SCHEMA
    pending: pl.DataFrame  # PENDING_SCHEMA: items waiting, by reason and by the file (ordinal) they came from
    late_rejects: pl.DataFrame  # LATE_SCHEMA: items rejected at merge time (user_mismatch)

    SCHEMAS = (DAILY_SCHEMA, USERS_SCHEMA, CATEGORY_SCHEMA, PENDING_SCHEMA, LATE_SCHEMA)

    @classmethod
    def empty(cls) -> Partials:
        return cls(*(pl.DataFrame(schema=s) for s in cls.SCHEMAS))

    def frames(self) -> tuple[pl.DataFrame, ...]:
        return (self.daily, self.users, self.category, self.pending, self.late_rejects)

    def bucket(self, b: int) -> Partials:
        return Partials(*(f.filter(pl.col(BUCKET) == b) for f in self.frames()))


def latest_versions(frame: pl.LazyFrame, key: str, files: int) -> tuple[pl.LazyFrame, pl.LazyFrame | None]:
    """Keep, for each (bucket, ``key``), the row of the latest-arriving file (highest ``_ord``).

    Returns the deduplicated rows and, when rows came from more than one file, a frame of the keys whose versions
    disagree (conflicts, to be logged; identical re-deliveries are not conflicts).
    """
    if files <= 1:
        return frame, None  # one file: keys are already unique (duplicate keys are rejected at validation)
    data_cols = [c for c in frame.collect_schema().names() if not c.startswith("_")]
    conflicts = (
        frame.unique(subset=[BUCKET, *data_cols])
        .filter(pl.struct(BUCKET, key).is_duplicated())
        .select(pl.struct(BUCKET, key).n_unique().alias("conflicts"))
    )
    latest = frame.sort(ORD).unique(subset=[BUCKET, key], keep="last", maintain_order=False)
    return latest, conflicts


def _returned() -> pl.Expr:
    return (pl.col("status") == "returned") | pl.col("returned_at").is_not_null()


def bucket_partials(orders: pl.LazyFrame, items: pl.LazyFrame, products: pl.DataFrame) -> Partials:
    """Reduce latest orders and items of some buckets (and all latest products) to partial aggregates.

    An item counts only when both its order and its product are known; otherwise it waits (``pending``) and counts
    as soon as a later merge sees the missing row. An item whose user_id differs from its order's is rejected.
    Distinct orders per (category, date) are counted with ``n_unique`` inside the group rather than by a group-by on
    (category, date, order): several times faster on tens of millions of items.
    """
    o = orders.select(
        BUCKET,
        "order_id",
        pl.col("user_id").alias("o_user"),
        pl.col("created_at").dt.date().alias("order_date"),
        _returned().alias("o_returned"),
    ).collect()
    daily_orders = o.group_by(BUCKET, "order_date").agg(
        pl.len().cast(pl.Int64).alias("orders"),
        pl.col("o_returned").sum().cast(pl.Int64).alias("returned_orders"),
    )
    users = o.group_by(BUCKET, "order_date").agg(pl.col("o_user").unique().sort().alias("users"))

    # Categories as small integers while grouping; names come back at the end.
    names = products.select(pl.col("category").unique().sort()).with_row_index("cat")
    product_cat = products.join(names, on="category").select(pl.col("id").alias("product_id"), "cat")
    it = (
        items.select(
            BUCKET,
            "id",
            "order_id",
            "user_id",
            "product_id",
            pl.col("sale_price").cast(SUM_DTYPE),
            _returned().alias("i_returned"),
            ORD,
        )
        .join(o.lazy().drop(BUCKET), on="order_id", how="left")
        .join(product_cat.lazy(), on="product_id", how="left")
        .collect(engine="streaming")
    )
    no_order = pl.col("o_user").is_null()
    mismatch = ~no_order & (pl.col("user_id") != pl.col("o_user"))
    late_rejects = it.filter(mismatch).select(list(LATE_SCHEMA))
    wait = pl.when(no_order).then(pl.lit("order")).when(pl.col("cat").is_null()).then(pl.lit("product"))
    it = it.filter(~mismatch).with_columns(wait.alias("reason"))
    pending = it.filter(pl.col("reason").is_not_null()).group_by(BUCKET, "reason", ORD).agg(pl.len().alias("rows"))
    counted = it.filter(pl.col("reason").is_null())

    daily_items = counted.group_by(BUCKET, "order_date").agg(
        pl.len().cast(pl.Int64).alias("items"), pl.col("sale_price").sum().alias("revenue")
    )
    daily = daily_orders.join(daily_items, on=[BUCKET, "order_date"], how="left").with_columns(
        pl.col("items").fill_null(0), pl.col("revenue").fill_null(Decimal(0)).cast(SUM_DTYPE)
    )
    category = (
        counted.group_by(BUCKET, "cat", "order_date")
        .agg(
            pl.col("order_id").n_unique().alias("orders"),
            pl.col("order_id").filter(pl.col("i_returned")).n_unique().alias("returned_orders"),
            pl.len().alias("items"),
            pl.col("sale_price").sum().alias("revenue"),
        )
        .join(names, on="cat")
    )
    frames = (daily, users, category, pending, late_rejects)
    return Partials(
        *(
            f.select(list(schema)).cast(schema)  # type: ignore[arg-type]
            for f, schema in zip(frames, Partials.SCHEMAS, strict=True)
        )
    )


def combine(
    daily: pl.LazyFrame, users: pl.LazyFrame, category: pl.LazyFrame, dates: Sequence[str] | None = None
) -> tuple[list[OrderKpi], list[CategoryKpi]]:
    """Merge the partials of every bucket into the KPIs of ``dates`` (all dates when None).

    Inputs are lazy so the caller can point them at many Parquet files; only the requested dates are read.
    """
    if dates is not None:
        wanted = [date.fromisoformat(d) for d in dates]
        daily, users, category = (f.filter(pl.col("order_date").is_in(wanted)) for f in (daily, users, category))
    d = (
        daily.group_by("order_date")
        .agg(pl.col("orders", "returned_orders", "items").sum(), pl.col("revenue").sum())
        .join(
            users.explode("users").group_by("order_date").agg(pl.col("users").n_unique().alias("customers")),
            on="order_date",
            how="left",
        )
        .sort("order_date")
        .collect()
    )
    c = (
        category.group_by("category", "order_date")
        .agg(pl.col("orders", "returned_orders", "items").sum(), pl.col("revenue").sum())
        .sort("order_date", "category")
        .collect()
    )
    daily_kpis = [
        OrderKpi(
            order_date=r["order_date"].isoformat(),
            total_orders=r["orders"],
            returned_orders=r["returned_orders"],
            total_items_sold=r["items"],
            revenue_cents=to_cents(r["revenue"]),
            unique_customers=r["customers"] or 0,
        )
        for r in d.iter_rows(named=True)
        if r["orders"] > 0
    ]
    category_kpis = [
        CategoryKpi(
            category=r["category"],
            order_date=r["order_date"].isoformat(),
            orders=r["orders"],
            returned_orders=r["returned_orders"],
            items=r["items"],
            revenue_cents=to_cents(r["revenue"]),
        )
        for r in c.iter_rows(named=True)
        if r["items"] > 0
    ]
    return daily_kpis, category_kpis


def to_cents(value: Decimal | None) -> int:
    return 0 if value is None else int(value * 100)
