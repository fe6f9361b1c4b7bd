"""Streaming CSV reader: any binary stream (a local file, a gzip stream, an S3 response body) -> chunks of rows.

Why not ``pl.scan_csv``: it memory-maps local files (resident memory grows with the file) and cannot read a gzip or
network stream without first decompressing or downloading it whole. Here memory is bounded by the chunk size and the
record limit, the same code reads every source, and a background thread parses the next chunk (polars,
multi-threaded) while the caller validates the current one.

This module is the public face: the header (:func:`read_header_line`) and the chunk iterators. The stages behind it,
each linear in the input:

* :mod:`processor.records` cuts the byte stream into blocks of whole records (following quotes with
  :mod:`processor.quotes`) and rejects over-long and unclosed records;
* :mod:`processor.parse` splits a block into fields with polars (a typed fast path, a string path for the rest).

Rows carry ``_line``, the physical line of the file where the record starts (the header is line 1; blank lines are
skipped but still counted as lines). Records the reader rejects come out beside the rows, with their line, reason and
raw text (see docs/validation.md).
"""

from __future__ import annotations

import codecs
import csv
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import polars as pl

from processor.errors import FileRejected, Reason
from processor.parse import LINE, Columns, parse_block, text_rows
from processor.records import RAW_PREFIX_BYTES, Bad, Block, Splitter, guarded

REASON = "_reason"
RAW = "_raw"
#: Default record limit (``SHOPKPI_MAX_RECORD_KB``): no valid row of the contract comes near it.
DEFAULT_MAX_RECORD_BYTES = 1 << 20
_DONE = object()

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "LINE",
    "RAW",
    "RAW_PREFIX_BYTES",
    "REASON",
    "Chunk",
    "read_chunks",
    "read_header",
    "read_header_line",
]


# --- header --------------------------------------------------------------------------------------------------
def read_header(stream: IO[bytes], *, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[str]:
    """The header row's column names (stripped). Consumes the stream up to the end of the header line."""
    return read_header_line(stream, max_bytes=max_bytes)[0]


def read_header_line(stream: IO[bytes], *, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> tuple[list[str], int]:
    """The header's column names (stripped) and its line number: blank lines before it are skipped.

    The header is read in bounded memory: a first line longer than ``max_bytes`` rejects the file.
    """
    first, line = _first_line(stream, max_bytes)
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


def _first_line(stream: IO[bytes], max_bytes: int) -> tuple[bytes, int]:
    """The first non-blank line (without a byte-order mark) and its line number."""
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
            return first, line


# --- chunks --------------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    rows: pl.DataFrame  # the wanted columns plus ``_line``
    rejects: pl.DataFrame  # records rejected while reading: ``_line``, ``_reason``, ``_raw``
    typed_from: tuple[Block, Columns] | None = None  # integer columns typed by the CSV reader: their block

    def text(self) -> pl.DataFrame:
        """``rows`` with every column as written in the file (text), for rows that are rejected after all."""
        return self.rows if self.typed_from is None else text_rows(*self.typed_from)


def _rejects_frame(bad: list[Bad]) -> pl.DataFrame:
    """Rejected records: line, reason and the raw text (invalid UTF-8 shown as ``\\xNN`` escapes)."""
    return pl.DataFrame(
        {
            LINE: [b.line for b in bad],
            REASON: [str(b.reason) for b in bad],
            RAW: [b.raw.decode("utf-8", "backslashreplace").rstrip("\r\n") for b in bad],
        },
        schema={LINE: pl.Int64(), REASON: pl.String(), RAW: pl.String()},
    )


def _empty_rows(cols: Columns) -> pl.DataFrame:
    return pl.DataFrame(schema={LINE: pl.Int64(), **{c: pl.String() for c in cols.wanted}})


def _chunks(stream: IO[bytes], cols: Columns, chunk_bytes: int, first_line: int) -> Iterator[Chunk]:
    """Parse each block of records as it is cut; records rejected by the splitter go with the next block's."""
    splitter = Splitter(stream, chunk_bytes, cols.limit, first_line)
    bad: list[Bad] = []
    for item in guarded(iter(splitter), line_of=lambda: splitter.line):
        if isinstance(item, Bad):
            bad.append(item)
            continue
        parsed = parse_block(item, cols)
        yield Chunk(parsed.rows, _rejects_frame(bad + parsed.bad), (item, cols) if parsed.typed else None)
        bad = []
    if bad:
        yield Chunk(_empty_rows(cols), _rejects_frame(bad))


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
    except those in ``ints``, which are Int64 in every block whose values all parse as integers (the chunk then
    keeps its block: :meth:`Chunk.text` has them as written). Blank lines are skipped (not rows). Parsing runs one
    block ahead on a background thread (at most two blocks in memory).
    """
    cols = Columns(list(header), list(wanted), frozenset(ints), max_record_bytes)
    out: queue.Queue[object] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in _chunks(stream, cols, chunk_bytes, first_line):
                if not _put(out, chunk, stop):
                    return
            out.put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            out.put(e)

    worker = threading.Thread(target=produce, name="csv-reader", daemon=True)
    worker.start()
    try:
        while (item := out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Chunk)
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def _put(out: queue.Queue[object], item: object, stop: threading.Event) -> bool:
    """Hand ``item`` to the consumer; False when the consumer stopped listening."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
