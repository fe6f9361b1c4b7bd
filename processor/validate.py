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
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from processor.errors import Reason
from processor.schema import MONEY_DTYPE, STATUSES, TS_DTYPE, Column, Dataset, Kind

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
    ``Z`` or ``+02:00`` offsets) goes through the slower formats, only for the rows the fast path missed. No cache of
    converted values: timestamps are nearly all distinct, and polars' cache cost a third of the parse.
    """
    return _complete_timestamps(raw, raw.to_frame().select(_fast_timestamps(pl.col(raw.name))).to_series())


def _fast_timestamps(raw: pl.Expr) -> pl.Expr:
    return raw.str.to_datetime(_FAST_TS, strict=False, time_unit="us", time_zone="UTC", cache=False)


def _complete_timestamps(raw: pl.Series, fast: pl.Series) -> pl.Series:
    """``fast`` (the fast path's result) with the values it missed parsed by the slower formats."""
    if fast.null_count() == raw.null_count():  # nothing missed (null counts are known without a pass)
        return fast
    idx = (fast.is_null() & raw.is_not_null()).arg_true()
    sub = raw.gather(idx).str.replace(" ", "T", literal=True, n=1)
    slow = pl.select(
        pl.coalesce(
            [sub.str.to_datetime(f, strict=False, time_unit="us", time_zone="UTC", cache=False) for f in _SLOW_TS]
        )
    ).to_series()
    return fast.scatter(idx, slow)


#: Money values that may hold an exponent or more than two bytes after their first dot, as one regex pass (about
#: half the CPU of the two exact checks, which then run only for a chunk that has such a value): an ``e``, three
#: characters after a dot (any: ``(?s)``), or a non-ASCII character (bytes, not characters, are counted exactly).
_MONEY_SUSPECT = r"(?s)[eE]|\..{3}|[^\x00-\x7f]"


def _exponent(raw: pl.Expr) -> pl.Expr:
    return raw.str.contains_any(["e", "E"])


def _long_fraction(raw: pl.Expr) -> pl.Expr:
    """True where a money value has more than 2 fraction digits as written (``1.500`` too: see below)."""
    dot = raw.str.find(".", literal=True)
    frac = raw.str.len_bytes().cast(pl.Int64) - dot.cast(pl.Int64) - 1
    return (frac > 2).fill_null(False)


def _bad_precision(raw: pl.Series, long: pl.Series) -> pl.Series:
    """True where a money value has more than 2 significant fraction digits (``1.500`` is fine, ``1.505`` is not):
    the regex runs only when some value is long at all."""
    if not long.any():
        return long
    return long & ~raw.str.contains(r"\.\d{2}0+$").fill_null(False)


def _nulls(name: str, n: int) -> pl.Series:
    return pl.Series(name, dtype=pl.String).extend_constant(None, n)


def _first(conditions: list[tuple[pl.Series, str]], n: int) -> pl.Series:
    """For each row, the label of the first condition that holds (null when none)."""
    out = _nulls(COLUMN, n)
    for cond, label in reversed(conditions):
        out = pl.select(pl.when(cond).then(pl.lit(label)).otherwise(out)).to_series()
    return out


#: The row rules in the order a row is judged by (its first failing rule names it), after the reader's three.
ROW_RULES = (
    Reason.MISSING_REQUIRED,
    Reason.BAD_TYPE,
    Reason.UNKNOWN_STATUS,
    Reason.NEGATIVE_MONEY,
    Reason.MONEY_PRECISION,
    Reason.BAD_QUANTITY,
    Reason.TIMESTAMP_ORDER,
)
#: Per rule, (rows that break it, column) in contract column order.
_Faults = dict[Reason, list[tuple[pl.Series, str]]]


def check_chunk(raw: pl.DataFrame, dataset: Dataset) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate one chunk of raw rows.

    ``raw`` holds every column of ``dataset`` as strings (absent optional columns as nulls; integer columns may
    come typed from the reader) and ``_line``. Returns ``(valid, rejected)``: ``valid`` with the staged schema
    (``dataset.staged_schema()``), ``rejected`` with ``_line``, ``_reason``, ``_column`` and the raw string values.

    Steps: type each column and note the rows its kind's rules reject (:func:`_type_columns`); the rules across
    columns (:func:`_row_rules`); each row's first failing rule and column (:func:`_first_fault`); the split.
    """
    faults: _Faults = {r: [] for r in ROW_RULES}
    typed = _type_columns(raw, dataset, faults)
    _row_rules(typed, dataset, faults)
    reason, column = _first_fault(faults, raw.height)
    line = raw.get_column(LINE).cast(pl.Int64)
    valid = pl.DataFrame([typed[c] for c in dataset.names] + [line])
    if reason is None or column is None:
        return valid, empty_rejects(dataset)
    bad = reason.is_not_null()
    rejected = pl.DataFrame(
        [line, reason.alias(REASON), column.alias(COLUMN)]
        + [raw.get_column(c).cast(pl.String) for c in dataset.names]
        + [_nulls(RAW, raw.height)]
    ).filter(bad)
    return valid.filter(~bad), rejected


def _type_columns(raw: pl.DataFrame, dataset: Dataset, faults: _Faults) -> dict[str, pl.Series]:
    """Every column cast to its staged type; the rows that break its kind's rules are added to ``faults``.

    The casts and checks of all columns are one ``select``, which polars evaluates side by side on its threads (a
    chunk's four timestamp columns parse at once); evaluated one after another they kept one core busy while the
    reader and the writer waited for it. What is left runs on the results: the slow paths, only for the rows (or
    chunks) that need them.
    """
    exprs = [e for col in dataset.columns for e in _column_exprs(col, raw.schema[col.name])]
    computed = raw.select(exprs) if exprs else pl.DataFrame()
    return {
        col.name: _column_result(col, raw.get_column(col.name), computed, faults).alias(col.name)
        for col in dataset.columns
    }


def _part(name: str, what: str) -> str:
    return f"{name}:{what}"  # the select's output holds only these: no clash with the chunk's own columns


def _column_exprs(col: Column, dtype: pl.DataType) -> list[pl.Expr]:
    """What :func:`_column_result` needs computed over the whole column, as expressions."""
    c = pl.col(col.name)
    if col.kind is Kind.INT:
        return [] if dtype == pl.Int64 else [c.cast(pl.Int64, strict=False).alias(_part(col.name, "t"))]
    if col.kind is Kind.MONEY:
        return [
            c.cast(MONEY_DTYPE, strict=False).alias(_part(col.name, "t")),
            # The cast accepts exponent notation (1e3) and cuts digits past the second decimal (1.505 -> 1.50):
            # values that may have either are found first (:data:`_MONEY_SUSPECT`), and checked exactly after.
            c.str.contains(_MONEY_SUSPECT).alias(_part(col.name, "suspect")),
        ]
    if col.kind is Kind.TS:
        return [_fast_timestamps(c).alias(_part(col.name, "t"))]
    if col.kind is Kind.STATUS:
        return [_one_of(c, STATUSES).alias(_part(col.name, "known"))]
    return []


def _column_result(col: Column, s: pl.Series, computed: pl.DataFrame, faults: _Faults) -> pl.Series:
    """``s`` cast to its staged type from what :func:`_column_exprs` computed; its faults added to ``faults``."""

    def part(what: str) -> pl.Series:
        return computed.get_column(_part(col.name, what))

    # A condition that cannot hold is not noted: null counts tell without a pass over the column (a cast fails
    # where a value is present and its result is null), and a chunk's checks then cost a handful of calls.
    nulls = s.null_count()
    if col.required and nulls:
        faults[Reason.MISSING_REQUIRED].append((s.is_null(), col.name))
    if col.kind is Kind.INT:
        t = s if s.dtype == pl.Int64 else part("t")  # the reader may have typed it
    elif col.kind is Kind.MONEY:
        t = part("t")
        if part("suspect").any():  # rare: the exact checks, over the chunk
            c = pl.col(col.name)
            exponent, long = s.to_frame().select(_exponent(c).alias("e"), _long_fraction(c).alias("long"))
            if exponent.any():  # the contract's decimals are plain digits
                t = pl.select(pl.when(exponent).then(None).otherwise(t)).to_series()
            faults[Reason.MONEY_PRECISION].append((s.is_not_null() & _bad_precision(s, long), col.name))
        faults[Reason.NEGATIVE_MONEY].append(((t < 0).fill_null(False), col.name))
    elif col.kind is Kind.TS:
        t = _complete_timestamps(s, part("t"))
    elif col.kind is Kind.STATUS:
        t = _statuses(s, part("known"), col.name, faults)
    else:
        t = s
    if col.kind is not Kind.STR and col.kind is not Kind.STATUS and t.null_count() > nulls:
        faults[Reason.BAD_TYPE].append((s.is_not_null() & t.is_null(), col.name))
    return t


def _one_of(value: pl.Expr, allowed: Sequence[str]) -> pl.Expr:
    """``value.is_in(allowed)`` (null for null) for a handful of short strings: one comparison per allowed value is
    about three times faster than ``is_in``'s hash lookup, on every status of every file."""
    return pl.any_horizontal(value == v for v in allowed)


def _statuses(s: pl.Series, known: pl.Series, name: str, faults: _Faults) -> pl.Series:
    """Statuses lowercased; unknown ones noted. Values already lowercase (the usual case) are not copied."""
    if known.sum() == s.len() - s.null_count():  # every present status known as written
        return s
    t = s.str.to_lowercase()
    faults[Reason.UNKNOWN_STATUS].append((s.is_not_null() & ~t.is_in(STATUSES), name))  # rare: mixed case
    return t


def _row_rules(typed: dict[str, pl.Series], dataset: Dataset, faults: _Faults) -> None:
    """The rules between typed values: a positive quantity, no timestamp before ``created_at``. All of a chunk's
    conditions in one ``select``; only those that hold somewhere are noted."""
    rules: list[tuple[Reason, str, pl.Expr]] = []
    if "num_of_item" in typed:
        rules.append((Reason.BAD_QUANTITY, "num_of_item", pl.col("num_of_item") < 1))
    if dataset.later_timestamps:
        rules += [(Reason.TIMESTAMP_ORDER, n, pl.col(n) < pl.col("created_at")) for n in dataset.later_timestamps]
    if not rules:
        return
    used = {c for _, n, _ in rules for c in (n, "created_at") if c in typed}
    hits = pl.DataFrame([typed[c] for c in used]).select(
        e.fill_null(False).alias(str(i)) for i, (*_, e) in enumerate(rules)
    )
    held = hits.select(pl.all().any()).row(0)
    for (code, name, _), column, any_hit in zip(rules, hits.get_columns(), held, strict=True):
        if any_hit:
            faults[code].append((column, name))


def _first_fault(faults: _Faults, n: int) -> tuple[pl.Series | None, pl.Series | None]:
    """Each row's first failing rule (in ``ROW_RULES`` order) and its first column at fault; (None, None) when no row
    fails any rule (the usual chunk: nothing is built)."""
    reason: pl.Series | None = None
    column: pl.Series | None = None
    for code in reversed(ROW_RULES):
        conds = faults[code]
        if not conds:
            continue
        any_hit = conds[0][0]
        for cond, _ in conds[1:]:
            any_hit = any_hit | cond
        if not any_hit.any():
            continue
        which = _first(conds, n)
        reason = pl.select(pl.when(any_hit).then(pl.lit(str(code))).otherwise(reason)).to_series().alias(REASON)
        column = pl.select(pl.when(any_hit).then(which).otherwise(column)).to_series().alias(COLUMN)
    return reason, column


def as_written(rejected: pl.DataFrame, text: pl.DataFrame) -> pl.DataFrame:
    """Rejected rows with their values as written: ``text`` holds the same rows as read (all text), by ``_line``.

    For a chunk whose integer columns the reader typed, whose rejected rows would otherwise show ``7`` for ``007``.
    """
    columns = [c for c in text.columns if c != LINE and c in rejected.columns]
    written = rejected.select(LINE).join(text.select(LINE, *columns), on=LINE, how="left", maintain_order="left")
    return rejected.with_columns(written.get_column(c) for c in columns)


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
    "ROW_RULES",
    "TS_DTYPE",
    "HeaderCheck",
    "as_rejects",
    "as_written",
    "check_chunk",
    "check_header",
    "column_key",
    "empty_rejects",
    "parse_timestamps",
    "unsplit_rejects",
]
