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


def group_by_pair(frame: pl.DataFrame, ident: str, day: str, aggs: Sequence[pl.Expr]) -> pl.DataFrame:
    """``frame.group_by(ident, day).agg(aggs)`` (``ident`` an integer column, ``day`` a Date), columns in that order."""
    if not packable(frame, ident, day):
        return frame.group_by(ident, day).agg(*aggs)
    days = pl.col(day).cast(pl.Int32).cast(pl.Int64)
    key = (pl.col(ident).cast(pl.Int64) * (1 << _DAY_BITS) + days + _DAY_BIAS).alias(_PAIR)
    return (
        frame.group_by(key)
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
