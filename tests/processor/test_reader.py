"""The streaming reader on its own: record boundaries, the record limit, blank lines, malformed records."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tracemalloc
from pathlib import Path
from typing import IO, cast

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import processor.duplicates as duplicates
import processor.records as records
from processor.duplicates import KeySpill
from processor.errors import ConfigError, FileRejected, Reason
from processor.ingest import ingest
from processor.quotes import QuoteState
from processor.reader import RAW_PREFIX_BYTES, read_chunks, read_header, read_header_line
from processor.schema import ORDERS
from processor.settings import Settings
from processor.stage import file_id_for

COLS = ["a", "b", "c"]


def read(
    data: bytes, chunk_bytes: int = 1 << 20, limit: int = 1 << 20
) -> tuple[list[tuple[object, ...]], list[tuple[int, str, str]]]:
    """(rows as (line, a, b, c), rejects as (line, reason, raw)) of a headerless three-column CSV."""
    rows: list[tuple[object, ...]] = []
    rejects: list[tuple[int, str, str]] = []
    chunks = read_chunks(io.BytesIO(data), COLS, COLS, chunk_bytes=chunk_bytes, max_record_bytes=limit, first_line=1)
    for chunk in chunks:
        rows += chunk.rows.rows()
        rejects += chunk.rejects.rows()
    return rows, rejects


class _Lines(io.RawIOBase):
    """A stream of ``head``, then ``size`` bytes of ``x`` (never materialised), then ``tail``."""

    def __init__(self, head: bytes, size: int, tail: bytes) -> None:
        self.parts: list[bytes | int] = [head, size, tail]
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        data = self._read(n if n >= 0 else 1 << 20)
        self.served += len(data)
        return data

    def _read(self, n: int) -> bytes:
        while self.parts:
            part = self.parts[0]
            if isinstance(part, bytes):
                if part:
                    out, self.parts[0] = part[:n], part[n:]
                    return out
            elif part > 0:
                take = min(n, part)
                self.parts[0] = part - take
                return b"x" * take
            self.parts.pop(0)
        return b""


TRICKY = (
    b'1,"a, b",c\n'
    b"\n"
    b'2,"multi\nline",c\r\n'
    b'3,"esc ""q""",c\n'
    b"   \n"
    b"4,short\n"
    b'5,stray " quote,c\n'
    b"6,b\xff,c\n"
    b'7,"x"y,c\n'
    b"8,b,c,d\n"
    b'9,"",c\n'
)


def test_rows_keep_their_physical_line_and_blank_lines_are_not_rows() -> None:
    rows, rejects = read(TRICKY)
    assert rows == [
        (1, "1", "a, b", "c"),
        (3, "2", "multi\nline", "c"),
        (5, "3", 'esc "q"', "c"),
        (12, "9", None, "c"),  # a quoted empty field is null, like an unquoted one
    ]
    assert rejects == [
        (7, "malformed_row", "4,short"),
        (8, "malformed_row", '5,stray " quote,c'),
        (9, "bad_encoding", "6,b\\xff,c"),
        (10, "malformed_row", '7,"x"y,c'),
        (11, "malformed_row", "8,b,c,d"),
    ]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_block_size_never_changes_what_is_read(chunk_bytes: int) -> None:
    expected = read(TRICKY)
    assert read(TRICKY, chunk_bytes=chunk_bytes) == expected


