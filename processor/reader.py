"""Streaming CSV reader: any binary stream (a local file, a gzip stream, an S3 response body) -> chunks of rows.

Why not ``pl.scan_csv``: it memory-maps local files (resident memory grows with the file) and cannot read a gzip or
network stream without first decompressing or downloading it whole. Here memory is bounded by the chunk size and the
record limit, the same code reads every source, and a background thread parses the next chunk (polars,
multi-threaded) while the caller validates the current one.

Two stages, both linear in the input:

* :class:`_Splitter` cuts the byte stream into *blocks* of whole records. A record ends at a newline outside a quoted
  field; quotes are followed by a vectorised scan (numpy) that only drops to a per-quote step at a quote that breaks
  the CSV rules, so every byte is looked at a bounded number of times whatever the input. A record longer than the
  record limit is rejected without ever being held whole; a quoted field that never closes properly is cut back to
  the line where it opened, so one stray quote costs one row, not the rest of the file.
* :func:`_parse_block` parses a block with polars in one call when cheap byte counts show it is well formed (the fast
  path: no Python per row). A block that fails those checks or the parse is indexed record by record (numpy) to find
  the malformed, badly encoded and blank records; the rest is parsed with polars again.

Rows carry ``_line``, the physical line of the file where the record starts (the header is line 1; blank lines are
skipped but still counted as lines). Records the reader rejects come out beside the rows, with their line, reason and
raw text (see docs/validation.md).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
import polars as pl

from processor.errors import FileRejected, Reason

LINE = "_line"
REASON = "_reason"
RAW = "_raw"
#: Default record limit (``SHOPKPI_MAX_RECORD_KB``): no valid row of the contract comes near it.
DEFAULT_MAX_RECORD_BYTES = 1 << 20
#: Bytes of a too-long record kept in its rejected row (the record itself is skipped, never held whole).
RAW_PREFIX_BYTES = 4096

_QUOTE, _COMMA, _NL, _CR = 34, 44, 10, 13
#: Bytes that may precede an opening quote (a field starts after them).
_FIELD_START = np.zeros(256, dtype=bool)
_FIELD_START[[_COMMA, _NL]] = True
#: Bytes that may follow a closing quote (the field ends there; a quote makes an escaped quote).
_FIELD_END = np.zeros(256, dtype=bool)
_FIELD_END[[_COMMA, _NL, _CR, _QUOTE]] = True
_DONE = object()
_PARSE_ERRORS = (pl.exceptions.PolarsError, pl.exceptions.PanicException, UnicodeDecodeError)


# --- header --------------------------------------------------------------------------------------------------
def read_header(stream: IO[bytes], *, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[str]:
    """The header row's column names (stripped). Consumes the stream up to the end of the header line."""
    return read_header_line(stream, max_bytes=max_bytes)[0]


