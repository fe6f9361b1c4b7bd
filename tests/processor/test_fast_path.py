"""The typed fast path and the string path stage the same rows and reject the same rows, for the same reasons.

The reader parses a clean block with its integer columns typed by polars' CSV reader (:mod:`processor.parse`); any
other block goes through the string path. Which path a block takes must never change what is staged or rejected,
nor how a rejected row's values are shown: these tests run each input both ways and compare the outputs.
"""

from __future__ import annotations

import io
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import processor.parse as parse
from processor.ingest import IngestOutput, ingest
from processor.records import Block
from processor.schema import ORDERS

HEADER = "order_id,user_id,status,created_at,returned_at,shipped_at,delivered_at,num_of_item\n"

INTS = st.one_of(
    st.integers(1, 60).map(str),
    st.sampled_from(["007", "+5", "-0", " 5", "\t6", "-3", "abc", "", "99999999999999999999", "5.0"]),
)
STATUSES = st.sampled_from(["complete", "shipped", "Returned", "CANCELLED", "lost", ""])
TIMESTAMPS = st.sampled_from(
    [
        "2025-03-01T10:00:00",
        "2025-03-02T11:30:00",
        "2025-03-01 10:00:00.25",
        "2025-03-02T08:00:00Z",
        "2025-03-01T23:00:00-05:00",
        "2025-02-30T00:00:00",
        "yesterday",
        "",
    ]
)
ROW = st.tuples(INTS, INTS, STATUSES, TIMESTAMPS, TIMESTAMPS, TIMESTAMPS, TIMESTAMPS, INTS).map(",".join)


@contextmanager
def string_path_only() -> Iterator[None]:
    """The reader with its typed parse switched off: every block goes through the text parse."""
    real = parse._plain_rows

    def text_only(data: bytes, cols: parse.Columns, rows: int, *, typed: bool) -> pl.DataFrame | None:
        return None if typed else real(data, cols, rows, typed=False)

    with mock.patch.object(parse, "_plain_rows", text_only):
        yield


def stage(data: bytes, work: Path, chunk_bytes: int) -> tuple[pl.DataFrame, pl.DataFrame, IngestOutput]:
    out = ingest(io.BytesIO(data), ORDERS, work, buckets=4, chunk_bytes=chunk_bytes, max_invalid_share=1.0)
    staged = pl.read_parquet(out.segment).sort("_line")
    rejects = pl.read_csv(out.rejects, infer_schema=False).sort("_line")
    return staged, rejects, out


def both_ways(
    data: bytes, chunk_bytes: int
) -> tuple[tuple[pl.DataFrame, pl.DataFrame], tuple[pl.DataFrame, pl.DataFrame]]:
    with tempfile.TemporaryDirectory() as tmp:
        fast_staged, fast_rejects, fast = stage(data, Path(tmp) / "fast", chunk_bytes)
        with string_path_only():
            text_staged, text_rejects, text = stage(data, Path(tmp) / "text", chunk_bytes)
    assert (fast.rows, fast.valid_rows, fast.rejects_by_reason) == (text.rows, text.valid_rows, text.rejects_by_reason)
    return (fast_staged, fast_rejects), (text_staged, text_rejects)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    clean=st.lists(st.integers(1, 10_000), min_size=1, max_size=40, unique=True),
    dirty=st.lists(ROW, max_size=25),
    chunk_bytes=st.sampled_from([128, 512, 1 << 20]),
    seed=st.randoms(use_true_random=False),
)
def test_typed_and_string_paths_stage_and_reject_the_same_rows(
    clean: list[int], dirty: list[str], chunk_bytes: int, seed: random.Random
) -> None:
    rows = [f"{k},{k % 7 + 1},complete,2025-03-01T10:00:00,,2025-03-02T10:00:00,,{k % 3 + 1}" for k in clean] + dirty
    seed.shuffle(rows)
    data = (HEADER + "".join(r + "\n" for r in rows)).encode()
    fast, text = both_ways(data, chunk_bytes)
    assert fast[0].equals(text[0])
    assert fast[1].equals(text[1])


