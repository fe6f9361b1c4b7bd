"""RFC 4180 quotes in a byte buffer: which quotes open and close quoted fields, and which break the rules.

Used by :mod:`processor.records` (where records end) and :mod:`processor.parse` (which records are malformed). A
quote opens a quoted field only at the start of a field, and closes it only when followed by a delimiter, a line end
or a second quote (an escaped quote). Well-formed quotes alternate open/close, which numpy checks a window at a time;
only a quote that breaks the rules costs a Python step, so the work stays linear in the number of quotes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUOTE, COMMA, NL, CR = 34, 44, 10, 13
#: Bytes that may precede an opening quote (a field starts after them).
_FIELD_START = np.zeros(256, dtype=bool)
_FIELD_START[[COMMA, NL]] = True
#: Bytes that may follow a closing quote (the field ends there; a quote makes an escaped quote).
_FIELD_END = np.zeros(256, dtype=bool)
_FIELD_END[[COMMA, NL, CR, QUOTE]] = True


@dataclass
class QuoteState:
    """Where a scan of the quotes stands: positions are offsets in the scanned buffer."""

    inside: bool = False  # inside a quoted field
    field_open: int = -1  # the opening quote of the current (or last) quoted field
    last_close: int = -2  # the last closing quote: a quote right after it is an escaped quote, not a new field

    def shift(self, by: int) -> None:
        self.field_open -= by
        self.last_close -= by


@dataclass
class QuoteScan:
    bounds: np.ndarray  # opening and closing quotes of quoted fields, alternating (a field left open: its opener)
    strays: list[int]  # quotes that break the rules: their record is malformed
    stop: int  # quotes from this index on were not scanned (undecided at the end of the buffer, or a resync)
    resync: int | None = None  # opener of a multi-line quoted field closed by a stray quote: cut the record there


def scan_quotes(buf: bytes, arr: np.ndarray, q: np.ndarray, st: QuoteState) -> QuoteScan:
    """Follow the quotes ``q`` (ascending positions in ``buf``) from state ``st``, which is updated.

    A quote anywhere but at a field's start or end is kept as a literal and reported as a stray; a quoted field whose
    closing quote is followed by text is closed there (reported too), unless it spans lines: then its opening quote
    was the mistake, and the caller cuts the record at the end of the line where the field opened (``resync``).
    After a stray quote, windows start small and grow again.
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
            return QuoteScan(_concat(parts), strays, i)  # escaped or closing? the next byte is not read yet
        elif buf.find(b"\n", st.field_open, p) >= 0:
            return QuoteScan(_concat(parts), strays, i, resync=st.field_open)
        else:  # text after the closing quote: close the field there, the row is malformed
            parts.append(np.array([p], dtype=np.int64))
            st.inside, st.last_close = False, p
            strays.append(p)
        i += 1
        window = 64
    return QuoteScan(_concat(parts), strays, n)


def _valid_prefix(arr: np.ndarray, w: np.ndarray, st: QuoteState) -> int:
    """How many of the quotes ``w`` are well formed if they alternate open/close from state ``st``."""
    first = 0 if st.inside else 1  # index of the first closing quote
    opens, closes = w[1 - first :: 2], w[first::2]
    prev = arr[np.maximum(opens - 1, 0)]
    open_ok = _FIELD_START[prev] | (opens == 0)
    for j in np.flatnonzero(~open_ok & (prev == QUOTE)):  # rare: a quote right after a closing one (escaped)
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


def _advance(arr: np.ndarray, good: np.ndarray, st: QuoteState) -> None:
    """Update ``st`` past the well-formed quotes ``good`` (alternating open/close from ``st``)."""
    first = 0 if st.inside else 1
    opens, closes = good[1 - first :: 2], good[first::2]
    if closes.size:
        st.last_close = int(closes[-1])
    st.inside = st.inside != (good.size % 2 == 1)
    if st.inside:  # the field's own opening quote: skip quotes that only continue it after an escaped quote
        for o in opens[::-1].tolist():
            if o == 0 or arr[o - 1] != QUOTE:
                st.field_open = o
                break


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    out: np.ndarray = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return out


def inside(bounds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """True for each position (never a quote) that lies inside a quoted field."""
    within: np.ndarray = np.searchsorted(bounds, positions, side="right") % 2 == 1
    return within
