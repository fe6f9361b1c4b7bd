"""Group-bys on an (id, date) pair through one packed 64-bit key.

Polars groups rows by a single integer column with a plain hash table, but by two columns it first encodes every
row's key as bytes: on the merge's (user, date) and (category, date) groups the second is about twice the cost
(docs/performance.md, fourth pass). A non-negative id below 2**39 and a date within about 23,000 years of 1970 fit
one Int64 together (``id * 2**24 + days + 2**23``), so such pairs group by that; any other pair (a negative or huge
id, a null) takes the two-column group-by, which gives the same groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

_DAY_BITS = 24
_DAY_BIAS = 1 << (_DAY_BITS - 1)  # days from -2**23 to 2**23 - 1 map to 0 .. 2**24 - 1
_ID_LIMIT = 1 << (63 - _DAY_BITS)  # ids from 0 to 2**39 - 1 keep the packed key positive
_PAIR = "_pair"


def group_by_pair(
    frame: pl.DataFrame, ident: str, day: str, aggs: Sequence[pl.Expr], *, in_order: bool = False
) -> pl.DataFrame:
    """``frame.group_by(ident, day).agg(aggs)`` (``ident`` an integer column, ``day`` a Date), columns in that order;
    ``in_order``: the groups sorted by (ident, day).

    In order, the packed keys are sorted first and grouped as runs (polars groups a column flagged sorted by its
    runs, without hashing): for a million (user, date) weights about 40 % less CPU than hashing the groups and then
    sorting them (docs/performance.md, eighth pass)."""
    if not packable(frame, ident, day):
        groups = frame.group_by(ident, day).agg(*aggs)
        return groups.sort(ident, day) if in_order else groups
    days = pl.col(day).cast(pl.Int32).cast(pl.Int64)
    key = (pl.col(ident).cast(pl.Int64) * (1 << _DAY_BITS) + days + _DAY_BIAS).alias(_PAIR)
    if in_order:  # only the columns the aggregations read are gathered by the sort
        used = {name for a in aggs for name in a.meta.root_names()}
        packed = frame.select(key, *(c for c in frame.columns if c in used)).sort(_PAIR)
    else:
        packed = frame.with_columns(key)
    return (
        packed.group_by(_PAIR, maintain_order=in_order)
        .agg(*aggs)
        .select(
            (pl.col(_PAIR) // (1 << _DAY_BITS)).cast(frame.schema[ident]).alias(ident),
            (pl.col(_PAIR) % (1 << _DAY_BITS) - _DAY_BIAS).cast(pl.Int32).cast(pl.Date).alias(day),
            pl.exclude(_PAIR),
        )
    )


def packable(frame: pl.DataFrame, ident: str, day: str) -> bool:
    """Whether every (ident, day) pair of ``frame`` fits the packed key (an empty frame needs no packing)."""
    if frame.is_empty() or frame.schema[day] != pl.Date or not frame.schema[ident].is_integer():
        return False
    days = pl.col(day).cast(pl.Int32)
    lo, hi, dlo, dhi, nulls = frame.select(
        pl.col(ident).min().alias("lo"),
        pl.col(ident).max().alias("hi"),
        days.min().alias("dlo"),
        days.max().alias("dhi"),
        (pl.col(ident).null_count() + pl.col(day).null_count()).alias("nulls"),
    ).row(0)
    return bool(nulls == 0 and lo >= 0 and hi < _ID_LIMIT and dlo >= -_DAY_BIAS and dhi < _DAY_BIAS)
