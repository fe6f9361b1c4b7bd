"""Streaming CSV reader: any binary stream (a local file, a gzip stream, an S3 response body) -> chunks of rows.

Why not ``pl.scan_csv``: it memory-maps local files (resident memory grows with the file) and cannot read a gzip or
network stream without first decompressing or downloading it whole. Here memory is bounded by the chunk size, the
same code reads every source, and a background thread parses the next chunk (polars, multi-threaded) while the
caller validates the current one.

Chunks are cut at record boundaries: the last newline that is outside a quoted field (an even number of quote
characters before it), so a quoted field with an embedded newline is never split.
"""

from __future__ import annotations

import csv
import gzip
import io
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import IO

import polars as pl

from processor.errors import FileRejected, Reason

LINE = "_line"
_DONE = object()


def read_header(stream: IO[bytes]) -> list[str]:
    """The header row's column names (stripped). Consumes the first line of ``stream``."""
    first = stream.readline()
    if not first.strip():
        raise FileRejected(Reason.EMPTY_FILE, "the file is empty (no header row)")
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FileRejected(Reason.UNREADABLE, f"header is not UTF-8: {e}", line=1) from e
    return [h.strip() for h in next(csv.reader(io.StringIO(text)))]


def _record_boundary(buf: bytes) -> int:
    """Index just past the last newline that ends a record (0 when no complete record is in ``buf``)."""
    end = buf.rfind(b"\n")
    while end >= 0:
        if buf.count(b'"', 0, end) % 2 == 0:
            return end + 1
        end = buf.rfind(b"\n", 0, end)
    return 0


def _blocks(stream: IO[bytes], chunk_bytes: int) -> Iterator[bytes]:
    """Blocks of whole records, each about ``chunk_bytes`` long."""
    rest = b""
    while True:
        data = stream.read(chunk_bytes)
        if not data:
            if rest.strip():
                yield rest if rest.endswith(b"\n") else rest + b"\n"
            return
        buf = rest + data
        cut = _record_boundary(buf)
        if cut == 0:  # one record longer than a block: keep reading
            rest = buf
            continue
        rest = buf[cut:]
        yield buf[:cut]


def _guarded(blocks: Iterator[bytes], line_of: Callable[[], int]) -> Iterator[bytes]:
    """Decompression errors (a corrupt or truncated gzip) reject the file as unreadable."""
    try:
        yield from blocks
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        line = line_of()
        raise FileRejected(Reason.UNREADABLE, f"cannot decompress near line {line}: {e}", line=line) from e


def _parse(block: bytes, header: list[str], wanted: list[str], ints: frozenset[str], first_line: int) -> pl.DataFrame:
    """Parse a block: integers typed by the CSV reader when the whole block allows it, else everything as text.

    Parsing integers directly is faster than text followed by a cast; a single bad value makes the typed parse
    fail, and that block falls back to text so validation can name the row and column.
    """
    options: dict[str, object] = {
        "has_header": False,
        "truncate_ragged_lines": False,  # a row with extra fields is malformed: the file is unreadable
        "encoding": "utf8",
        "raise_if_empty": False,
    }
    try:
        typed = {h: (pl.Int64 if h in ints else pl.String) for h in header}
        df = pl.read_csv(block, schema=typed, **options)  # type: ignore[arg-type]
    except pl.exceptions.ComputeError:
        df = pl.read_csv(block, new_columns=header, infer_schema=False, **options)  # type: ignore[arg-type]
    return df.select(wanted).with_row_index(LINE, offset=first_line).with_columns(pl.col(LINE).cast(pl.Int64))


def iter_chunks(
    stream: IO[bytes],
    header: list[str],
    wanted: list[str],
    *,
    chunk_bytes: int,
    ints: frozenset[str] = frozenset(),
    first_line: int = 2,
) -> Iterator[pl.DataFrame]:
    """Rows of ``stream`` (positioned after the header): the ``wanted`` columns plus ``_line``.

    Columns are text, except those in ``ints``, which are Int64 in every block whose values all parse as integers.

    ``_line`` is the row's line in the file when no field holds a newline (the header is line 1); in general it is
    the record number plus one. Parsing runs one block ahead on a background thread (at most two blocks in memory).
    A block that cannot be parsed raises :class:`FileRejected` (unreadable) naming its first line.
    """
    out: queue.Queue[object] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        line = first_line
        try:
            for block in _guarded(_blocks(stream, chunk_bytes), line_of=lambda: line):  # noqa: B023 (current line)
                try:
                    df = _parse(block, header, wanted, ints, line)
                except (pl.exceptions.PolarsError, UnicodeDecodeError) as e:
                    raise FileRejected(
                        Reason.UNREADABLE, f"cannot parse CSV in the block starting at line {line}: {e}", line=line
                    ) from e
                line += df.height
                while not stop.is_set():
                    try:
                        out.put(df, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
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
            assert isinstance(item, pl.DataFrame)
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)
