"""The data contract (SPEC section 1): datasets, their columns and types, and how a file's dataset is found."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath

import polars as pl


class Kind(StrEnum):
    INT = "int"
    STR = "str"
    MONEY = "money"  # decimal, >= 0, at most 2 fraction digits; staged as Decimal(18, 2)
    TS = "ts"  # ISO-8601, staged as Datetime(us, UTC)
    STATUS = "status"  # one of STATUSES, case-insensitive, staged lowercase


#: Staging bucket column: ``route mod buckets``. Orders and their items share a bucket (both routed by order_id).
BUCKET = "_b"
#: The route of the datasets staged in buckets (orders and items): a required column of both.
ROUTE = "order_id"
MONEY_DTYPE = pl.Decimal(18, 2)
TS_DTYPE = pl.Datetime("us", "UTC")
STATUSES = ("processing", "shipped", "delivered", "complete", "returned", "cancelled")

DTYPES: dict[Kind, pl.DataType] = {
    Kind.INT: pl.Int64(),
    Kind.STR: pl.String(),
    Kind.MONEY: MONEY_DTYPE,
    Kind.TS: TS_DTYPE,
    Kind.STATUS: pl.String(),
}


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    required: bool = False


@dataclass(frozen=True)
class Dataset:
    name: str
    columns: tuple[Column, ...]
    key: str  # primary key
    route: str | None  # column that decides the staging bucket (None: one bucket, the dataset is small)
    later_timestamps: tuple[str, ...] = ()  # must not precede created_at

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def staged_schema(self) -> dict[str, pl.DataType]:
        """Schema of staged (typed, valid) rows; ``_line`` is the 1-based line in the source file."""
        schema: dict[str, pl.DataType] = {c.name: DTYPES[c.kind] for c in self.columns}
        schema["_line"] = pl.Int64()
        return schema


def _c(name: str, kind: Kind, required: bool = False) -> Column:
    return Column(name, kind, required)


PRODUCTS = Dataset(
    "products",
    (
        _c("id", Kind.INT, True),
        _c("sku", Kind.STR),
        _c("cost", Kind.MONEY),
        _c("category", Kind.STR, True),
        _c("name", Kind.STR),
        _c("brand", Kind.STR),
        _c("retail_price", Kind.MONEY, True),
        _c("department", Kind.STR),
    ),
    key="id",
    route=None,
)

ORDERS = Dataset(
    "orders",
    (
        _c("order_id", Kind.INT, True),
        _c("user_id", Kind.INT, True),
        _c("status", Kind.STATUS, True),
        _c("created_at", Kind.TS, True),
        _c("returned_at", Kind.TS),
        _c("shipped_at", Kind.TS),
        _c("delivered_at", Kind.TS),
        _c("num_of_item", Kind.INT, True),
    ),
    key="order_id",
    route=ROUTE,
    later_timestamps=("shipped_at", "delivered_at", "returned_at"),
)

ORDER_ITEMS = Dataset(
    "order_items",
    (
        _c("id", Kind.INT, True),
        _c("order_id", Kind.INT, True),
        _c("user_id", Kind.INT, True),
        _c("product_id", Kind.INT, True),
        _c("status", Kind.STATUS, True),
        _c("created_at", Kind.TS, True),
        _c("shipped_at", Kind.TS),
        _c("delivered_at", Kind.TS),
        _c("returned_at", Kind.TS),
        _c("sale_price", Kind.MONEY, True),
    ),
    key="id",
    route=ROUTE,
    later_timestamps=("shipped_at", "delivered_at", "returned_at"),
)

DATASETS: dict[str, Dataset] = {d.name: d for d in (PRODUCTS, ORDERS, ORDER_ITEMS)}

# Longest name first, so "order_items_part3.csv" is order_items, not orders.
_BY_LENGTH = sorted(DATASETS, key=len, reverse=True)
_SUFFIX = re.compile(r"(\.csv)?(\.gz)?$", re.IGNORECASE)


def detect_dataset(path: str) -> Dataset | None:
    """The dataset of a landed file, from the first segment after ``incoming/``, else from the file name.

    ``incoming/orders/2025/03/x.csv`` -> orders; ``order_items_part3.csv`` -> order_items; ``products.csv.gz`` ->
    products. Returns None when neither names a dataset.
    """
    parts = PurePosixPath(path.split("://", 1)[-1]).parts
    if "incoming" in parts:
        i = parts.index("incoming")
        if i + 2 < len(parts) and parts[i + 1].lower() in DATASETS:
            return DATASETS[parts[i + 1].lower()]
    stem = _SUFFIX.sub("", parts[-1] if parts else "").lower()
    for name in _BY_LENGTH:
        if stem == name or stem.startswith(name + "_") or stem.startswith(name + "-") or stem.startswith(name + "."):
            return DATASETS[name]
    return None


def is_gzip(path: str) -> bool:
    return path.lower().endswith(".gz")