FIELDS = st.lists(st.sampled_from(["", "7", "12", "x"]), max_size=5)  # 0 fields: a blank line


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(FIELDS, min_size=1, max_size=12), last_int=st.booleans())
def test_a_block_without_quotes_gives_the_record_by_record_rows_and_rejects(
    lines: list[list[str]], last_int: bool
) -> None:
    # Lines short or long by a field, blank lines, and empty values in the last column: the fast path must take a
    # block as whole rows exactly when every line has the header's fields, as the record path counts them.
    data = "".join(",".join(f) + "\n" for f in lines).encode()
    cols = parse.Columns(["a", "b", "c"], ["a", "b", "c"], frozenset({"c"} if last_int else ()), 1 << 20)
    fast = parse.parse_block(Block(data, 2, len(lines), unquoted=True), cols)
    rows, bad = parse._parse_records(data, 2, cols)
    if fast.typed:
        rows = rows.with_columns(pl.col("c").cast(pl.Int64))
    assert fast.rows.equals(rows)
    assert [(b.line, b.reason, b.raw) for b in fast.bad] == [(b.line, b.reason, b.raw) for b in bad]


def test_a_clean_block_takes_the_typed_path() -> None:
    data = b"".join(b"%d,7,complete,2025-03-01T10:00:00,,,,1\n" % k for k in range(1, 50))
    cols = parse.Columns(list(ORDERS.names), list(ORDERS.names), frozenset({"order_id", "user_id"}), 1 << 20)
    parsed = parse.parse_block(Block(data, 2, 49), cols)
    assert parsed.typed
    assert parsed.rows.schema["order_id"] == pl.Int64


def test_a_blank_before_an_integer_is_bad_type_even_in_an_otherwise_clean_block(tmp_path: Path) -> None:
    data = (HEADER + "1,7,complete,2025-03-01T10:00:00,,,,1\n2, 8,complete,2025-03-01T10:00:00,,,,1\n").encode()
    _, rejects, out = stage(data, tmp_path, 1 << 20)
    assert out.valid_rows == 1
    assert rejects.select("_line", "_reason", "_column", "user_id").rows() == [("3", "bad_type", "user_id", " 8")]


def test_a_rejected_row_of_a_typed_block_shows_its_integers_as_written(tmp_path: Path) -> None:
    data = (HEADER + "007,+5,lost,2025-03-01T10:00:00,,,,01\n8,9,complete,2025-03-01T10:00:00,,,,1\n").encode()
    _, rejects, _ = stage(data, tmp_path, 1 << 20)
    assert rejects.select("_reason", "order_id", "user_id", "num_of_item").rows() == [
        ("unknown_status", "007", "+5", "01")
    ]


def test_a_key_repeated_after_ordered_chunks_is_found(tmp_path: Path) -> None:
    """The usual export order spills no key; a chunk that breaks it brings the earlier chunks' keys back."""
    ordered = "".join(f"{k},1,complete,2025-03-01T10:00:00,,,,1\n" for k in range(1, 200))
    late = "50,2,shipped,2025-03-01T10:00:00,,,,1\n7,3,shipped,2025-03-01T10:00:00,,,,1\n"
    staged, rejects, out = stage((HEADER + ordered + late).encode(), tmp_path, 512)
    assert rejects.select("_line", "_reason").rows() == [("201", "duplicate_key"), ("202", "duplicate_key")]
    assert out.valid_rows == 199
    assert staged.get_column("order_id").sort().to_list() == list(range(1, 200))


def test_ordered_chunks_have_no_duplicates_and_overlapping_ones_are_checked(tmp_path: Path) -> None:
    ordered = "".join(f"{k},1,complete,2025-03-01T10:00:00,,,,1\n" for k in range(1, 200))
    _, rejects, out = stage((HEADER + ordered).encode(), tmp_path / "a", 512)
    assert rejects.is_empty() and out.valid_rows == 199
    descending = "".join(f"{k},1,complete,2025-03-01T10:00:00,,,,1\n" for k in range(200, 0, -1))
    _, rejects, out = stage(
        (HEADER + descending + "150,1,shipped,2025-03-01T10:00:00,,,,1\n").encode(), tmp_path / "b", 512
    )
    assert rejects.select("_line", "_reason").rows() == [("202", "duplicate_key")]
