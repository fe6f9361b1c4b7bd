"""Fan-out of one big file: cut it into byte ranges at record boundaries, validate the ranges in parallel tasks,
then combine what they staged into the one outcome, report, rejected rows and staged segment of the whole file.

Why it is exact:

* **Cuts.** A range starts right after a newline that no quote character precedes within the record limit
  (``SHOPKPI_MAX_RECORD_KB``) plus a margin. Any record in progress there began either within that quote-free
  window (so it is unquoted and ended at that newline) or earlier (so it is longer than the limit, and the reader
  ends such a record at the end of a line): the reader is at a record boundary, whatever came before. A file
  where no such newline is found near a cut (quotes everywhere) is simply cut less often, or validated whole.
  A gzip file cannot be read from the middle and is always validated whole.
* **Lines.** Each part counts the newlines of its own bytes; part ``k``'s line numbers are shifted by the newlines
  of the parts before it, so every line number is the file's physical line.
* **File rules.** Parts are validated with no invalid-row threshold. The combine step finds the keys that repeat
  a key of an earlier part (``duplicate_key``: the first occurrence in the file wins, as when reading it whole),
  then applies the file-level rules to the totals: no data rows, or too many invalid rows.

The sample rows of the report are the first of each reason by line, where a file read whole keeps the first it
met; both are a few rows for a person to look at, and everything else is identical (``tests/processor/
test_split.py`` compares staged rows, rejected rows and reports of 1 and N parts).
"""

from __future__ import annotations

import io
import itertools
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import msgspec
import numpy as np

from processor.landing import ChunkStream, Landing
from processor.schema import is_gzip
from processor.settings import Settings

#: Beyond the record limit, how far before a cut the bytes must be free of quotes.
MARGIN = 4 << 10


class Part(msgspec.Struct, frozen=True, kw_only=True):
    """One byte range of a split file, as the workflow passes it to ``validate-part``."""

    part: int  # 0-based
    start: int  # first byte of the part's records (0 for the first part: it also holds the header)
    end: int  # one past its last byte


class Split(msgspec.Struct, frozen=True, kw_only=True):
    """A file cut into parts: what ``validate`` answers for a big file and ``combine`` takes back."""

    file_id: str
    source: str
    arrival: str  # the file's arrival time (ISO-8601 UTC): every part stages with it
    header_end: int  # the header line is bytes [0, header_end): a later part reads them before its own
    parts: list[Part]


class PartJob(msgspec.Struct, frozen=True, kw_only=True):
    """What ``validate-part`` is given: the file (as split) and its one part."""

    file_id: str
    source: str
    arrival: str
    header_end: int
    part: Part


class PartKept(msgspec.Struct, kw_only=True):
    """What a part leaves for the combine step (in the staging store, beside its files)."""

    report: dict[str, Any]  # the part's validation report
    newlines: int  # newlines of the part's own bytes
    segment: str | None  # staging keys of its staged rows and its rejected rows
    rejects: str | None


def plan(landing: Landing, source: str, settings: Settings) -> tuple[int, list[int]] | None:
    """(header end, cut offsets) for a file worth splitting, else None (small, gzip, or no clean cut found)."""
    if settings.split_mb <= 0 or settings.max_parts < 2 or is_gzip(source):
        return None  # off (the default), or a file that cannot be read from the middle
    size = landing.size(source)
    if size <= settings.split_mb * (1 << 20):
        return None
    window = (settings.max_record_kb << 10) + MARGIN
    head = b"".join(landing.chunks(source, 0, min(size, window)))
    header_end = head.find(b"\n") + 1
    if header_end <= 0 or head[:header_end].count(b'"') % 2:
        return None  # no header line within the record limit, or a header whose quotes run past its line
    n = min(settings.max_parts, math.ceil(size / (settings.part_mb * (1 << 20))))
    cuts: list[int] = []
    for k in range(1, n):
        nominal = k * size // n
        if nominal - window < max(header_end, cuts[-1] if cuts else 0):
            continue
        lo, hi = nominal - window, min(size, nominal + 2 * window)  # room to step past a quote near the cut
        cut = clean_cut(b"".join(landing.chunks(source, lo, hi)), lo, nominal, window)
        if cut is not None and cut < size and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    return (header_end, cuts) if cuts else None


def clean_cut(data: bytes, offset: int, nominal: int, window: int) -> int | None:
    """The first offset at or after ``nominal`` that follows a newline with no quote in the ``window`` bytes
    before it; ``data`` holds the file's bytes from ``offset`` on (at least ``window`` before ``nominal``)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    starts = np.flatnonzero(arr == 0x0A) + 1  # record starts: just after a newline (relative to ``offset``)
    starts = starts[starts >= nominal - offset]
    if not starts.size:
        return None
    quotes = np.flatnonzero(arr == 0x22)
    if not quotes.size:
        return int(offset + starts[0])
    before = np.searchsorted(quotes, starts) - 1  # the last quote before each candidate
    last = np.where(before >= 0, quotes[np.maximum(before, 0)], -(1 << 62))
    ok = np.flatnonzero(last < starts - window)
    return int(offset + starts[ok[0]]) if ok.size else None


def parts_of(header_end: int, cuts: list[int], size: int) -> list[Part]:
    bounds = [0, *cuts, size]
    return [Part(part=i, start=a, end=b) for i, (a, b) in enumerate(itertools.pairwise(bounds))]


class PartStream:
    """The bytes a part's validation reads: the file's header line, then the part's own range (the first part
    is its range alone, header included). Counts the newlines of the part's own bytes as they stream by."""

    def __init__(self, landing: Landing, source: str, header_end: int, part: Part) -> None:
        self.newlines = 0
        own = landing.chunks(source, part.start, part.end)
        header: Iterator[bytes] = iter(()) if part.start == 0 else landing.chunks(source, 0, header_end)
        self._chunks = itertools.chain(header, self._counted(own))

    def _counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.newlines += chunk.count(b"\n")
            yield chunk

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        stream = io.BufferedReader(ChunkStream(self._chunks), 8 << 20)
        try:
            yield stream
        finally:
            stream.close()


def line_shifts(split: Split, newlines: list[int]) -> list[int]:
    """What to add to each part's line numbers to make them the file's: a later part's line 2 (its first own
    line, after the header) is the line after every newline of the parts before it."""
    before = [0, *itertools.accumulate(newlines)]
    return [0] + [before[k] - 1 for k in range(1, len(split.parts))]


def first_samples(samples: list[list[dict[str, Any]]], shifts: list[int], per_reason: int) -> list[dict[str, Any]]:
    """The first ``per_reason`` sample rows of each reason, by line, from the parts' samples."""
    found: list[dict[str, Any]] = []
    for part_samples, shift in zip(samples, shifts, strict=True):
        found += [{**s, "_line": int(s["_line"]) + shift} for s in part_samples]
    kept: Counter[str] = Counter()
    out = []
    for s in sorted(found, key=lambda s: int(s["_line"])):
        if kept[s["_reason"]] < per_reason:
            kept[s["_reason"]] += 1
            out.append(s)
    return out


def part_key(file_id: str, part: int, what: str) -> str:
    """Where a part keeps what it made, in the staging store (removed by the combine step)."""
    return f"parts/{file_id}/{part}.{what}"


__all__ = [
    "Part",
    "PartJob",
    "PartKept",
    "PartStream",
    "Split",
    "clean_cut",
    "first_samples",
    "line_shifts",
    "part_key",
    "parts_of",
    "plan",
]
