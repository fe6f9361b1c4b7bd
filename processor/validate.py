"""Row-level validation (SPEC section 2), as pure functions over polars frames.

Input is a chunk of raw rows as read from the CSV (text columns, or Int64 where the reader could type a whole
chunk's integers; empty strings already null) plus
``_line``, the 1-based line of the row in its file. Output is the valid rows with their staged types and the rejected
rows with their raw values, reason code and the column at fault. Nothing here knows about files, S3 or chunks:
:mod:`processor.ingest` streams chunks through :func:`check_chunk` and keeps the cross-chunk state (duplicate keys).

A row gets the *first* reason that applies, in the order of :class:`processor.errors.Reason`, and the first column
(in contract order) at fault, so reports are deterministic.

Speed matters: this runs over every row of multi-GB files. Casts use explicit formats (format inference is several
times slower); slower fallbacks (alternative timestamp layouts, trailing-zero money) run only on the rows that miss
the fast path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import polars as pl

from processor.errors import Reason
from processor.schema import MONEY_DTYPE, STATUSES, TS_DTYPE, Dataset, Kind

LINE = "_line"
REASON = "_reason"
COLUMN = "_column"
#: Raw text of a record rejected before it could be split into columns (last column of the rejected-rows CSV).
RAW = "_raw"

_FAST_TS = "%Y-%m-%dT%H:%M:%S"
_SLOW_TS = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f%#z")


@dataclass(frozen=True)
class HeaderCheck:
    missing: tuple[str, ...]  # required columns absent: the file is rejected
    absent_optional: tuple[str, ...]  # optional columns absent: filled with nulls
    extra: tuple[str, ...]  # unknown columns (as written): ignored with a warning
    duplicated: tuple[str, ...]  # a column named twice (case-insensitively): the file is rejected
    columns: tuple[str | None, ...] = ()  # for each header field, the contract column it names (None: extra)


def column_key(name: str) -> str:
    """How header names compare (SPEC 1): surrounding spaces trimmed, case-insensitive."""
    return name.strip().casefold()


def check_header(header: list[str], dataset: Dataset) -> HeaderCheck:
    names = [h.strip() for h in header]
    keys = [column_key(n) for n in names]
    counts = Counter(k for k in keys if k)  # unnamed fields are extras, never duplicates of each other
    known = set(dataset.names)
    return HeaderCheck(
        missing=tuple(c for c in dataset.required if c not in counts),
        absent_optional=tuple(c.name for c in dataset.columns if not c.required and c.name not in counts),
        extra=tuple(n for n, k in zip(names, keys, strict=True) if k not in known),
        duplicated=tuple(sorted(k for k, n in counts.items() if n > 1)),
        columns=tuple(k if k in known else None for k in keys),
    )


def parse_timestamps(raw: pl.Series) -> pl.Series:
    """ISO-8601 strings -> Datetime(us, UTC). Naive values are UTC; values with an offset are converted to UTC.

    The fast path takes the common ``2025-03-30T16:14:26``; the rest (space separator, fractional seconds,
    ``Z`` or ``+02:00`` offsets) goes through the slower formats, only for the rows the fast path missed.
    """
    fast = raw.str.to_datetime(_FAST_TS, strict=False, time_unit="us", time_zone="UTC")
    missed = fast.is_null() & raw.is_not_null()
    if not missed.any():
        return fast
    idx = missed.arg_true()
    sub = raw.gather(idx).str.replace(" ", "T", literal=True, n=1)
    slow = pl.select(
        pl.coalesce([sub.str.to_datetime(f, strict=False, time_unit="us", time_zone="UTC") for f in _SLOW_TS])
    ).to_series()
    return fast.scatter(idx, slow)


def _money_precision_ok(raw: pl.Series) -> pl.Series:
    """True where the value has at most 2 significant fraction digits (``1.500`` is fine, ``1.505`` is not)."""
    dot = raw.str.find(".", literal=True)
    frac = raw.str.len_bytes().cast(pl.Int64) - dot.cast(pl.Int64) - 1
    long = (frac > 2).fill_null(False)
    if not long.any():
        return ~long
    return ~long | raw.str.contains(r"\.\d{2}0+$").fill_null(False)


def _nulls(name: str, n: int) -> pl.Series:
    return pl.Series(name, dtype=pl.String).extend_constant(None, n)


def _first(conditions: list[tuple[pl.Series, str]], n: int) -> pl.Series:
    """For each row, the label of the first condition that holds (null when none)."""
    out = _nulls(COLUMN, n)
    for cond, label in reversed(conditions):
        out = pl.select(pl.when(cond).then(pl.lit(label)).otherwise(out)).to_series()
    return out


def check_chunk(raw: pl.DataFrame, dataset: Dataset) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate one chunk of raw rows.

    ``raw`` holds every column of ``dataset`` as strings (absent optional columns as nulls) and ``_line``.
    Returns ``(valid, rejected)``: ``valid`` with the staged schema (``dataset.staged_schema()``), ``rejected``
    with ``_line``, ``_reason``, ``_column`` and the raw string values.
    """
    n = raw.height
    typed: dict[str, pl.Series] = {}
    bad_type: list[tuple[pl.Series, str]] = []
    missing: list[tuple[pl.Series, str]] = []
    money_neg: list[tuple[pl.Series, str]] = []
    money_prec: list[tuple[pl.Series, str]] = []
    status_bad: list[tuple[pl.Series, str]] = []

    for col in dataset.columns:
        s = raw.get_column(col.name)
        present = s.is_not_null()
        if col.required:
            missing.append((~present, col.name))
        if col.kind is Kind.INT:
            t = s if s.dtype == pl.Int64 else s.cast(pl.Int64, strict=False)  # the reader may have typed it
        elif col.kind is Kind.MONEY:
            t = s.cast(MONEY_DTYPE, strict=False)
            # The cast accepts exponent notation (1e3); the contract's decimals are plain digits.
            t = pl.select(
                pl.when(s.str.contains("e", literal=True) | s.str.contains("E", literal=True)).then(None).otherwise(t)
            ).to_series()
            money_neg.append(((t < 0).fill_null(False), col.name))
            money_prec.append((present & ~_money_precision_ok(s), col.name))
        elif col.kind is Kind.TS:
            t = parse_timestamps(s)
        elif col.kind is Kind.STATUS:
            t = s.str.to_lowercase()
            status_bad.append((present & ~t.is_in(STATUSES), col.name))
        else:
            t = s
        if col.kind is not Kind.STR and col.kind is not Kind.STATUS:
            bad_type.append((present & t.is_null(), col.name))
        typed[col.name] = t.alias(col.name)

    quantity: list[tuple[pl.Series, str]] = []
    if "num_of_item" in typed:
        quantity.append(((typed["num_of_item"] < 1).fill_null(False), "num_of_item"))
    ts_order: list[tuple[pl.Series, str]] = []
    if dataset.later_timestamps:
        created = typed["created_at"]
        for name in dataset.later_timestamps:
            ts_order.append(((typed[name] < created).fill_null(False), name))

    rules: list[tuple[Reason, list[tuple[pl.Series, str]]]] = [
        (Reason.MISSING_REQUIRED, missing),
        (Reason.BAD_TYPE, bad_type),
        (Reason.UNKNOWN_STATUS, status_bad),
        (Reason.NEGATIVE_MONEY, money_neg),
        (Reason.MONEY_PRECISION, money_prec),
        (Reason.BAD_QUANTITY, quantity),
        (Reason.TIMESTAMP_ORDER, ts_order),
    ]
    reason = _nulls(REASON, n)
    column = _nulls(COLUMN, n)
    for code, conds in reversed(rules):
        if not conds:
            continue
        any_hit = conds[0][0]
        for cond, _ in conds[1:]:
            any_hit = any_hit | cond
        if not any_hit.any():
            continue
        which = _first(conds, n)
        reason = pl.select(pl.when(any_hit).then(pl.lit(str(code))).otherwise(reason)).to_series()
        column = pl.select(pl.when(any_hit).then(which).otherwise(column)).to_series()

    bad = reason.is_not_null()
    line = raw.get_column(LINE).cast(pl.Int64)
    valid = pl.DataFrame([typed[c] for c in dataset.names] + [line])
    if not bad.any():
        return valid, empty_rejects(dataset)
    good = ~bad
    rejected = pl.DataFrame(
        [line, reason.alias(REASON), column.alias(COLUMN)]
        + [raw.get_column(c).cast(pl.String) for c in dataset.names]
        + [_nulls(RAW, n)]
    ).filter(bad)
    return valid.filter(good), rejected