def read_header_line(stream: IO[bytes], *, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> tuple[list[str], int]:
    """The header's column names (stripped) and its line number: blank lines before it are skipped.

    The header is read in bounded memory: a first line longer than ``max_bytes`` rejects the file.
    """
    line = 0
    while True:
        first = stream.readline(max_bytes + 1)
        line += 1
        if not first:
            raise FileRejected(Reason.EMPTY_FILE, "the file is empty (no header row)")
        if len(first) > max_bytes and not first.endswith(b"\n"):
            raise FileRejected(
                Reason.UNREADABLE,
                f"the header row is longer than the record limit ({max_bytes // 1024} KiB)",
                line=line,
            )
        if line == 1 and first.startswith(codecs.BOM_UTF8):
            first = first[len(codecs.BOM_UTF8) :]
        if first.strip():
            break
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileRejected(Reason.UNREADABLE, f"the header row is not UTF-8: {e}", line=line) from e
    text = text.rstrip("\r\n")
    if "\r" in text:
        raise FileRejected(
            Reason.UNREADABLE,
            "the header row holds a carriage return not followed by a newline: lines must end in LF or CRLF",
            line=line,
        )
    try:
        names = next(csv.reader([text], strict=True))
    except csv.Error as e:  # e.g. a name longer than the csv module's field limit (128 KiB)
        raise FileRejected(Reason.UNREADABLE, f"the header row is not valid CSV: {e}", line=line) from e
    return [h.strip() for h in names], line


# --- quotes --------------------------------------------------------------------------------------------------
@dataclass
class _QuoteState:
    """Where a scan of the quotes stands: positions are offsets in the scanned buffer."""

    inside: bool = False  # inside a quoted field
    field_open: int = -1  # the opening quote of the current (or last) quoted field
    last_close: int = -2  # the last closing quote: a quote right after it is an escaped quote, not a new field

    def shift(self, by: int) -> None:
        self.field_open -= by
        self.last_close -= by


@dataclass
class _QuoteScan:
    bounds: np.ndarray  # opening and closing quotes of quoted fields, alternating (a field left open: its opener)
    strays: list[int]  # quotes that break the rules: their record is malformed
    stop: int  # quotes from this index on were not scanned (undecided at the end of the buffer, or a resync)
    resync: int | None = None  # opener of a multi-line quoted field closed by a stray quote: cut the record there


def _scan_quotes(buf: bytes, arr: np.ndarray, q: np.ndarray, st: _QuoteState) -> _QuoteScan:
    """Follow the quotes ``q`` (ascending positions in ``buf``) from state ``st``, which is updated.

    RFC 4180 quoting: a quote opens a quoted field only at the start of a field, and closes it only when followed by
    a delimiter, a line end or a second quote (an escaped quote). A quote anywhere else is kept as a literal and
    reported as a stray; a quoted field whose closing quote is followed by text is closed there (reported too), unless
    it spans lines: then its opening quote was the mistake, and the caller cuts the record at the end of the line
    where the field opened (``resync``).

    Well-formed quotes alternate open/close, which numpy checks a window at a time; only a stray quote costs a
    Python step, after which windows start small and grow again, so the work stays linear in the number of quotes.
    """
    end = arr.size
    parts: list[np.ndarray] = [np.array([st.field_open], dtype=np.int64)] if st.inside else []
    strays: list[int] = []
    i, n, window = 0, q.size, max(q.size, 1)
    while i < n:
        w = q[i : i + window]
        m = _valid_prefix(arr, w, st)
        if m:
            _advance(arr, w[:m], st)
            parts.append(w[:m])
        i += m
        if m == w.size:
            window *= 2
            continue
        p = int(q[i])
        if not st.inside:
            strays.append(p)  # a quote inside an unquoted field: a literal, and the row is malformed
        elif p + 1 >= end:
            return _QuoteScan(_concat(parts), strays, i)  # escaped or closing? the next byte is not read yet
        elif buf.find(b"\n", st.field_open, p) >= 0:
            return _QuoteScan(_concat(parts), strays, i, resync=st.field_open)
        else:  # text after the closing quote: close the field there, the row is malformed
            parts.append(np.array([p], dtype=np.int64))
            st.inside, st.last_close = False, p
            strays.append(p)
        i += 1
        window = 64
    return _QuoteScan(_concat(parts), strays, n)


def _valid_prefix(arr: np.ndarray, w: np.ndarray, st: _QuoteState) -> int:
    """How many of the quotes ``w`` are well formed if they alternate open/close from state ``st``."""
    first = 0 if st.inside else 1  # index of the first closing quote
    opens, closes = w[1 - first :: 2], w[first::2]
    prev = arr[np.maximum(opens - 1, 0)]
    open_ok = _FIELD_START[prev] | (opens == 0)
    for j in np.flatnonzero(~open_ok & (prev == _QUOTE)):  # rare: a quote right after a closing one (escaped)
        k = (1 - first) + 2 * int(j)
        previous = int(w[k - 1]) if k else st.last_close
        open_ok[j] = int(opens[j]) - 1 == previous
    after = closes + 1
    close_ok = (after < arr.size) & _FIELD_END[arr[np.minimum(after, arr.size - 1)]]
    bad_open, bad_close = np.flatnonzero(~open_ok), np.flatnonzero(~close_ok)
    m = w.size
    if bad_open.size:
        m = min(m, (1 - first) + 2 * int(bad_open[0]))
    if bad_close.size:
        m = min(m, first + 2 * int(bad_close[0]))
    return m


def _advance(arr: np.ndarray, good: np.ndarray, st: _QuoteState) -> None:
    """Update ``st`` past the well-formed quotes ``good`` (alternating open/close from ``st``)."""
    first = 0 if st.inside else 1
    opens, closes = good[1 - first :: 2], good[first::2]
    if closes.size:
        st.last_close = int(closes[-1])
    st.inside = st.inside != (good.size % 2 == 1)
    if st.inside:  # the field's own opening quote: skip quotes that only continue it after an escaped quote
        for o in opens[::-1].tolist():
            if o == 0 or arr[o - 1] != _QUOTE:
                st.field_open = o
                break


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    out: np.ndarray = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return out


def _inside(bounds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """True for each position (never a quote) that lies inside a quoted field."""
    inside: np.ndarray = np.searchsorted(bounds, positions, side="right") % 2 == 1
    return inside


# --- splitting the stream into blocks of records -------------------------------------------------------------
@dataclass
class _Block:
    data: bytes  # whole records, ending with a newline
    first_line: int
    newlines: int  # physical lines in ``data``


def _newlines(buf: bytes, start: int, end: int) -> int:
    # numpy counts a byte about three times faster than bytes.count on these buffers
    return int(np.count_nonzero(np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start) == _NL))


@dataclass
class _Bad:
    line: int
    reason: Reason
    raw: bytes


class _Splitter:
    """Cuts a byte stream into blocks of whole records (about ``chunk_bytes`` each) and over-long records.

    Holds at most one read plus one record in progress (bounded by the record limit), never the rest of a long
    record. Resync rules (docs/validation.md): a record that reaches the limit is rejected as ``record_too_long``;
    reading resumes after the end of the line where its open quoted field started, or, with no field open, after the
    next newline (the rest of that line is skipped unread). A quoted field still open at the end of the file, or closed
    by a stray quote after spanning lines, is rejected as ``malformed_row`` from its record's start to the end of the
    line where it opened; reading resumes at the next line.
    """

    def __init__(self, stream: IO[bytes], chunk_bytes: int, max_record: int, first_line: int) -> None:
        self.stream = stream
        self.chunk = chunk_bytes
        self.limit = max_record
        self.line = first_line  # line of the record in progress

    def __iter__(self) -> Iterator[_Block | _Bad]:
        buf = b""
        base = 0  # start of the record in progress: everything before it was handed out
        done = 0  # quotes before this offset were scanned
        st = _QuoteState()
        eof = False
        while True:
            if not eof:
                data = self.stream.read(self.chunk)
                if not data:
                    eof = True
                    if len(buf) > base and not buf.endswith(b"\n"):
                        data = b"\n"
                buf = buf[base:] + data  # only the record in progress is carried: at most about the limit
                done -= base
                st.shift(base)
                base = 0
            while True:  # hand out what the buffer holds, then read more
                stop, last_end, resync = self._scan(buf, done, st)
                if last_end is not None and last_end > base:
                    newlines = _newlines(buf, base, last_end)
                    yield _Block(buf[base:last_end], self.line, newlines)
                    self.line += newlines
                    base = last_end
                if resync is not None:
                    cut = buf.find(b"\n", resync) + 1
                    yield self._bad(buf, base, cut, Reason.MALFORMED_ROW)
                    base = done = cut
                    st = _QuoteState()
                    continue
                done = stop
                pending = len(buf) - base
                if eof and pending and st.inside:  # the file ended inside a quoted field
                    cut = buf.find(b"\n", st.field_open) + 1
                    yield self._bad(buf, base, cut, Reason.MALFORMED_ROW)
                    base = done = cut
                    st = _QuoteState()
                    continue
                if pending > self.limit:
                    cut = buf.find(b"\n", st.field_open) + 1 if st.inside else 0
                    yield self._bad(buf, base, cut or len(buf), Reason.RECORD_TOO_LONG)
                    st = _QuoteState()
                    if cut:
                        base = done = cut
                        continue
                    rest = self._skip_line()
                    buf, base, done = rest or b"", 0, 0
                    eof = eof or rest is None
                    continue
                break
            if eof:
                if len(buf) > base:  # cannot happen (the last byte is a newline): never drop data silently
                    yield self._bad(buf, base, len(buf), Reason.MALFORMED_ROW)
                return

    def _bad(self, buf: bytes, start: int, end: int, reason: Reason) -> _Bad:
        keep = end if reason is Reason.MALFORMED_ROW and end - start <= self.limit else start + RAW_PREFIX_BYTES
        bad = _Bad(self.line, reason, buf[start : min(end, keep)])
        self.line += _newlines(buf, start, end)
        return bad

    def _skip_line(self) -> bytes | None:
        """Discard the stream up to and including the next newline; the bytes read after it (None at the end)."""
        self.line += 1
        while True:
            data = self.stream.read(self.chunk)
            if not data:
                return None
            nl = data.find(b"\n")
            if nl >= 0:
                return data[nl + 1 :]

    @staticmethod
    def _scan(buf: bytes, done: int, st: _QuoteState) -> tuple[int, int | None, int | None]:
        """Scan ``buf[done:]``: (offset scanned up to, end of the last whole record in it, resync quote)."""
        if not st.inside and buf.find(b'"', done) < 0:
            nl = buf.rfind(b"\n", done)
            return len(buf), (nl + 1 if nl >= 0 else None), None
        arr = np.frombuffer(buf, dtype=np.uint8)
        q = np.flatnonzero(arr[done:] == _QUOTE) + done
        scan = _scan_quotes(buf, arr, q, st)
        stop = int(q[scan.stop]) if scan.stop < q.size else len(buf)
        hi = scan.resync if scan.resync is not None else stop
        # Newlines before ``done`` belong to the record in progress (inside a quoted field): search after it only.
        while True:
            nl = buf.rfind(b"\n", done, hi)
            if nl < 0:
                return stop, None, scan.resync
            j = int(np.searchsorted(scan.bounds, nl, side="right"))
            if j % 2 == 0:
                return stop, nl + 1, scan.resync
            hi = int(scan.bounds[j - 1])  # the newline is inside a quoted field: look before the field


def _guarded(items: Iterator[_Block | _Bad], line_of: Callable[[], int]) -> Iterator[_Block | _Bad]:
    """Decompression errors (a corrupt or truncated gzip) reject the file as unreadable."""
    try:
        yield from items
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        line = line_of()
        raise FileRejected(Reason.UNREADABLE, f"cannot decompress near line {line}: {e}", line=line) from e


# --- parsing a block -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Columns:
    names: list[str]  # one per header field
    wanted: list[str]
    ints: frozenset[str]
    limit: int  # record limit, bytes

    @property
    def width(self) -> int:
        return len(self.names)


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


def _polars(data: bytes, cols: _Columns, rows: int) -> pl.DataFrame | None:
    """Parse whole records: integers typed by the CSV reader when the whole block allows it, else all text.

    Parsing integers directly is faster than text followed by a cast; a single bad value makes the typed parse
    fail, and that block falls back to text so validation can name the row and column. None when polars cannot
    parse the records or finds another number of rows than expected.
    """
    df = None
    if cols.ints:
        df = _read(data, {h: (pl.Int64() if h in cols.ints else pl.String()) for h in cols.names})
    if df is None:
        df = _read(data, {h: pl.String() for h in cols.names})
    if df is None or df.height != rows:
        return None
    return df.select(cols.wanted)


def _lines_within(block: bytes, limit: int) -> bool:
    """True when no line of the block can be longer than ``limit``: every stretch of ``limit // 2`` bytes holds a
    newline (a handful of ``find`` calls per block, each stopping at the first newline)."""
    step = max(limit // 2, 1)
    return all(block.find(b"\n", x, x + step) >= 0 for x in range(0, len(block), step))


def _parse_block(item: _Block, cols: _Columns) -> tuple[pl.DataFrame, list[_Bad]]:
    """Rows of a block of whole records (wanted columns and ``_line``) and the records rejected while parsing."""
    block, first_line, records = item.data, item.first_line, item.newlines
    # The fast path, for a block with no quote: polars rejects a record with too many fields and invalid UTF-8, so
    # if it parses the block and the commas add up to width-1 per line, no line is short or blank either, and each
    # line is one row. These checks cost a few milliseconds per 16 MB block (the parse itself about 20).
    if (
        b'"' not in block
        and b"\x00" not in block
        and cols.width > 1
        and _lines_within(block, cols.limit)
        and int(np.count_nonzero(np.frombuffer(block, dtype=np.uint8) == _COMMA)) == records * (cols.width - 1)
    ):
        df = _polars(block, cols, records)
        if df is not None:
            return df.with_row_index(LINE, offset=first_line).with_columns(pl.col(LINE).cast(pl.Int64)), []
    return _parse_records(block, first_line, cols)


def _parse_records(block: bytes, first_line: int, cols: _Columns) -> tuple[pl.DataFrame, list[_Bad]]:
    """The slow path: index every record of the block (vectorised), reject the bad ones, parse the rest."""
    arr = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(arr == _NL)
    q = np.flatnonzero(arr == _QUOTE)
    commas = np.flatnonzero(arr == _COMMA)
    strays: list[int] = []
    ends = newlines
    if q.size:
        scan = _scan_quotes(block, arr, q, _QuoteState())
        strays = scan.strays
        if scan.resync is not None or scan.stop < q.size:  # the splitter cut these: kept as a safety net
            strays.append(int(q[scan.stop]))
        ends = newlines[~_inside(scan.bounds, newlines)]
        commas = commas[~_inside(scan.bounds, commas)]
    if ends.size == 0 or ends[-1] != arr.size - 1:  # a quoted field left open: the splitter never hands one out
        ends = np.append(ends, arr.size - 1)
        strays.append(arr.size - 1)
    starts = np.concatenate(([0], ends[:-1] + 1))
    fields = np.searchsorted(commas, ends) - np.searchsorted(commas, starts) + 1
    length = ends - starts - ((ends > starts) & (arr[np.maximum(ends - 1, 0)] == _CR))
    blank = length == 0
    too_long = length > cols.limit
    for j in np.flatnonzero((fields == 1) & ~blank):  # whitespace-only lines are blank too (rare: a Python step)
        blank[j] = not block[starts[j] : ends[j]].strip(b" \t\r")
    malformed = (fields != cols.width) & ~blank
    if strays:
        malformed[np.searchsorted(ends, np.asarray(strays, dtype=np.int64))] = True
    malformed &= ~too_long
    encoding = np.zeros(ends.size, dtype=bool)
    nul = np.flatnonzero(arr == 0)
    if nul.size:
        encoding[np.searchsorted(ends, nul)] = True
    encoding[_bad_utf8(block, ends)] = True
    encoding &= ~(too_long | malformed | blank)
    keep = ~(blank | too_long | malformed | encoding)
    lines = first_line + np.searchsorted(newlines, starts)

    bad: list[_Bad] = []
    for j in np.flatnonzero(too_long | malformed | encoding):
        if too_long[j]:
            bad.append(_Bad(int(lines[j]), Reason.RECORD_TOO_LONG, block[starts[j] : starts[j] + RAW_PREFIX_BYTES]))
        else:
            reason = Reason.MALFORMED_ROW if malformed[j] else Reason.BAD_ENCODING
            bad.append(_Bad(int(lines[j]), reason, block[starts[j] : ends[j]]))
    kept = np.flatnonzero(keep)
    sizes = ends[kept] + 1 - starts[kept]
    good = block if kept.size == ends.size else arr[np.repeat(keep, ends + 1 - starts)].tobytes()
    df = _polars(good, cols, int(kept.size))
    if df is None:  # something polars refuses that the index did not catch: find the records by bisection
        offsets = np.concatenate(([0], np.cumsum(sizes)))
        frames: list[pl.DataFrame] = []
        failed: list[int] = []
        _bisect(good, offsets, 0, int(kept.size), cols, frames, failed)
        for f in failed:
            r = int(kept[f])
            bad.append(_Bad(int(lines[r]), Reason.MALFORMED_ROW, block[starts[r] : ends[r]]))
        kept = np.delete(kept, failed)
        df = pl.concat(frames) if frames else pl.DataFrame(schema={c: pl.String() for c in cols.wanted})
        bad.sort(key=lambda b: b.line)
    if q.size:  # a quoted empty field ("") is empty too: null, like an unquoted one (SPEC 1)
        df = df.with_columns(
            pl.when(pl.col(c) != "").then(pl.col(c)).alias(c) for c in cols.wanted if df.schema[c] == pl.String
        )
    return df.select(pl.Series(LINE, lines[kept], dtype=pl.Int64), *cols.wanted), bad


def _bisect(
    good: bytes,
    offsets: np.ndarray,
    lo: int,
    hi: int,
    cols: _Columns,
    frames: list[pl.DataFrame],
    failed: list[int],
) -> None:
    """Parse records ``lo:hi`` as text, halving the range until each failing record stands alone (O(n log n))."""
    if hi <= lo:
        return
    df = _read(good[offsets[lo] : offsets[hi]], {h: pl.String() for h in cols.names})
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


def _rejects_frame(bad: list[_Bad]) -> pl.DataFrame:
    """Rejected records: line, reason and the raw text (invalid UTF-8 shown as ``\\xNN`` escapes)."""
    return pl.DataFrame(
        {
            LINE: [b.line for b in bad],
            REASON: [str(b.reason) for b in bad],
            RAW: [b.raw.decode("utf-8", "backslashreplace").rstrip("\r\n") for b in bad],
        },
        schema={LINE: pl.Int64(), REASON: pl.String(), RAW: pl.String()},
    )


# --- the public iterators ------------------------------------------------------------------------------------
@dataclass
class Chunk:
    rows: pl.DataFrame  # the wanted columns plus ``_line``
    rejects: pl.DataFrame  # records rejected while reading: ``_line``, ``_reason``, ``_raw``


def read_chunks(
    stream: IO[bytes],
    header: list[str],
    wanted: list[str],
    *,
    chunk_bytes: int,
    ints: frozenset[str] = frozenset(),
    first_line: int = 2,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> Iterator[Chunk]:
    """Rows of ``stream`` (positioned after the header) and the records rejected while reading them.

    ``header`` names every field of a record (unique names); ``wanted`` are the columns returned. Columns are text,
    except those in ``ints``, which are Int64 in every block whose values all parse as integers. Blank lines are
    skipped (not rows). Parsing runs one block ahead on a background thread (at most two blocks in memory).
    """
    cols = _Columns(list(header), list(wanted), frozenset(ints), max_record_bytes)
    out: queue.Queue[object] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            splitter = _Splitter(stream, chunk_bytes, max_record_bytes, first_line)
            bad: list[_Bad] = []
            for item in _guarded(iter(splitter), line_of=lambda: splitter.line):
                if isinstance(item, _Bad):
                    bad.append(item)
                    continue
                rows, found = _parse_block(item, cols)
                if not put(Chunk(rows, _rejects_frame(bad + found))):
                    return
                bad = []
            if bad and not put(Chunk(_empty_rows(cols), _rejects_frame(bad))):
                return
            out.put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            out.put(e)

    worker = threading.Thread(target=produce, name="csv-reader", daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Chunk)
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def _empty_rows(cols: _Columns) -> pl.DataFrame:
    return pl.DataFrame(schema={LINE: pl.Int64(), **{c: pl.String() for c in cols.wanted}})


def iter_chunks(
    stream: IO[bytes],
    header: list[str],
    wanted: list[str],
    *,
    chunk_bytes: int,
    ints: frozenset[str] = frozenset(),
    first_line: int = 2,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    on_reject: Callable[[pl.DataFrame], None] | None = None,
) -> Iterator[pl.DataFrame]:
    """The rows of :func:`read_chunks`. Rejected records go to ``on_reject``; without one, the first rejects the
    file (a caller that does not keep rejected rows must not lose them silently)."""
    for chunk in read_chunks(
        stream,
        header,
        wanted,
        chunk_bytes=chunk_bytes,
        ints=ints,
        first_line=first_line,
        max_record_bytes=max_record_bytes,
    ):
        if not chunk.rejects.is_empty():
            if on_reject is None:
                line, reason = chunk.rejects.select(LINE, REASON).row(0)
                raise FileRejected(Reason.UNREADABLE, f"line {line} cannot be read ({reason})", line=line)
            on_reject(chunk.rejects)
        if not chunk.rows.is_empty():
            yield chunk.rows
