"""Key hashes and Bloom filters are a stored format: files written by one version are filtered by the next.

The reference below is the format written out in plain Python integers, one key at a time; the processor's
vectorised version, which works in blocks of keys, must give the same bytes for every input and block size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import processor.keyed as keyed
from processor.keyed import Bloom, KeyedTable, TableSpec, key_hash
from processor.store import LocalStore

MASK = 2**64 - 1
KEYS = st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1)), max_size=60)


def splitmix(z: int) -> int:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK
    return z ^ (z >> 31)


def reference_hash(row: tuple[int, ...]) -> int:
    h = 0
    for v in row:
        h = splitmix(h ^ (v & MASK))
    return h


def reference_filter(hashes: list[int]) -> bytes:
    size = 1 << max(4, int(np.ceil(np.log2(max(1, len(hashes)) * keyed.BLOOM_BITS_PER_KEY / 64))))
    words = [0] * size
    for h in hashes:
        words[h & (size - 1)] |= (1 << ((h >> 40) & 63)) | (1 << ((h >> 52) & 63))
    return b"".join(w.to_bytes(8, "little") for w in words)


@pytest.mark.parametrize("block", [1, 3, 1 << 18])
@settings(max_examples=60, deadline=None)
@given(rows=KEYS)
def test_key_hashes_and_filters_keep_their_stored_format_in_blocks_of_any_size(
    block: int, rows: list[tuple[int, int]]
) -> None:
    frame = pl.DataFrame(rows, schema={"a": pl.Int64, "b": pl.Int64}, orient="row")
    old, keyed._BLOCK = keyed._BLOCK, block
    try:
        one = key_hash(frame, ["a"])
        two = key_hash(frame, ["a", "b"])
        bloom = Bloom.build(two)
    finally:
        keyed._BLOCK = old
    assert one.tolist() == [reference_hash(r[:1]) for r in rows]
    assert two.tolist() == [reference_hash(r) for r in rows]
    assert bloom.bits.tobytes() == reference_filter(two.tolist())
    assert bloom.may_contain(two).all()


def test_a_known_key_hashes_to_the_value_files_were_written_with() -> None:
    # splitmix64's finaliser of 1: a fixed point that a change of constants or shifts would move.
    assert key_hash(pl.DataFrame({"id": [1]}), ["id"]).tolist() == [0x5692161D100B05E5]


def test_a_filter_over_many_blocks_finds_every_key_and_few_others() -> None:
    hashes = key_hash(pl.DataFrame({"id": np.arange(600_000, dtype=np.int64)}), ["id"])
    bloom = Bloom.build(hashes)
    assert bloom.may_contain(hashes).all()
    others = key_hash(pl.DataFrame({"id": np.arange(600_000, 700_000, dtype=np.int64)}), ["id"])
    assert bloom.may_contain(others).mean() < 0.04  # two probes in one 64-bit word: about 2 % here


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 10**6), min_size=1, max_size=300, unique=True), shuffle=st.randoms())
def test_a_file_is_sorted_by_its_first_key_whether_or_not_its_rows_came_in_order(
    ids: list[int], shuffle: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Rows already in key order skip the sort: either way the file is in key order, its range is right and every
    # key is found.
    schema: dict[str, pl.DataType] = {"id": pl.Int64(), "v": pl.Int64()}
    spec = TableSpec("t", schema, ("id",), ("id",))
    order = list(ids)
    shuffle.shuffle(order)  # type: ignore[attr-defined]
    files = []
    for name, keys in (("sorted", sorted(ids)), ("shuffled", order)):
        root = Path(tmp_path_factory.mktemp(name))
        table = KeyedTable(LocalStore(root / "store"), spec, [], "g")
        table.append(pl.DataFrame({"id": keys, "v": [k * 7 for k in keys]}, schema=schema), root / "scratch")
        (f,) = table.files
        stored = pl.read_parquet(root / "store" / f.key)
        group = pq.ParquetFile(root / "store" / f.key).metadata.row_group(0)
        assert group.column(0).statistics.has_min_max  # what lookups locate a key by
        assert group.column(1).statistics is None  # no other column's: nothing reads them
        assert stored.get_column("id").to_list() == sorted(ids)
        assert (f.lo, f.hi, f.rows) == (min(ids), max(ids), len(ids))
        found = table.lookup(pl.DataFrame({"id": ids}))
        assert sorted(found.rows()) == sorted((k, k * 7) for k in ids)
        files.append(stored)
    assert files[0].equals(files[1])


def test_columns_without_nulls_are_stored_required_and_a_file_with_nulls_reads_back_as_written(
    tmp_path: Path,
) -> None:
    # Required columns skip a definition level per value; a column with a null (a tombstone's empty fields) must
    # stay optional, and lookups across both kinds of file give every row back as written.
    schema: dict[str, pl.DataType] = {"id": pl.Int64(), "v": pl.Int64(), "gone": pl.Boolean()}
    table = KeyedTable(LocalStore(tmp_path / "store"), TableSpec("t", schema, ("id",), ("id",)), [], "g")
    full = pl.DataFrame({"id": [1, 2, 3], "v": [10, 20, 30], "gone": [False, False, False]}, schema=schema)
    holes = pl.DataFrame({"id": [4, 5], "v": [None, 50], "gone": [True, False]}, schema=schema)
    table.append(full, tmp_path / "scratch")
    table.append(holes, tmp_path / "scratch")
    first, second = (pq.read_schema(tmp_path / "store" / f.key) for f in table.files)
    assert [f.nullable for f in first] == [False, False, False]
    assert [f.nullable for f in second] == [False, True, False]
    found = table.lookup(pl.DataFrame({"id": [1, 2, 3, 4, 5]}))
    assert sorted(found.rows()) == sorted([*full.rows(), *holes.rows()])


def test_a_filter_is_sized_by_the_distinct_lookup_keys_of_its_file(tmp_path: Path) -> None:
    # Items by order: the lookup key (the order) repeats for each item. The filter holds each order once, at the
    # bits per key it is meant to have, and still finds every order of the file.
    schema: dict[str, pl.DataType] = {"order_id": pl.Int64(), "id": pl.Int64()}
    spec = TableSpec("t", schema, ("order_id", "id"), ("order_id",))
    table = KeyedTable(LocalStore(tmp_path / "store"), spec, [], "g")
    orders = np.arange(2_500, dtype=np.int64) * 7
    table.append(pl.DataFrame({"order_id": np.repeat(orders, 4), "id": np.arange(10_000)}), tmp_path / "scratch")
    (f,) = table.files
    assert f.bloom is not None
    words = 1 << int(np.ceil(np.log2(orders.size * keyed.BLOOM_BITS_PER_KEY / 64)))
    assert len((tmp_path / "store" / f.bloom).read_bytes()) == 8 * words
    found = table.lookup(pl.DataFrame({"order_id": orders[::50]}))
    assert found.height == 4 * orders[::50].size