def empty_rejects(dataset: Dataset) -> pl.DataFrame:
    """The rejected-rows schema: line, reason, column at fault, the raw values by column, then ``_raw``."""
    return pl.DataFrame(schema=_reject_schema(dataset))


def _reject_schema(dataset: Dataset) -> dict[str, pl.DataType]:
    schema: dict[str, pl.DataType] = {LINE: pl.Int64(), REASON: pl.String(), COLUMN: pl.String()}
    schema.update({c: pl.String() for c in dataset.names})
    schema[RAW] = pl.String()
    return schema


def unsplit_rejects(records: pl.DataFrame, dataset: Dataset) -> pl.DataFrame:
    """Records rejected while reading (``_line``, ``_reason``, ``_raw``) in the rejected-rows schema: no column
    values (the record could not be split into them), its raw text in ``_raw``."""
    return records.select(
        pl.col(LINE).cast(pl.Int64),
        pl.col(REASON),
        pl.lit(None, pl.String).alias(COLUMN),
        *[pl.lit(None, pl.String).alias(c) for c in dataset.names],
        pl.col(RAW),
    )


def as_rejects(valid_rows: pl.DataFrame, dataset: Dataset, reason: Reason, column: str) -> pl.DataFrame:
    """Turn staged rows back into reject records (for rules found after typing: duplicate keys)."""
    exprs = [pl.col(LINE), pl.lit(str(reason)).alias(REASON), pl.lit(column).alias(COLUMN)]
    for c in dataset.columns:
        e = pl.col(c.name)
        if c.kind is Kind.TS:
            e = e.dt.strftime("%Y-%m-%dT%H:%M:%S%.f")
        exprs.append(e.cast(pl.String).alias(c.name))
    exprs.append(pl.lit(None, pl.String).alias(RAW))
    return valid_rows.select(exprs)


__all__ = [
    "COLUMN",
    "LINE",
    "RAW",
    "REASON",
    "TS_DTYPE",
    "HeaderCheck",
    "as_rejects",
    "check_chunk",
    "check_header",
    "column_key",
    "empty_rejects",
    "parse_timestamps",
    "unsplit_rejects",
]
