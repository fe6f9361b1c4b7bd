"""Fast, realistic generator of the three input datasets: products, orders and order_items (SPEC section 1).

Why it is built this way: load tests need multi-GB inputs in minutes on a small machine, so rows are produced in
vectorised numpy chunks of a fixed number of orders and formatted by polars' multithreaded CSV writer, appended to
files that stay open. Memory is bounded by one chunk whatever the total size, and no Python code runs per row
(only per injected bad row, which are few by design).

Determinism: the clean data depends only on ``seed`` (and the sizes); the part assignment and the bad-row plan
draw from their own random streams, so ``parts`` and ``bad_rows`` change where rows land and which few rows are
corrupted, never the values of the other rows. The same arguments always give byte-identical files.

Realism (what a pipeline should be tested against): order times follow a daily and hourly rhythm with weekend
peaks; statuses have plausible shares; shipped/delivered/returned timestamps follow created_at; an order has 1..5
items (mean ~2) created with or shortly after it, for the same customer, mostly with the order's status (some
items of completed orders are returned, some items of returned orders are kept); sale prices are the product's
retail price, sometimes discounted; product popularity is skewed. Order and item ids are unique and ascend with
time; rows are scattered over ``parts`` files at random, so one day spans many files and an order's items are
usually in another part than the order.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import gzip
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, cast

import numpy as np
import numpy.typing as npt
import polars as pl

from processor.errors import Reason
from processor.schema import ORDER_ITEMS, ORDERS, PRODUCTS, STATUSES

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

#: Column orders of the files, as the data contract (:mod:`processor.schema`) defines them.
PRODUCT_COLUMNS = PRODUCTS.names
ORDER_COLUMNS = ORDERS.names
ITEM_COLUMNS = ORDER_ITEMS.names

#: Shares of order statuses (sum 1): returned ~10 %, cancelled ~15 %, the rest in flight or done. The generator
#: works on status codes: indices into :data:`processor.schema.STATUSES`.
STATUS_SHARES = {
    "processing": 0.12,
    "shipped": 0.20,
    "delivered": 0.13,
    "complete": 0.30,
    "returned": 0.10,
    "cancelled": 0.15,
}
SHIPPED, DELIVERED, COMPLETE, RETURNED = (STATUSES.index(s) for s in ("shipped", "delivered", "complete", "returned"))
#: Shares of 1..5 items per order: mean 1.96.
ITEMS_SHARES = (0.45, 0.30, 0.13, 0.08, 0.04)

#: Rows are generated and written this many orders at a time (~0.5 M item rows). Fixed, because the random
#: streams are consumed per chunk: changing it changes the data of a given seed.
CHUNK_ORDERS = 250_000

DAY = 86_400
NULL = -1  # sentinel for a null timestamp in the int64 epoch-second arrays

#: category -> (department, product nouns). One category holds a comma on purpose: it must be quoted in CSV.
CATALOG: dict[str, tuple[str, tuple[str, ...]]] = {
    "Electronics": ("Electronics", ("Headphones", "Speaker", "Charger", "Smart Plug")),
    "Computers & Tablets": ("Electronics", ("Laptop", "Tablet", "Keyboard", "Monitor")),
    "Mobile Phones": ("Electronics", ("Smartphone", "Phone Case", "Screen Protector")),
    "Video Games": ("Electronics", ("Console", "Controller", "Game")),
    "Home & Kitchen": ("Home", ("Blender", "Knife Set", "Coffee Maker", "Cookware Set")),
    "Furniture": ("Home", ("Desk", "Office Chair", "Bookshelf", "Sofa")),
    "Garden & Outdoor": ("Home", ("Garden Hose", "Grill", "Planter", "Patio Chair")),
    "Tools & Home Improvement": ("Home", ("Drill", "Tool Kit", "LED Bulb", "Ladder")),
    "Pet Supplies": ("Home", ("Dog Bed", "Cat Tree", "Pet Food", "Leash")),
    "Clothing": ("Fashion", ("T-Shirt", "Jeans", "Jacket", "Sweater", "Dress")),
    "Shoes": ("Fashion", ("Sneakers", "Boots", "Sandals", "Running Shoes")),
    "Jewelry": ("Fashion", ("Necklace", "Ring", "Earrings", "Bracelet")),
    "Watches": ("Fashion", ("Wristwatch", "Smartwatch", "Watch Strap")),
    "Beauty": ("Health & Beauty", ("Lipstick", "Moisturizer", "Perfume", "Shampoo")),
    "Health & Personal Care": ("Health & Beauty", ("Toothbrush", "Vitamins", "Scale", "Razor")),
    "Baby": ("Family", ("Stroller", "Diapers", "Baby Monitor", "Car Seat")),
    "Toys & Games": ("Family", ("Board Game", "Puzzle", "Building Set", "Doll")),
    "Arts, Crafts & Sewing": ("Family", ("Paint Set", "Sewing Kit", "Sketchbook", "Yarn")),
    "Books": ("Media", ("Novel", "Cookbook", "Biography", "Textbook")),
    "Music": ("Media", ("Vinyl Record", "CD", "Guitar Strings")),
    "Movies & TV": ("Media", ("Blu-ray", "DVD Box Set", "Documentary")),
    "Sports & Fitness": ("Sports", ("Yoga Mat", "Dumbbells", "Bike Helmet", "Tennis Racket")),
    "Automotive": ("Automotive", ("Car Charger", "Floor Mats", "Dash Cam", "Wiper Blades")),
    "Office Products": ("Office", ("Notebook", "Pen Set", "Printer Paper", "Stapler")),
    "Grocery": ("Grocery", ("Coffee Beans", "Olive Oil", "Tea", "Chocolate")),
}
DEFAULT_CATEGORIES: tuple[str, ...] = tuple(CATALOG)

BRANDS = (
    "Acme", "Northwind", "Contoso", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay",
    "Soylent", "Tyrell", "Wonka", "Gringotts", "Oceanic", "Monarch", "Aperture", "Cyberdyne", "Massive",
    "Pied Piper", "Dunder", "Bluth", "Prestige", "Sterling", "Nakatomi", "Zorg", "Kramerica", "Gekko",
)  # fmt: skip
ADJECTIVES = (
    "Classic", "Premium", "Compact", "Deluxe", "Eco", "Pro", "Essential", "Ultra", "Smart", "Vintage",
    "Lightweight", "Heavy-Duty", "Wireless", "Organic", "Modern", "Travel",
)  # fmt: skip

#: Relative order intensity by UTC hour: quiet nights, a lunch bump and an evening peak.
HOURLY_PROFILE = np.array(
    [0.30, 0.20, 0.15, 0.12, 0.12, 0.18, 0.30, 0.50, 0.70, 0.85, 0.95, 1.00,
     1.05, 1.00, 0.95, 0.95, 1.00, 1.10, 1.25, 1.35, 1.30, 1.10, 0.80, 0.50],
    dtype=np.float64,
)  # fmt: skip

#: The invalid rows that ``bad_rows`` injects, in turn: the first 7 cover every row-level reason the brief lists.
BAD_KINDS: tuple[tuple[str, Reason], ...] = (
    ("orders", Reason.MISSING_REQUIRED),
    ("order_items", Reason.BAD_TYPE),
    ("orders", Reason.UNKNOWN_STATUS),
    ("order_items", Reason.NEGATIVE_MONEY),
    ("order_items", Reason.MONEY_PRECISION),
    ("orders", Reason.BAD_QUANTITY),
    ("order_items", Reason.TIMESTAMP_ORDER),
    ("order_items", Reason.MISSING_REQUIRED),
    ("orders", Reason.BAD_TYPE),
    ("order_items", Reason.UNKNOWN_STATUS),
    ("orders", Reason.TIMESTAMP_ORDER),
)

_TS_FORMAT = "%Y-%m-%dT%H:%M:%S"
_GZIP_LEVEL = 1  # fast: the files are test input, and level 6 would make gzip the bottleneck (~25 MB/s)


@dataclass(frozen=True)
class BadRow:
    """One row made invalid on purpose, and the row-level rejection a validator must give it."""

    path: Path
    line: int  # 1-based line in the file; the header is line 1
    dataset: str
    reason: Reason
    column: str  # the one column that was corrupted
    key: int  # the row's primary key as generated (order_id or item id)


@dataclass(frozen=True)
class GeneratedFiles:
    """What :func:`generate` wrote: the files, row counts, and the manifest of injected faults."""

    products: Path
    orders: tuple[Path, ...]
    items: tuple[Path, ...]
    bad_rows: tuple[BadRow, ...] = ()
    bad_file: Path | None = None  # an orders file that must be rejected whole
    bad_file_reason: Reason | None = None
    rows: dict[str, int] = field(default_factory=dict)  # data rows written per dataset (bad rows included)
    csv_bytes: int = 0  # uncompressed CSV bytes of all files
    seconds: float = 0.0

    @property
    def paths(self) -> list[Path]:
        """Every file, products first, then the orders parts (and the bad file), then the item parts."""
        bad = [self.bad_file] if self.bad_file is not None else []
        return [self.products, *self.orders, *bad, *self.items]


@dataclass(frozen=True)
class _Plan:
    """Everything fixed before the chunks: time model, customers, product popularity and prices."""

    epoch: int  # first second of the window (UTC)
    total_orders: int
    customers: int
    time_cdf: F64  # cumulative order share at each hour edge of the window
    time_edges: F64  # seconds since epoch of each hour edge
    product_lut: I64  # product indices, each as often as its popularity (see _lut)
    retail_cents: I64  # per product index


@dataclass(frozen=True)
class _Orders:
    order_id: I64
    user_id: I64
    status: I64
    created: I64
    shipped: I64
    delivered: I64
    returned: I64
    num: I64


@dataclass(frozen=True)
class _Bad:
    dataset: str
    reason: Reason
    key: int


def _cdf(weights: F64) -> F64:
    """Cumulative shares ending exactly at 1.0."""
    cdf: F64 = np.cumsum(weights) / weights.sum()
    cdf[-1] = 1.0
    return cdf


def _lut(weights: F64, size: int) -> I64:
    """A table of ``size`` indices in which index i fills a share ``weights[i] / sum`` of the entries.

    Drawing ``lut[uniform integer]`` samples the distribution with one gather, several times faster than a
    searchsorted per draw; shares are exact to 1/size (the status and item-count shares are whole percents).
    """
    return np.searchsorted(_cdf(weights)[:-1], (np.arange(size) + 0.5) / size, side="right").astype(np.int64)


_STATUS_LUT = _lut(np.array([STATUS_SHARES[s] for s in STATUSES]), 1000)
_ITEMS_LUT = _lut(np.array(ITEMS_SHARES), 1000)
_WAS_SHIPPED = np.array([s in (SHIPPED, DELIVERED, COMPLETE, RETURNED) for s in range(len(STATUSES))])
_WAS_DELIVERED = np.array([s in (DELIVERED, COMPLETE, RETURNED) for s in range(len(STATUSES))])
_KEEPS_MOST = np.array([s in (COMPLETE, DELIVERED) for s in range(len(STATUSES))])


def _draw(rng: np.random.Generator, lut: I64, n: int) -> I64:
    """n indices drawn with the shares a :func:`_lut` table encodes."""
    return lut[rng.integers(0, len(lut), n)]


def _time_model(rng: np.random.Generator, days: int, start: date) -> tuple[F64, F64]:
    """Hourly intensity over the window: hourly profile x weekday effect x slow growth x daily noise."""
    day = np.arange(days)
    weekday = (start.weekday() + day) % 7
    daily = (1.0 + 0.2 * (weekday >= 5)) * (1.0 + 0.15 * day / max(days - 1, 1)) * rng.lognormal(0.0, 0.08, days)
    weights = (daily[:, None] * HOURLY_PROFILE[None, :]).ravel()
    cdf = np.concatenate([[0.0], _cdf(weights)])
    edges = np.arange(days * 24 + 1, dtype=np.float64) * 3600.0
    return cdf, edges


def _make_products(rng: np.random.Generator, n: int, categories: Sequence[str]) -> tuple[pl.DataFrame, I64, I64]:
    """The product catalogue, its retail prices in cents and a skewed popularity table (few best sellers)."""
    cats = list(categories)
    nouns: list[str] = []
    offsets, counts = [], []
    for c in cats:
        own = CATALOG.get(c, ("General", ("Item",)))[1]
        offsets.append(len(nouns))
        counts.append(len(own))
        nouns.extend(own)
    cat = rng.integers(0, len(cats), n)
    noun = np.asarray(offsets)[cat] + rng.integers(0, np.asarray(counts)[cat])
    brand = rng.integers(0, len(BRANDS), n)
    adjective = rng.integers(0, len(ADJECTIVES), n)
    # Prices like 29.99: log-normal around 30, from 1.99 to 1999.99.
    whole = np.clip(np.exp(rng.normal(np.log(30.0), 0.9, n)), 1.0, 1999.0).astype(np.int64)
    retail = whole * 100 + 99
    cost = np.round(retail * rng.uniform(0.3, 0.6, n)).astype(np.int64)
    sku = rng.integers(0, 10**10, n)
    departments = [CATALOG.get(c, ("General", ()))[0] for c in cats]
    df = pl.DataFrame(
        {
            "id": np.arange(1, n + 1, dtype=np.int64),
            "sku": pl.Series(sku).cast(pl.String).str.zfill(10),
            "cost": pl.Series(cost).cast(pl.Decimal(18, 2)) / 100,
            "category": pl.Series(cats).gather(cat),
            "name": pl.Series(ADJECTIVES).gather(adjective),
            "brand": pl.Series(BRANDS).gather(brand),
            "retail_price": pl.Series(retail).cast(pl.Decimal(18, 2)) / 100,
            "department": pl.Series(departments).gather(cat),
        }
    ).with_columns(
        sku=pl.lit("SKU-") + pl.col("sku"),
        name=pl.concat_str(pl.col("brand"), pl.col("name"), pl.Series(nouns).gather(noun), separator=" "),
    )
    rank = rng.permutation(n) + 1
    popularity = _lut(1.0 / rank.astype(np.float64) ** 0.9, max(1 << 16, 4 * n))
    return df, retail, popularity


def _make_orders(rng: np.random.Generator, plan: _Plan, first: int, n: int, total: int, id_base: int) -> _Orders:
    """Orders ``first .. first+n-1`` of ``total``: stratified over the time CDF, so ids ascend with time."""
    idx = np.arange(first, first + n, dtype=np.int64)
    u = (idx + rng.random(n)) / total
    created = plan.epoch + np.interp(u, plan.time_cdf, plan.time_edges).astype(np.int64)
    user = rng.integers(1, plan.customers + 1, n)
    status = _draw(rng, _STATUS_LUT, n)
    shipped = np.where(_WAS_SHIPPED[status], created + rng.integers(3600, 3 * DAY, n), NULL)
    delivered = np.where(_WAS_DELIVERED[status], shipped + rng.integers(DAY, 6 * DAY, n), NULL)
    # A few completed orders carry a returned_at (a return recorded without a status change): still "returned".
    late_return = (status == COMPLETE) & (rng.random(n) < 0.01)
    returned = np.where((status == RETURNED) | late_return, delivered + rng.integers(DAY, 14 * DAY, n), NULL)
    num = _draw(rng, _ITEMS_LUT, n) + 1
    return _Orders(idx + id_base + 1, user, status, created, shipped, delivered, returned, num)


def _make_items(
    rng: np.random.Generator, plan: _Plan, orders: _Orders, orders_df: pl.DataFrame, first_id: int
) -> tuple[pl.DataFrame, I64]:
    """The items of ``orders`` (``num`` each); also returns the index of each order's first item.

    Formatting timestamps is the costliest part of writing, and most item timestamps are their order's: they are
    taken as text from ``orders_df`` (whose timestamps :func:`_orders_frame` formatted once), and only an item's
    own created_at (30 % of items) and own returned_at (an item whose status differs from its order's) are
    formatted here and scattered in.
    """
    owner = np.repeat(np.arange(len(orders.num)), orders.num)
    m = len(owner)
    starts = np.cumsum(orders.num) - orders.num
    order_status = orders.status[owner]
    status = order_status.copy()
    r = rng.random(m)
    status[_KEEPS_MOST[order_status] & (r < 0.05)] = RETURNED  # one item sent back
    first_item = np.zeros(m, dtype=bool)
    first_item[starts] = True
    status[(order_status == RETURNED) & ~first_item & (r < 0.2)] = COMPLETE  # kept from a returned order
    delay = np.where(rng.random(m) < 0.7, 0, rng.integers(1, 300, m))  # < the 1 h minimum shipping delay
    delayed = np.flatnonzero(delay)
    own_created = orders.created[owner[delayed]] + delay[delayed]
    differs = np.flatnonzero(status != order_status)  # returned_at is the item's own, or none
    own_return = status[differs] == RETURNED
    own_returned = np.where(
        own_return, orders.delivered[owner[differs]] + rng.integers(DAY, 14 * DAY, len(differs)), NULL
    )
    product = _draw(rng, plan.product_lut, m)
    discount = np.where(rng.random(m) < 0.75, 1.0, rng.uniform(0.6, 0.95, m))
    sale = np.round(plan.retail_cents[product] * discount).astype(np.int64)
    inherited = orders_df.select(pl.col(list(_TS_COLUMNS)).gather(pl.Series(owner)))
    df = _frame(
        {
            "id": np.arange(first_id, first_id + m, dtype=np.int64),
            "order_id": orders.order_id[owner],
            "user_id": orders.user_id[owner],
            "product_id": product + 1,
            "status": status,
            "sale_price": sale,
        }
    ).with_columns(
        inherited["created_at"].scatter(delayed, _ts_text(own_created)),
        inherited["shipped_at"],
        inherited["delivered_at"],
        inherited["returned_at"].scatter(differs, _ts_text(own_returned)),
    )
    return df.select(ITEM_COLUMNS), starts


def _orders_frame(o: _Orders) -> pl.DataFrame:
    """The orders as written, timestamps already formatted (the items reuse the text, see :func:`_make_items`)."""
    return _frame(
        {
            "order_id": o.order_id,
            "user_id": o.user_id,
            "status": o.status,
            "created_at": o.created,
            "returned_at": o.returned,
            "shipped_at": o.shipped,
            "delivered_at": o.delivered,
            "num_of_item": o.num,
        }
    ).with_columns(pl.col(list(_TS_COLUMNS)).dt.strftime(_TS_FORMAT))


_STATUS_NAMES = pl.Series(STATUSES)


def _ts_text(seconds: I64) -> pl.Series:
    """Epoch seconds (:data:`NULL` for none) as ISO-8601 text, as the CSV writer would format them."""
    s = pl.Series("t", seconds)
    return pl.select(pl.when(s != NULL).then(s * 1_000_000).cast(pl.Datetime("us")).dt.strftime(_TS_FORMAT)).to_series()


_TS_COLUMNS = ("created_at", "shipped_at", "delivered_at", "returned_at")
_MONEY_COLUMNS = ("sale_price", "cost", "retail_price")


def _frame(columns: dict[str, I64]) -> pl.DataFrame:
    """Typed frame from int64 arrays, converted in polars (parallel, no numpy temporaries).

    Timestamps arrive as epoch seconds with :data:`NULL` for none, statuses as codes, money as integer cents
    (made Decimal(18, 2): exact, and written 3x faster than a float with ``float_precision``).
    """
    df = pl.DataFrame(columns)
    return df.with_columns(
        *(
            pl.when(pl.col(c) != NULL).then(pl.col(c) * 1_000_000).cast(pl.Datetime("us")).alias(c)
            for c in _TS_COLUMNS
            if c in columns
        ),
        *(pl.col(c).cast(pl.Decimal(18, 2)) / 100 for c in _MONEY_COLUMNS if c in columns),
        *(pl.lit(_STATUS_NAMES).gather(pl.col("status")).alias("status") for c in ("status",) if c in columns),
    )


def _csv_bytes(df: pl.DataFrame) -> bytes:
    return df.write_csv(None, include_header=False, datetime_format=_TS_FORMAT).encode()


class _Sink:
    """One output file, open for the whole run; frames are appended without a header."""

    def __init__(self, path: Path, columns: Sequence[str], compress: bool) -> None:
        self.path = path
        self._fh: IO[bytes] = (
            cast(IO[bytes], gzip.open(path, "wb", compresslevel=_GZIP_LEVEL)) if compress else open(path, "wb")  # noqa: SIM115
        )
        self._fh.write((",".join(columns) + "\n").encode())
        self.rows = 0
        self.csv_bytes = 0

    def write_frame(self, df: pl.DataFrame) -> None:
        if df.height:
            # batch_size: the default (1024 rows) leaves most of the formatting on one thread.
            df.write_csv(self._fh, include_header=False, datetime_format=_TS_FORMAT, batch_size=65_536)
            self.rows += df.height

    def write_raw(self, data: bytes, rows: int) -> None:
        self._fh.write(data)
        self.rows += rows

    def close(self) -> None:
        self.csv_bytes = self._fh.tell()  # GzipFile.tell() is the uncompressed offset
        self._fh.close()


def _corrupt(row: bytes, columns: Sequence[str], dataset: str, reason: Reason) -> tuple[bytes, str]:
    """Make one formatted CSV row invalid for exactly ``reason`` (only one field changes)."""
    fields = next(csv.reader(io.StringIO(row.decode())))
    value = dict(zip(columns, fields, strict=True))
    created = value["created_at"]
    column, new = _CORRUPTIONS[(dataset, reason)](value, created)
    fields[columns.index(column)] = new
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(fields)
    return out.getvalue().encode(), column


#: (dataset, reason) -> (row values, created_at) -> (column, new value). Each changes one field of a valid row.
_CORRUPTIONS: dict[tuple[str, Reason], Callable[[dict[str, str], str], tuple[str, str]]] = {
    ("orders", Reason.MISSING_REQUIRED): lambda v, c: ("status", ""),
    ("orders", Reason.BAD_TYPE): lambda v, c: ("user_id", "u" + v["user_id"]),
    ("orders", Reason.UNKNOWN_STATUS): lambda v, c: ("status", "lost"),
    ("orders", Reason.BAD_QUANTITY): lambda v, c: ("num_of_item", "0"),
    ("orders", Reason.TIMESTAMP_ORDER): lambda v, c: ("shipped_at", _shift(c, -timedelta(days=1))),
    ("order_items", Reason.MISSING_REQUIRED): lambda v, c: ("product_id", ""),
    # A producer writing its local date format: not ISO-8601.
    ("order_items", Reason.BAD_TYPE): lambda v, c: ("created_at", f"{c[8:10]}/{c[5:7]}/{c[:4]} {c[11:16]}"),
    ("order_items", Reason.UNKNOWN_STATUS): lambda v, c: ("status", "lost_in_transit"),
    ("order_items", Reason.NEGATIVE_MONEY): lambda v, c: ("sale_price", "-" + v["sale_price"]),
    ("order_items", Reason.MONEY_PRECISION): lambda v, c: ("sale_price", v["sale_price"] + "5"),
    ("order_items", Reason.TIMESTAMP_ORDER): lambda v, c: ("shipped_at", _shift(c, -timedelta(hours=2))),
}


def _shift(ts: str, delta: timedelta) -> str:
    return (datetime.fromisoformat(ts) + delta).strftime(_TS_FORMAT)


def _emit(
    sink: _Sink,
    df: pl.DataFrame,
    columns: Sequence[str],
    bad: Sequence[tuple[int, _Bad]],
    manifest: list[BadRow],
) -> None:
    """Append ``df`` to ``sink``, replacing the rows at the (sorted) positions of ``bad`` by corrupted ones."""
    done = 0
    for pos, spec in bad:
        sink.write_frame(df.slice(done, pos - done))
        line = sink.rows + 2  # header is line 1
        data, column = _corrupt(_csv_bytes(df.slice(pos, 1)), columns, spec.dataset, spec.reason)
        sink.write_raw(data, 1)
        manifest.append(BadRow(sink.path, line, spec.dataset, spec.reason, column, spec.key))
        done = pos + 1
    sink.write_frame(df.slice(done))


def _write_parts(
    sinks: Sequence[_Sink],
    df: pl.DataFrame,
    columns: Sequence[str],
    part: I64 | None,
    bad: dict[int, _Bad],
    manifest: list[BadRow],
) -> None:
    """Write the rows of ``df`` to the part files ``part`` names (row order kept within each part)."""
    if part is None:
        _emit(sinks[0], df, columns, sorted(bad.items()), manifest)
        return
    bad_rows = np.array(sorted(bad), dtype=np.int64)
    for p, sink in enumerate(sinks):
        idx = np.flatnonzero(part == p)
        here = bad_rows[part[bad_rows] == p]
        positions = np.searchsorted(idx, here)
        _emit(sink, df[idx], columns, [(int(q), bad[int(b)]) for q, b in zip(positions, here, strict=True)], manifest)


def _plan_bad_rows(rng: np.random.Generator, orders: int, count: int) -> list[tuple[int, str, Reason]]:
    """(order index, dataset, reason) of each bad row, sorted; an items fault corrupts that order's first item.

    The targeted orders are distinct, so an order never has both its own row and its item corrupted.
    """
    if count > orders:
        raise ValueError(f"bad_rows ({count}) cannot exceed orders ({orders})")
    targets = rng.choice(orders, size=count, replace=False).tolist() if count else []
    return sorted((int(t), *BAD_KINDS[k % len(BAD_KINDS)]) for k, t in enumerate(targets))


def generate(
    out_dir: Path,
    *,
    orders: int,
    days: int = 30,
    start: date = date(2025, 3, 1),
    customers: int | None = None,
    products: int = 2000,
    categories: Sequence[str] | None = None,
    parts: int = 1,
    seed: int = 0,
    bad_rows: int = 0,
    bad_file: bool = False,
    gzip: bool = False,
) -> GeneratedFiles:
    """Write ``products.csv``, ``orders_part{n}.csv`` and ``order_items_part{n}.csv`` (n = 1..parts) to ``out_dir``.

    ``bad_rows`` invalid rows are spread over the orders and items files (cycling through :data:`BAD_KINDS`);
    ``bad_file`` adds ``orders_part{parts+1}.csv`` without its ``user_id`` column (orders with fresh ids), which
    must be rejected whole. ``gzip`` writes ``.csv.gz`` files instead. See :class:`GeneratedFiles`.

    Keep ``bad_rows`` well under ``SHOPKPI_MAX_INVALID_SHARE`` (5 %) of the rows of each part file, or the validator
    rightly rejects the whole file. Each bad order row also leaves that order's items waiting for it forever.

    The steps: plan (time model, customers, products, bad rows), write the products, write the orders and items
    chunk by chunk over the parts (with the planned bad rows), write the bad file, sum up.
    """
    if orders < 1 or days < 1 or products < 1 or parts < 1 or bad_rows < 0:
        raise ValueError("orders, days, products and parts must be >= 1, bad_rows >= 0")
    began = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    cats = list(categories) if categories is not None else list(DEFAULT_CATEGORIES)
    if not cats:
        raise ValueError("categories must not be empty")
    out = _Outputs(out_dir, ".csv.gz" if gzip else ".csv", gzip)
    rngs = _Streams(seed)
    product_df, plan = _make_plan(seed, orders, days, start, customers, products, cats)
    bad_plan = _plan_bad_rows(rngs.bad, orders, bad_rows)
    products_sink = out.write_file("products", PRODUCT_COLUMNS, product_df)
    manifest = _write_orders_and_items(out, rngs, plan, parts, bad_plan)
    rejected = _write_bad_file(out, rngs.bad, plan, parts) if bad_file else None
    return _result(products_sink, out, parts, manifest, rejected, time.perf_counter() - began)


@dataclass
class _Outputs:
    """Where the files go, and the orders and items files written so far."""

    out_dir: Path
    suffix: str
    compress: bool
    orders: list[_Sink] = field(default_factory=list)
    items: list[_Sink] = field(default_factory=list)

    def sink(self, stem: str, columns: Sequence[str]) -> _Sink:
        return _Sink(self.out_dir / f"{stem}{self.suffix}", columns, self.compress)

    def write_file(self, stem: str, columns: Sequence[str], df: pl.DataFrame) -> _Sink:
        """A whole file in one go."""
        sink = self.sink(stem, columns)
        sink.write_frame(df)
        sink.close()
        return sink


class _Streams:
    """The independent random streams of one seed: data values, part assignment, bad-row plan (and bad file)."""

    def __init__(self, seed: int) -> None:
        self.data = np.random.default_rng([seed, 0])
        self.part = np.random.default_rng([seed, 1])
        self.bad = np.random.default_rng([seed, 2])


def _make_plan(
    seed: int, orders: int, days: int, start: date, customers: int | None, products: int, cats: list[str]
) -> tuple[pl.DataFrame, _Plan]:
    """The product catalogue, and the :class:`_Plan` the chunks are drawn from (each from its own stream)."""
    product_df, retail, popularity = _make_products(np.random.default_rng([seed, 3]), products, cats)
    time_cdf, time_edges = _time_model(np.random.default_rng([seed, 4]), days, start)
    plan = _Plan(
        epoch=int(datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp()),
        total_orders=orders,
        customers=customers if customers is not None else max(1, orders // 15),
        time_cdf=time_cdf,
        time_edges=time_edges,
        product_lut=popularity,
        retail_cents=retail,
    )
    return product_df, plan


def _write_orders_and_items(
    out: _Outputs, rngs: _Streams, plan: _Plan, parts: int, bad_plan: list[tuple[int, str, Reason]]
) -> list[BadRow]:
    """Generate the orders and their items :data:`CHUNK_ORDERS` orders at a time and scatter them over the parts,
    corrupting the rows ``bad_plan`` names; returns the manifest of the bad rows written."""
    out.orders = [out.sink(f"orders_part{p}", ORDER_COLUMNS) for p in range(1, parts + 1)]
    out.items = [out.sink(f"order_items_part{p}", ITEM_COLUMNS) for p in range(1, parts + 1)]
    orders = plan.total_orders
    manifest: list[BadRow] = []
    next_item = 1
    # Two writer threads, one per dataset: chunk k is formatted and written while chunk k+1 is generated, and at
    # most one chunk waits. Polars and zlib release the GIL, so the writers and the generator overlap.
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loadgen-writer")
    pending: list[Future[None]] = []
    try:
        for first in range(0, orders, CHUNK_ORDERS):
            n = min(CHUNK_ORDERS, orders - first)
            chunk = _make_orders(rngs.data, plan, first, n, orders, 0)
            orders_df = _orders_frame(chunk)
            items_df, starts = _make_items(rngs.data, plan, chunk, orders_df, next_item)
            order_bad, item_bad = _chunk_bad_rows(bad_plan, first, n, starts, next_item)
            order_part = rngs.part.integers(0, parts, orders_df.height) if parts > 1 else None
            item_part = rngs.part.integers(0, parts, items_df.height) if parts > 1 else None
            for f in pending:
                f.result()
            pending = [
                pool.submit(_write_parts, out.orders, orders_df, ORDER_COLUMNS, order_part, order_bad, manifest),
                pool.submit(_write_parts, out.items, items_df, ITEM_COLUMNS, item_part, item_bad, manifest),
            ]
            next_item += items_df.height
        for f in pending:
            f.result()
    finally:
        pool.shutdown(wait=True)
        for s in (*out.orders, *out.items):
            s.close()
    return manifest


def _chunk_bad_rows(
    bad_plan: list[tuple[int, str, Reason]], first: int, n: int, starts: I64, next_item: int
) -> tuple[dict[int, _Bad], dict[int, _Bad]]:
    """The planned bad rows of orders ``first .. first+n-1``: row in the chunk's orders, row in its items -> fault.

    ``starts`` is the index of each order's first item in the chunk, ``next_item`` the id of the chunk's first item.
    """
    lo = bisect.bisect_left(bad_plan, (first,))
    hi = bisect.bisect_left(bad_plan, (first + n,))
    order_bad: dict[int, _Bad] = {}
    item_bad: dict[int, _Bad] = {}
    for i, dataset, reason in bad_plan[lo:hi]:
        if dataset == "orders":
            order_bad[i - first] = _Bad(dataset, reason, i + 1)
        else:
            row = int(starts[i - first])
            item_bad[row] = _Bad(dataset, reason, next_item + row)
    return order_bad, item_bad


def _write_bad_file(out: _Outputs, bad_rng: np.random.Generator, plan: _Plan, parts: int) -> Path:
    """``orders_part{parts+1}``: orders with fresh ids and no ``user_id`` column, to be rejected whole."""
    orders = plan.total_orders
    k = min(1000, max(10, orders // 100))
    extra = _orders_frame(_make_orders(bad_rng, plan, 0, k, k, orders)).drop("user_id")
    sink = out.write_file(f"orders_part{parts + 1}", extra.columns, extra)
    out.orders.append(sink)
    return sink.path


def _result(
    products: _Sink, out: _Outputs, parts: int, manifest: list[BadRow], rejected: Path | None, seconds: float
) -> GeneratedFiles:
    """What was written: the files (the bad file apart), rows per dataset, bytes, the sorted bad-row manifest."""
    manifest.sort(key=lambda b: (str(b.path), b.line))
    return GeneratedFiles(
        products=products.path,
        orders=tuple(s.path for s in out.orders[:parts]),
        items=tuple(s.path for s in out.items),
        bad_rows=tuple(manifest),
        bad_file=rejected,
        bad_file_reason=Reason.MISSING_COLUMN if rejected is not None else None,
        rows={
            "products": products.rows,
            "orders": sum(s.rows for s in out.orders[:parts]),
            "order_items": sum(s.rows for s in out.items),
        },
        csv_bytes=sum(s.csv_bytes for s in (products, *out.orders, *out.items)),
        seconds=seconds,
    )


def _mean_digits(n: float) -> float:
    """Mean number of decimal digits of the integers 1..n (ids and user ids are uniform over such ranges)."""
    n = max(1.0, n)
    total, low = 0.0, 1.0
    digits = 1
    while low <= n:
        high = min(n, low * 10 - 1)
        total += (high - low + 1) * digits
        low *= 10
        digits += 1
    return total / n


def estimate_orders(size_gb: float, *, days: int = 30, products: int = 2000, seed: int = 0,
                    customers: int | None = None, sample_orders: int = 20_000) -> int:  # fmt: skip
    """Orders needed for about ``size_gb`` GB (10**9 bytes) of uncompressed CSV in total.

    Measures bytes per order on a small sample, then corrects for the wider ids of a larger run (order ids,
    item ids and user ids gain digits as the counts grow), solving by fixed-point iteration.
    """
    with tempfile.TemporaryDirectory() as tmp:
        sample = generate(Path(tmp), orders=sample_orders, days=days, products=products, seed=seed,
                          customers=customers)  # fmt: skip
        product_bytes = sample.products.stat().st_size
    per_order = (sample.csv_bytes - product_bytes) / sample_orders
    ipo = sample.rows["order_items"] / sample_orders
    fixed_users = customers is not None

    def extra(n: float) -> float:
        users_n = customers if fixed_users and customers is not None else max(1.0, n / 15)
        users_s = customers if fixed_users and customers is not None else max(1.0, sample_orders / 15)
        return (
            (_mean_digits(n) - _mean_digits(sample_orders)) * (1 + ipo)
            + (_mean_digits(users_n) - _mean_digits(users_s)) * (1 + ipo)
            + (_mean_digits(n * ipo) - _mean_digits(sample_orders * ipo)) * ipo
        )

    target = max(size_gb * 1e9 - product_bytes, per_order)
    n = target / per_order
    for _ in range(8):
        n = target / (per_order + extra(n))
    return max(1, round(n))


def _summary(result: GeneratedFiles) -> dict[str, object]:
    items = result.rows.get("order_items", 0)
    return {
        "paths": [str(p) for p in result.paths],
        "rows": result.rows,
        "csv_bytes": result.csv_bytes,
        "seconds": round(result.seconds, 3),
        "item_rows_per_s": round(items / result.seconds) if result.seconds else None,
        "csv_mb_per_s": round(result.csv_bytes / 1e6 / result.seconds, 1) if result.seconds else None,
        "bad_file": str(result.bad_file) if result.bad_file else None,
        "bad_file_reason": str(result.bad_file_reason) if result.bad_file_reason else None,
        "bad_rows": [{**asdict(b), "path": str(b.path), "reason": str(b.reason)} for b in result.bad_rows],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loadgen.generate OUT_DIR --orders N | --size-gb G [...]``: prints a short summary on stdout (the
    whole manifest with ``--json``, or into ``--manifest FILE``)."""
    parser = argparse.ArgumentParser(
        prog="python -m loadgen.generate",
        description="Generate realistic products/orders/order_items CSV files for shopkpi.",
    )
    parser.add_argument("out_dir", type=Path)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--orders", type=int, help="number of orders (items are ~2 per order)")
    size.add_argument(
        "--size-gb", type=float, help="pick the order count for about this many GB (1e9 bytes) of uncompressed CSV"
    )
    parser.add_argument("--days", type=int, default=30, help="days the orders spread over (default 30)")
    parser.add_argument("--start", type=date.fromisoformat, default=date(2025, 3, 1), help="first day, UTC")
    parser.add_argument("--customers", type=int, default=None, help="distinct customers (default orders // 15)")
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--parts", type=int, default=1, help="files per dataset for orders and items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bad-rows", type=int, default=0, help="invalid rows to inject")
    parser.add_argument("--bad-file", action="store_true", help="also write an orders file to be rejected whole")
    parser.add_argument("--gzip", action="store_true", help="write .csv.gz files")
    parser.add_argument(
        "--manifest", type=Path, default=None, help="write the JSON manifest (every path, row count, fault) here"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON manifest instead of a short summary")
    args = parser.parse_args(argv)
    if (args.orders is not None and args.orders < 1) or (args.size_gb is not None and not args.size_gb > 0):
        parser.error("--orders must be at least 1 and --size-gb above 0")
    if min(args.days, args.products, args.parts) < 1 or args.bad_rows < 0:
        parser.error("--days, --products and --parts must be at least 1, --bad-rows at least 0")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"out_dir: {args.out_dir} is a file, not a folder")

    orders: int = args.orders
    if args.size_gb is not None:
        orders = estimate_orders(
            args.size_gb, days=args.days, products=args.products, seed=args.seed, customers=args.customers
        )
        print(f"--size-gb {args.size_gb}: {orders} orders", file=sys.stderr)
    result = generate(
        args.out_dir,
        orders=orders,
        days=args.days,
        start=args.start,
        customers=args.customers,
        products=args.products,
        parts=args.parts,
        seed=args.seed,
        bad_rows=args.bad_rows,
        bad_file=args.bad_file,
        gzip=args.gzip,
    )
    text = json.dumps(_summary(result), indent=2)
    if args.manifest is not None:
        args.manifest.write_text(text + "\n")
    print(text if args.json else _short(result, args.manifest))
    return 0


def _short(result: GeneratedFiles, manifest: Path | None) -> str:
    """A few lines a person reads: what was written, how fast, the faults injected, where the manifest is."""
    rows = ", ".join(f"{n:,} {dataset}" for dataset, n in result.rows.items())
    lines = [
        f"wrote {len(result.paths)} files ({rows} rows, {result.csv_bytes / 1e6:,.1f} MB of CSV) "
        f"in {result.seconds:.1f} s",
    ]
    if result.bad_rows or result.bad_file:
        whole = f", and {result.bad_file} to be rejected whole ({result.bad_file_reason})" if result.bad_file else ""
        lines.append(f"faults: {len(result.bad_rows)} bad rows{whole}")
    lines.append(
        (f"manifest (every path and fault): {manifest}" if manifest else "--manifest FILE writes every path and fault")
        + "; --json prints it here"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
