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

ORD = "_ord"  # arrival ordinal of the file a row came from: higher arrived later
SUM_DTYPE = pl.Decimal(38, 2)

DAILY_SCHEMA: dict[str, pl.DataType] = {
    "order_date": pl.Date(),
    "orders": pl.Int64(),
    "returned_orders": pl.Int64(),
    "items": pl.Int64(),
    "revenue": SUM_DTYPE,
}
USERS_SCHEMA: dict[str, pl.DataType] = {"order_date": pl.Date(), "user_id": pl.Int64()}
CATEGORY_SCHEMA: dict[str, pl.DataType] = {
    "category": pl.String(),
    "order_date": pl.Date(),
    "orders": pl.Int64(),
    "returned_orders": pl.Int64(),
    "items": pl.Int64(),
    "revenue": SUM_DTYPE,
}
PENDING_SCHEMA: dict[str, pl.DataType] = {"reason": pl.String(), ORD: pl.Int64(), "rows": pl.Int64()}


@dataclass
class Partials:
    """The partial aggregates of one bucket (or, concatenated, of many)."""

    daily: pl.DataFrame  # DAILY_SCHEMA
    users: pl.DataFrame  # USERS_SCHEMA, distinct
    category: pl.DataFrame  # CATEGORY_SCHEMA
    pending: pl.DataFrame  # PENDING_SCHEMA: items waiting, by reason and by the file (ordinal) they came from
    late_rejects: pl.DataFrame  # items rejected at merge time (user_mismatch), with their key and ordinal

    @classmethod
    def empty(cls) -> Partials:
        return cls(
            pl.DataFrame(schema=DAILY_SCHEMA),
            pl.DataFrame(schema=USERS_SCHEMA),
            pl.DataFrame(schema=CATEGORY_SCHEMA),
            pl.DataFrame(schema=PENDING_SCHEMA),
            pl.DataFrame(schema={"id": pl.Int64(), "order_id": pl.Int64(), ORD: pl.Int64()}),
        )


def latest_versions(frame: pl.DataFrame, key: str) -> tuple[pl.DataFrame, int]:
    """Keep, for each ``key``, the row of the latest-arriving file (highest ``_ord``).

    Returns the deduplicated rows and the number of keys whose versions disagree (conflicts, to be logged).
    Identical re-deliveries are not conflicts.
    """
    if frame.is_empty() or frame.get_column(ORD).n_unique() == 1:
        return frame, 0  # one file: keys are already unique (duplicate keys are rejected at validation)
    data_cols = [c for c in frame.columns if not c.startswith("_")]
    distinct = frame.unique(subset=data_cols)
    conflicts = distinct.filter(pl.col(key).is_duplicated()).get_column(key).n_unique()
    latest = frame.sort(ORD).unique(subset=[key], keep="last", maintain_order=False)
    return latest, conflicts


def _returned(prefix: str = "") -> pl.Expr:
    return (pl.col(f"{prefix}status") == "returned") | pl.col(f"{prefix}returned_at").is_not_null()


def bucket_partials(orders: pl.DataFrame, items: pl.DataFrame, products: pl.DataFrame) -> Partials:
    """Reduce one bucket's latest orders and items (and all latest products) to partial aggregates.

    An item counts only when both its order and its product are known; otherwise it waits (``pending``) and counts
    as soon as a later merge sees the missing row. An item whose user_id differs from its order's is rejected.
    """
    o = orders.select(
        "order_id",
        pl.col("user_id").alias("o_user"),
        pl.col("created_at").dt.date().alias("order_date"),
        _returned().alias("o_returned"),
    )
    daily_orders = o.group_by("order_date").agg(
        pl.len().cast(pl.Int64).alias("orders"),
        pl.col("o_returned").sum().cast(pl.Int64).alias("returned_orders"),
    )
    users = o.select("order_date", pl.col("o_user").alias("user_id")).unique()

    it = items.select(
        "id",
        "order_id",
        "user_id",
        "product_id",
        pl.col("sale_price").cast(SUM_DTYPE),
        _returned().alias("i_returned"),
        ORD,
    ).join(o, on="order_id", how="left")
    no_order = pl.col("o_user").is_null()
    mismatch = ~no_order & (pl.col("user_id") != pl.col("o_user"))
    late_rejects = it.filter(mismatch).select("id", "order_id", ORD)
    it = it.filter(~mismatch).join(
        products.select(pl.col("id").alias("product_id"), "category"), on="product_id", how="left"
    )
    reason = pl.when(no_order).then(pl.lit("order")).when(pl.col("category").is_null()).then(pl.lit("product"))
    it = it.with_columns(reason.alias("_wait"))
    pending = (
        it.filter(pl.col("_wait").is_not_null())
        .group_by(pl.col("_wait").alias("reason"), ORD)
        .agg(pl.len().cast(pl.Int64).alias("rows"))
    )
    counted = it.filter(pl.col("_wait").is_null())

    daily_items = counted.group_by("order_date").agg(
        pl.len().cast(pl.Int64).alias("items"), pl.col("sale_price").sum().alias("revenue")
    )
    daily = (
        daily_orders.join(daily_items, on="order_date", how="left")
        .with_columns(pl.col("items").fill_null(0), pl.col("revenue").fill_null(Decimal(0)).cast(SUM_DTYPE))
        .select(list(DAILY_SCHEMA))
    )
    per_order = counted.group_by("category", "order_date", "order_id").agg(
        pl.len().alias("n"), pl.col("sale_price").sum().alias("rev"), pl.col("i_returned").any().alias("ret")
    )
    category = per_order.group_by("category", "order_date").agg(
        pl.len().cast(pl.Int64).alias("orders"),
        pl.col("ret").sum().cast(pl.Int64).alias("returned_orders"),
        pl.col("n").sum().cast(pl.Int64).alias("items"),
        pl.col("rev").sum().cast(SUM_DTYPE).alias("revenue"),
    )
    return Partials(
        daily=daily.cast(DAILY_SCHEMA),  # type: ignore[arg-type]
        users=users.cast(USERS_SCHEMA),  # type: ignore[arg-type]
        category=category.select(list(CATEGORY_SCHEMA)).cast(CATEGORY_SCHEMA),  # type: ignore[arg-type]
        pending=pending.cast(PENDING_SCHEMA),  # type: ignore[arg-type]
        late_rejects=late_rejects,
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
            users.group_by("order_date").agg(pl.col("user_id").n_unique().alias("customers")),
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