_RECORDS = st.sampled_from(
    [
        b"1,plain,c\n",
        b"2,also plain,c\n",
        b'3,"quoted, comma",c\n',
        b'4,"multi\nline\nfield",c\n',
        b'5,stray " quote,c\n',
        b'6,"never closed,c\n',
        b"7," + b"x" * 90 + b",c\n",  # over the limit the test sets
        b"\n",
        b"8,b,c,d\n",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(_RECORDS, max_size=40), chunk_bytes=st.integers(1, 120), tail=st.booleans())
def test_the_records_read_never_depend_on_how_the_stream_is_cut(
    parts: list[bytes], chunk_bytes: int, tail: bool
) -> None:
    # Reads that hold no quote take a shortcut (one copy of the bytes); reads with quotes, records over the limit and
    # a last line without its newline take the general scan: any mix of the two reads the same rows and rejects
    # the same lines.
    data = b"".join(parts) + (b"9,last,c" if tail else b"")
    rows, rejects = read(data, chunk_bytes=chunk_bytes, limit=64)
    whole_rows, whole_rejects = read(data, chunk_bytes=1 << 20, limit=64)
    assert rows == whole_rows
    # The same lines are rejected. (Not always for the same reason: a quoted field left open is too long when the
    # limit is reached before the stray quote that closes it is read, and an over-long record keeps the prefix
    # read by then.)
    assert [line for line, _, _ in rejects] == [line for line, _, _ in whole_rejects]


def test_a_stray_quote_costs_one_row_and_the_rest_is_read() -> None:
    data = b"1,a,b\n" + b'2,Acme 55" TV,b\n' + b"".join(b"%d,a,b\n" % i for i in range(3, 1000))
    rows, rejects = read(data, chunk_bytes=4096)
    assert rejects == [(2, "malformed_row", '2,Acme 55" TV,b')]
    assert len(rows) == 998 and rows[-1][0] == 999


def test_record_scan_is_linear_behind_a_quote_that_never_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned = 0
    scan = records.Splitter._scan

    def counting(buf: bytes, done: int, st: QuoteState) -> tuple[int, int | None, int | None]:
        nonlocal scanned
        scanned += len(buf) - done
        return scan(buf, done, st)

    monkeypatch.setattr(records.Splitter, "_scan", staticmethod(counting))
    data = b'1,"never closed,b\n' + b"".join(b"%d,a,b\n" % i for i in range(2, 100_000))
    rows, rejects = read(data, chunk_bytes=4096, limit=64 << 10)
    assert rejects[0][:2] == (1, "record_too_long")
    assert len(rows) == 99_998
    assert scanned <= 3 * len(data)  # each byte once, plus one rescan of at most the limit


def test_unclosed_quote_at_the_limit_is_cut_at_its_line_and_reading_resumes_after_it() -> None:
    data = b"1,a,b\n" + b'2,"open,b\n' + b"".join(b"%d,a,b\n" % i for i in range(3, 30_000))
    rows, rejects = read(data, chunk_bytes=1 << 16, limit=1 << 16)
    assert rejects == [(2, "record_too_long", '2,"open,b')]
    assert [r[0] for r in rows[:3]] == [1, 3, 4]
    assert len(rows) == 29_998


def test_unclosed_quote_at_the_end_of_the_file_is_a_malformed_row() -> None:
    rows, rejects = read(b'1,a,b\n2,"open,b\n3,a,b\n')
    assert rejects == [(2, "malformed_row", '2,"open,b')]
    assert [r[0] for r in rows] == [1, 3]


def test_multiline_field_closed_by_a_stray_quote_rejects_its_lines_not_the_rows_after() -> None:
    rows, rejects = read(b'1,"a\nb"x,c\n3,a,b\n4,"q",r\n')
    assert rejects == [(1, "malformed_row", '1,"a'), (2, "malformed_row", 'b"x,c')]
    assert [r[0] for r in rows] == [3, 4]


def test_over_long_record_is_skipped_without_ever_being_held_whole() -> None:
    stream = _Lines(b"1,a,b\n2,", 200 << 20, b"\n3,a,b\n")
    tracemalloc.start()
    try:
        chunks = list(
            read_chunks(
                io.BufferedReader(stream, 1 << 20),
                COLS,
                COLS,
                chunk_bytes=1 << 20,
                max_record_bytes=64 << 10,
                first_line=1,
            )
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the 200 MB line would need 200 MB
    rows = pl.concat([c.rows for c in chunks])
    rejects = pl.concat([c.rejects for c in chunks])
    assert rows.get_column("_line").to_list() == [1, 3]
    assert rejects.select("_line", "_reason").rows() == [(2, "record_too_long")]
    assert rejects.get_column("_raw").item() == "2," + "x" * (RAW_PREFIX_BYTES - 2)


def test_long_record_inside_one_block_is_rejected_too() -> None:
    rows, rejects = read(b"1,a,b\n2,a," + b"y" * 5000 + b"\n3,a,b\n", chunk_bytes=1 << 20, limit=1000)
    assert [(r[0], r[1]) for r in rejects] == [(2, "record_too_long")]
    assert [r[0] for r in rows] == [1, 3]


def test_header_field_over_the_csv_field_limit_rejects_the_file_as_unreadable() -> None:
    with pytest.raises(FileRejected) as e:
        read_header(io.BytesIO(b"order_id," + b"x" * 200_000 + b"\n1,2\n"))
    assert e.value.reason is Reason.UNREADABLE
    assert "header row is not valid CSV" in e.value.message


def test_header_longer_than_the_record_limit_is_rejected_without_reading_it_whole() -> None:
    raw = _Lines(b"order_id,", 50 << 20, b"\n")
    with pytest.raises(FileRejected) as e:
        read_header(io.BufferedReader(raw, 1 << 16), max_bytes=1 << 20)
    assert e.value.reason is Reason.UNREADABLE and "longer than the record limit (1024 KiB)" in e.value.message
    assert raw.served < 2 << 20  # the rest of the 50 MB line was never read


def test_blank_lines_before_the_header_are_skipped_and_counted() -> None:
    names, line = read_header_line(io.BytesIO(b"\n  \r\n\xef\xbb\xbf a ,B\n1,2\n"))
    assert (names, line) == (["\ufeff a", "B"], 3)  # a byte-order mark only counts at the start of the file
    names, line = read_header_line(io.BytesIO(b"\xef\xbb\xbf a ,B\n"))
    assert (names, line) == (["a", "B"], 1)


# --- wiring: settings, ingest, file ids -------------------------------------------------------------------------
def test_record_limit_is_a_setting_in_kib_with_a_1024_default() -> None:
    assert Settings.load(env={}).max_record_kb == 1024
    assert Settings.load(env={"SHOPKPI_MAX_RECORD_KB": "64"}).max_record_kb == 64
    with pytest.raises(ConfigError):
        Settings.load(env={"SHOPKPI_MAX_RECORD_KB": "0"})


def test_ingest_applies_the_record_limit_it_is_given(tmp_path: Path) -> None:
    data = b"order_id,user_id,status,created_at,num_of_item\n1,2,complete,2025-03-01T00:00:00,1\n"
    data += b"2,2,complete,2025-03-01T00:00:00," + b"1" * 3000 + b"\n"
    out = ingest(
        io.BytesIO(data), ORDERS, tmp_path, buckets=1, chunk_bytes=1 << 20, max_invalid_share=1.0, max_record_bytes=2048
    )
    assert out.rejects_by_reason == {"record_too_long": 1} and out.valid_rows == 1


def _orders(n: int) -> bytes:
    rows = (f"{i},{i % 97},complete,2025-03-01T00:00:{i % 60:02d},{1 + i % 3}\n" for i in range(1, n + 1))
    return b"order_id,user_id,status,created_at,num_of_item\n" + "".join(rows).encode()


def test_a_file_of_many_chunks_stages_every_valid_row_once_whatever_the_writer_lags(tmp_path: Path) -> None:
    # 4 KB chunks: hundreds of chunks, many more than the writer may have queued or held at once.
    n = 20_000
    out = ingest(io.BytesIO(_orders(n)), ORDERS, tmp_path, buckets=8, chunk_bytes=1 << 12, max_invalid_share=0.0)
    staged = pl.read_parquet(out.segment)
    assert out.valid_rows == staged.height == n
    assert staged.get_column("order_id").sort().to_list() == list(range(1, n + 1))
    assert (staged.get_column("_line") == staged.get_column("order_id") + 1).all()
    # the writes kept the chunks' order: each bucket's rows, read in file order, ascend by line
    steps = staged.group_by("_b").agg(pl.col("_line").diff().drop_nulls().min().alias("least"))
    assert steps.height == 8 and (steps.get_column("least") > 0).all()


def test_a_failed_segment_write_fails_the_file_rather_than_losing_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    calls = 0
    original = pq.ParquetWriter.write_table

    def failing(self: pq.ParquetWriter, table: object, *args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")
        original(self, table, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(OSError, match="No space left"):
        ingest(io.BytesIO(_orders(20_000)), ORDERS, tmp_path, buckets=8, chunk_bytes=1 << 12, max_invalid_share=0.0)


def test_file_id_of_a_local_path_that_is_not_utf8_is_stable_and_printable() -> None:
    source = os.fsdecode(b"/data/orders_\xff.csv")  # how Python hands such a name over
    fid = file_id_for(source, "10:20")
    assert fid == file_id_for(source, "10:20")
    assert fid.startswith("orders__-")
    fid.encode("utf-8")  # usable in keys and JSON
    digest = hashlib.sha256(b"/data/orders_\xff.csv\x0010:20").hexdigest()[:16]
    assert fid.endswith(digest)  # the digest of the name's real bytes


def test_file_id_of_a_utf8_name_is_unchanged() -> None:
    digest = hashlib.sha256("s3://b/incoming/orders/ü.csv\0etag".encode()).hexdigest()[:16]
    assert file_id_for("s3://b/incoming/orders/ü.csv", "etag") == f"ü-{digest}"


# --- duplicates in bounded memory -------------------------------------------------------------------------------
def test_duplicate_lines_are_exact_when_partitions_are_split_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(duplicates, "_PART_KEYS", 16)  # force the second and third levels of partitioning
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 300, size=4000)
    lines = np.arange(2, 4002)
    spill = KeySpill(tmp_path / "spill")
    for lo in range(0, 4000, 500):  # one key at most once per "chunk", as ingest adds them
        k, first = np.unique(keys[lo : lo + 500], return_index=True)
        spill.add(k, lines[lo : lo + 500][first])
    seen: set[int] = set()
    expected = []
    for lo in range(0, 4000, 500):
        k, first = np.unique(keys[lo : lo + 500], return_index=True)
        for key, line in sorted(zip(k.tolist(), lines[lo : lo + 500][first].tolist(), strict=True), key=lambda x: x[1]):
            if key in seen:
                expected.append(line)
            seen.add(key)
    assert spill.duplicate_lines().tolist() == sorted(expected)


def test_repeated_rows_in_one_chunk_are_rejected_without_reaching_the_spill(tmp_path: Path) -> None:
    header = b"order_id,user_id,status,created_at,num_of_item\n"
    data = header + b"7,2,complete,2025-03-01T00:00:00,1\n" * 5000 + b"8,2,complete,2025-03-01T00:00:00,1\n"
    out = ingest(io.BytesIO(data), ORDERS, tmp_path, buckets=1, chunk_bytes=1 << 20, max_invalid_share=1.0)
    assert out.rejects_by_reason == {"duplicate_key": 4999} and out.valid_rows == 2
    assert len(out.samples) == 5  # a few samples per reason, not the rows
    lines = pl.read_csv(out.rejects, infer_schema=False).get_column("_line").cast(pl.Int64)
    assert lines.min() == 3 and lines.max() == 5001


def test_gzip_bomb_of_one_repeated_row_reports_every_copy(tmp_path: Path) -> None:
    header = b"order_id,user_id,status,created_at,num_of_item\n"
    path = tmp_path / "orders.csv.gz"
    path.write_bytes(gzip.compress(header + b"7,2,complete,2025-03-01T00:00:00,1\n" * 100_000))
    with gzip.open(path) as stream, pytest.raises(FileRejected) as e:
        ingest(cast(IO[bytes], stream), ORDERS, tmp_path / "w", buckets=1, chunk_bytes=1 << 16, max_invalid_share=0.05)
    assert e.value.reason is Reason.TOO_MANY_INVALID
    assert e.value.context["rejects_by_reason"] == {"duplicate_key": 99_999}


@given(
    rows=st.lists(st.sampled_from(["1,2,3", '"4,4",5,6', "7,,9", '8,"x\ny",0']), min_size=1, max_size=30),
    chunk_bytes=st.integers(4, 40),
)
def test_a_block_is_marked_unquoted_only_when_it_holds_no_quote(rows: list[str], chunk_bytes: int) -> None:
    # The parser skips its own search for a quote in a block marked unquoted: a quote in the record carried over
    # from the previous read must clear the mark.
    data = "".join(r + "\n" for r in rows).encode()
    splitter = records.Splitter(io.BytesIO(data), chunk_bytes, 1 << 20, first_line=1)
    blocks = [b for b in splitter if isinstance(b, records.Block)]
    assert b"".join(b.data for b in blocks) == data
    for b in blocks:
        if b.unquoted:
            assert b'"' not in b.data
    if b'"' not in data:  # read whole: one block, known to hold no quote
        (whole,) = records.Splitter(io.BytesIO(data), 1 << 20, 1 << 20, first_line=1)
        assert isinstance(whole, records.Block) and whole.unquoted
