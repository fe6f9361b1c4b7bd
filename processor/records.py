"""Record boundaries: a byte stream -> blocks of whole CSV records, and the records rejected on the way.

A record ends at a newline outside a quoted field (:mod:`processor.quotes` follows the quotes). The
:class:`Splitter` hands out blocks of about ``chunk_bytes`` of whole records, each with the file line it starts at,
for :mod:`processor.parse` to split into fields. A record longer than the record limit is rejected without ever
being held whole; a quoted field that never closes properly is cut back to the line where it opened, so one stray
quote costs one row, not the rest of the file. Every byte is looked at a bounded number of times whatever the input.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from processor.errors import FileRejected, Reason
from processor.quotes import NL, QUOTE, QuoteState, scan_quotes

#: Bytes of a too-long record kept in its rejected row (the record itself is skipped, never held whole).
RAW_PREFIX_BYTES = 4096


@dataclass
class Block:
    data: bytes  # whole records, ending with a newline
    first_line: int
    newlines: int  # physical lines in ``data``
    unquoted: bool = False  # known to hold no quote (False: not known either way)


@dataclass
class Bad:
    """A record rejected while reading: the line it starts at, why, and its raw bytes (a prefix if too long)."""

    line: int
    reason: Reason
    raw: bytes


#: Bytes compared per numpy call when counting: a comparison's temporary stays in the cache, where one the size of
#: a whole block (megabytes) is fresh memory each time, paid for in page faults.
_COUNT_SLICE = 1 << 18


def count_byte(buf: bytes, byte: int, start: int = 0, end: int | None = None) -> int:
    """How many times ``byte`` occurs in ``buf[start:end]`` (numpy: about three times faster than ``bytes.count``)."""
    arr = np.frombuffer(buf, dtype=np.uint8)[start:end]
    hits = np.empty(min(arr.size, _COUNT_SLICE), dtype=bool)
    n = 0
    for at in range(0, arr.size, _COUNT_SLICE):
        part = arr[at : at + _COUNT_SLICE]
        np.equal(part, byte, out=hits[: part.size])
        n += int(np.count_nonzero(hits[: part.size]))
    return n


def count_newlines(buf: bytes, start: int, end: int) -> int:
    return count_byte(buf, NL, start, end)


class Splitter:
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

    def __iter__(self) -> Iterator[Block | Bad]:
        buf = b""
        base = 0  # start of the record in progress: everything before it was handed out
        done = 0  # quotes before this offset were scanned
        st = QuoteState()
        eof = False
        while True:
            if not eof:
                data = self.stream.read(self.chunk)
                if (block := self._whole(buf, base, done, st, data)) is not None:
                    # The common case, one copy of the bytes read (not two: joined to the record in progress, then
                    # cut at the last record end): the record in progress now ends at the last newline read.
                    yield block
                    self.line += block.newlines
                    st.shift(len(buf))  # offsets now count from the start of ``data``
                    buf, base, done = data, data.rfind(b"\n") + 1, len(data)
                    continue
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
                    newlines = count_newlines(buf, base, last_end)
                    yield Block(buf[base:last_end], self.line, newlines)
                    self.line += newlines
                    base = last_end
                if resync is not None:
                    cut = buf.find(b"\n", resync) + 1
                    yield self._bad(buf, base, cut, Reason.MALFORMED_ROW)
                    base = done = cut
                    st = QuoteState()
                    continue
                done = stop
                pending = len(buf) - base
                if eof and pending and st.inside:  # the file ended inside a quoted field
                    cut = buf.find(b"\n", st.field_open) + 1
                    yield self._bad(buf, base, cut, Reason.MALFORMED_ROW)
                    base = done = cut
                    st = QuoteState()
                    continue
                if pending > self.limit:
                    cut = buf.find(b"\n", st.field_open) + 1 if st.inside else 0
                    yield self._bad(buf, base, cut or len(buf), Reason.RECORD_TOO_LONG)
                    st = QuoteState()
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

    def _whole(self, buf: bytes, base: int, done: int, st: QuoteState, data: bytes) -> Block | None:
        """The block that ``buf[base:]`` and ``data`` make up to the last newline of ``data``, when that newline
        ends a record for sure: no quoted field is open, ``buf`` was scanned to its end, and ``data`` holds no quote
        (so none of its newlines is inside a field). None otherwise (and when what follows is over the limit), for
        the general scan."""
        if st.inside or done < len(buf) or (nl := data.rfind(b"\n")) < 0 or len(data) - nl - 1 > self.limit:
            return None
        if data.find(b'"') >= 0:
            return None
        whole = b"".join((memoryview(buf)[base:], memoryview(data)[: nl + 1]))
        # The record in progress may hold a quoted field; if not, the block is known to hold no quote, and the
        # parser need not search it again.
        unquoted = buf.find(b'"', base) < 0
        return Block(whole, self.line, count_newlines(whole, 0, len(whole)), unquoted)

    def _bad(self, buf: bytes, start: int, end: int, reason: Reason) -> Bad:
        keep = end if reason is Reason.MALFORMED_ROW and end - start <= self.limit else start + RAW_PREFIX_BYTES
        bad = Bad(self.line, reason, buf[start : min(end, keep)])
        self.line += count_newlines(buf, start, end)
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
    def _scan(buf: bytes, done: int, st: QuoteState) -> tuple[int, int | None, int | None]:
        """Scan ``buf[done:]``: (offset scanned up to, end of the last whole record in it, resync quote)."""
        if not st.inside and buf.find(b'"', done) < 0:
            nl = buf.rfind(b"\n", done)
            return len(buf), (nl + 1 if nl >= 0 else None), None
        arr = np.frombuffer(buf, dtype=np.uint8)
        q = np.flatnonzero(arr[done:] == QUOTE) + done
        scan = scan_quotes(buf, arr, q, st)
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


def guarded(items: Iterator[Block | Bad], line_of: Callable[[], int]) -> Iterator[Block | Bad]:
    """Decompression errors (a corrupt or truncated gzip) reject the file as unreadable."""
    try:
        yield from items
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        line = line_of()
        raise FileRejected(Reason.UNREADABLE, f"cannot decompress near line {line}: {e}", line=line) from e
