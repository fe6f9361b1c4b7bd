"""Field splitting: a block of whole CSV records -> polars rows, and the records rejected while splitting it.

:func:`parse_block` parses a block with polars in one call when cheap byte searches and the parse itself show that
each line is one whole row (the fast path: no Python per row; integer columns typed by the CSV reader itself). Any
other block is indexed record by record (numpy) to find the malformed, badly encoded and blank records; the rest is
parsed with polars again, as text (the string path). Both paths give the same rows: :mod:`processor.validate` casts
text and checks typed values by the same rules, and :func:`text_rows` gives the typed path's rows as written, for the
rejected-rows file.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import numpy as np
import polars as pl

from processor.errors import Reason
from processor.quotes import COMMA, CR, NL, QUOTE, QuoteState, inside, scan_quotes
from processor.records import RAW_PREFIX_BYTES, Bad, Block, count_byte

LINE = "_line"
SPACE, TAB = 32, 9
_PARSE_ERRORS = (pl.exceptions.PolarsError, pl.exceptions.PanicException, UnicodeDecodeError)


@dataclass(frozen=True)
class Columns:
    names: list[str]  # one per header field
    wanted: list[str]
    ints: frozenset[str]
    limit: int  # record limit, bytes

    @property
    def width(self) -> int:
        return len(self.names)

    def text_schema(self) -> dict[str, pl.DataType]:
        return {h: pl.String() for h in self.names}


@dataclass
class Parsed:
    rows: pl.DataFrame  # the wanted columns plus ``_line``
    bad: list[Bad]
    typed: bool  # integer columns were typed by the CSV reader: :func:`text_rows` has them as written


def _read(data: bytes, schema: dict[str, pl.DataType]) -> pl.DataFrame | None:
    try:
        return pl.read_csv(
            data,
            schema=schema,
            has_header=False,
            truncate_ragged_lines=False,
            encoding="utf8",
            raise_if_empty=False,
        )
    except _PARSE_ERRORS:
        return None


def _text(data: bytes, cols: Columns, rows: int) -> pl.DataFrame | None:
    """Whole records as text; None when polars cannot parse them or finds another number of rows than expected."""
    df = _read(data, cols.text_schema())
    return None if df is None or df.height != rows else df.select(cols.wanted)


def _plain_rows(data: bytes, cols: Columns, rows: int, *, typed: bool) -> pl.DataFrame | None:
    """The rows of a block that :func:`_plain` admitted, when each line is one whole row; None otherwise (then
    every record is looked at). ``typed``: the integer columns typed by the CSV reader (faster than text followed by
    a cast), only where that gives the text path's values (see below).

    Polars refuses a line with more fields than the header, and fills a shorter one (a blank line too) with nulls
    from its end: so a last column without a null says at once that no line is short. A null there may also be a
    value left empty, which the count of commas tells apart (one per field boundary, the block holding no quote):
    that count, a pass over the block, is paid only then.

    Polars' integer parser skips blanks before a number, which the text path rejects as ``bad_type``, so a block
    with a blank after a delimiter is not read typed. A single bad value makes the typed parse fail, and the block
    is read as text, so validation can name the row and column.
    """
    if typed and (not cols.ints or _blank_before_value(data)):
        return None
    schema: dict[str, pl.DataType] = {h: (pl.Int64() if typed and h in cols.ints else pl.String()) for h in cols.names}
    df = _read(data, schema)
    if df is None or df.height != rows:
        return None
    if df.to_series(df.width - 1).null_count() and count_byte(data, COMMA) != rows * (cols.width - 1):
        return None
    return df.select(cols.wanted)


def _blank_before_value(data: bytes) -> bool:
    """True when a space or tab starts a field somewhere in ``data`` (after a delimiter, or at a line's start).

    Files of orders and items have no blank at all, which one ``find`` per byte tells; only a block that has blanks
    (names in a products file) is looked at byte by byte (numpy).
    """
    if data.find(b" ") < 0 and data.find(b"\t") < 0:
        return False
    arr = np.frombuffer(data, dtype=np.uint8)
    blank = (arr == SPACE) | (arr == TAB)
    return bool(blank[0] or (blank[1:] & ((arr[:-1] == COMMA) | (arr[:-1] == NL))).any())


def _lines_within(block: bytes, limit: int) -> bool:
    """True when no line of the block can be longer than ``limit``: every stretch of ``limit // 2`` bytes holds a
    newline (a handful of ``find`` calls per block, each stopping at the first newline)."""
    step = max(limit // 2, 1)
    return all(block.find(b"\n", x, x + step) >= 0 for x in range(0, len(block), step))


def _plain(item: Block, cols: Columns) -> bool:
    """The fast path's precondition: no quote, no NUL, no over-long line, and more than one column.

    Polars rejects a record with too many fields and invalid UTF-8, and :func:`_plain_rows` then finds a short or
    blank line, so if the block passes both, each line is one whole row. These checks cost about a millisecond
    per 8 MB block (the quote search is skipped when the reader already knows the block holds none).
    """
    block = item.data
    return (
        (item.unquoted or b'"' not in block)
        and b"\x00" not in block
        and cols.width > 1
        and _lines_within(block, cols.limit)
    )


def parse_block(item: Block, cols: Columns) -> Parsed:
    """Rows of a block of whole records (wanted columns and ``_line``) and the records rejected while parsing."""
    if _plain(item, cols):
        df = _plain_rows(item.data, cols, item.newlines, typed=True)
        typed = df is not None
        if df is None:
            df = _plain_rows(item.data, cols, item.newlines, typed=False)
        if df is not None:
            rows = df.with_row_index(LINE, offset=item.first_line).with_columns(pl.col(LINE).cast(pl.Int64))
            return Parsed(rows, [], typed)
    rows, bad = _parse_records(item.data, item.first_line, cols)
    return Parsed(rows, bad, False)


def text_rows(item: Block, cols: Columns) -> pl.DataFrame:
    """The rows of a block that :func:`parse_block` read typed, as text (``_line`` and the wanted columns)."""
    df = _text(item.data, cols, item.newlines)
    assert df is not None, "a block the typed parse read is read as text too"
    return df.with_row_index(LINE, offset=item.first_line).with_columns(pl.col(LINE).cast(pl.Int64))


@dataclass
class _Index:
    """Where each record of a block starts and ends, its fields, and the quotes that break the rules."""

    arr: np.ndarray
    newlines: np.ndarray
    starts: np.ndarray
    ends: np.ndarray  # the newline ending each record
    fields: np.ndarray
    strays: list[int]
    quoted: bool  # the block holds a quote


def _index(block: bytes) -> _Index:
    arr = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(arr == NL)
    q = np.flatnonzero(arr == QUOTE)
    commas = np.flatnonzero(arr == COMMA)
    strays: list[int] = []
    ends = newlines
    if q.size:
        scan = scan_quotes(block, arr, q, QuoteState())
        strays = scan.strays
        if scan.resync is not None or scan.stop < q.size:  # the splitter cut these: kept as a safety net
            strays.append(int(q[scan.stop]))
        ends = newlines[~inside(scan.bounds, newlines)]
        commas = commas[~inside(scan.bounds, commas)]
    if ends.size == 0 or ends[-1] != arr.size - 1:  # a quoted field left open: the splitter never hands one out
        ends = np.append(ends, arr.size - 1)
        strays.append(arr.size - 1)
    starts = np.concatenate(([0], ends[:-1] + 1))
    fields = np.searchsorted(commas, ends) - np.searchsorted(commas, starts) + 1
    return _Index(arr, newlines, starts, ends, fields, strays, bool(q.size))


@dataclass
class _Verdicts:
    """Per record: skipped as blank, or rejected as too long, malformed or badly encoded (first reason only)."""

    blank: np.ndarray
    too_long: np.ndarray
    malformed: np.ndarray
    encoding: np.ndarray

    @property
    def keep(self) -> np.ndarray:
        kept: np.ndarray = ~(self.blank | self.too_long | self.malformed | self.encoding)
        return kept


def _judge(block: bytes, ix: _Index, cols: Columns) -> _Verdicts:
    arr, starts, ends = ix.arr, ix.starts, ix.ends
    length = ends - starts - ((ends > starts) & (arr[np.maximum(ends - 1, 0)] == CR))
    blank = length == 0
    too_long = length > cols.limit
    for j in np.flatnonzero((ix.fields == 1) & ~blank):  # whitespace-only lines are blank too (rare: a Python step)
        blank[j] = not block[starts[j] : ends[j]].strip(b" \t\r")
    malformed = (ix.fields != cols.width) & ~blank
    if ix.strays:
        malformed[np.searchsorted(ends, np.asarray(ix.strays, dtype=np.int64))] = True
    malformed &= ~too_long
    encoding = np.zeros(ends.size, dtype=bool)
    nul = np.flatnonzero(arr == 0)
    if nul.size:
        encoding[np.searchsorted(ends, nul)] = True
    encoding[_bad_utf8(block, ends)] = True
    encoding &= ~(too_long | malformed | blank)
    return _Verdicts(blank, too_long, malformed, encoding)


def _parse_records(block: bytes, first_line: int, cols: Columns) -> tuple[pl.DataFrame, list[Bad]]:
    """The string path: index every record of the block (vectorised), reject the bad ones, parse the rest as text."""
    ix = _index(block)
    v = _judge(block, ix, cols)
    starts, ends = ix.starts, ix.ends
    lines = first_line + np.searchsorted(ix.newlines, starts)
    bad: list[Bad] = []
    for j in np.flatnonzero(v.too_long | v.malformed | v.encoding):
        if v.too_long[j]:
            bad.append(Bad(int(lines[j]), Reason.RECORD_TOO_LONG, block[starts[j] : starts[j] + RAW_PREFIX_BYTES]))
        else:
            reason = Reason.MALFORMED_ROW if v.malformed[j] else Reason.BAD_ENCODING
            bad.append(Bad(int(lines[j]), reason, block[starts[j] : ends[j]]))
    keep = v.keep
    kept = np.flatnonzero(keep)
    good = block if kept.size == ends.size else ix.arr[np.repeat(keep, ends + 1 - starts)].tobytes()
    df = _text(good, cols, int(kept.size))
    if df is None:  # something polars refuses that the index did not catch: find the records by bisection
        sizes = ends[kept] + 1 - starts[kept]
        df, failed = _bisect_all(good, np.concatenate(([0], np.cumsum(sizes))), cols)
        for f in failed:
            r = int(kept[f])
            bad.append(Bad(int(lines[r]), Reason.MALFORMED_ROW, block[starts[r] : ends[r]]))
        kept = np.delete(kept, failed)
        bad.sort(key=lambda b: b.line)
    if ix.quoted:  # a quoted empty field ("") is empty too: null, like an unquoted one (SPEC 1)
        df = df.with_columns(pl.when(pl.col(c) != "").then(pl.col(c)).alias(c) for c in cols.wanted)
    return df.select(pl.Series(LINE, lines[kept], dtype=pl.Int64), *cols.wanted), bad


def _bisect_all(good: bytes, offsets: np.ndarray, cols: Columns) -> tuple[pl.DataFrame, list[int]]:
    """The records polars parses (as one frame) and the indices of those it refuses, each found alone."""
    frames: list[pl.DataFrame] = []
    failed: list[int] = []
    _bisect(good, offsets, 0, offsets.size - 1, cols, frames, failed)
    df = pl.concat(frames) if frames else pl.DataFrame(schema={c: pl.String() for c in cols.wanted})
    return df, failed


def _bisect(
    good: bytes,
    offsets: np.ndarray,
    lo: int,
    hi: int,
    cols: Columns,
    frames: list[pl.DataFrame],
    failed: list[int],
) -> None:
    """Parse records ``lo:hi`` as text, halving the range until each failing record stands alone (O(n log n))."""
    if hi <= lo:
        return
    df = _read(good[offsets[lo] : offsets[hi]], cols.text_schema())
    if df is not None and df.height == hi - lo:
        frames.append(df.select(cols.wanted))
    elif hi - lo == 1:
        failed.append(lo)
    else:
        mid = (lo + hi) // 2
        _bisect(good, offsets, lo, mid, cols, frames, failed)
        _bisect(good, offsets, mid, hi, cols, frames, failed)


def _bad_utf8(block: bytes, ends: np.ndarray) -> np.ndarray:
    """Indices of the records holding invalid UTF-8: each error is located by the decoder, which then resumes
    after that record, so the whole block is decoded once however many records are bad."""
    found: list[int] = []
    view = memoryview(block)
    pos = 0
    while pos < len(block):
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            break
        except UnicodeDecodeError as e:
            j = int(np.searchsorted(ends, pos + e.start))
            if j >= ends.size:
                break
            found.append(j)
            pos = int(ends[j]) + 1
    return np.asarray(found, dtype=np.int64)
