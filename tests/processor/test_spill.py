"""Deferred rows cut by key range (processor.spill): every row comes back once, in ranges of ascending keys."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.spill import RangeLookup, RangeSpill

SCHEMA: dict[str, pl.DataType] = {"user_id": pl.Int64(), "n": pl.Int64()}
BATCHES = st.lists(st.lists(st.integers(-(2**62), 2**62), max_size=200), min_size=1, max_size=6)


@settings(max_examples=80, deadline=None)
@given(batches=BATCHES, rows_per_range=st.integers(1, 300), narrow_first=st.booleans())
def test_spilled_rows_come_back_once_in_disjoint_ascending_key_ranges(
    batches: list[list[int]], rows_per_range: int, narrow_first: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The ranges are the first batch's quantiles: later batches' keys may lie beyond them (a narrow first batch),
    # and then fall in the first or the last range.
    if narrow_first:
        batches = [[0, 1, 1, 2], *batches]
    spill = RangeSpill(Path(tmp_path_factory.mktemp("spill")) / "d", SCHEMA, "user_id")
    for i, keys in enumerate(batches):
        if keys:
            spill.add(pl.DataFrame({"user_id": keys, "n": [i] * len(keys)}, schema=SCHEMA))
    frames = list(spill.ranges(rows_per_range))
    back = sorted(r for f in frames for r in f.rows())
    assert back == sorted((k, i) for i, keys in enumerate(batches) for k in keys)
    for a, b in itertools.pairwise(frames):
        assert a.get_column("user_id").max() < b.get_column("user_id").min()  # type: ignore[operator]
    spill.remove()
    assert not spill.directory.exists()


def test_neighbouring_ranges_are_grouped_into_frames_of_about_the_rows_asked_for(tmp_path: Path) -> None:
    spill = RangeSpill(tmp_path / "d", SCHEMA, "user_id")
    for step in range(4):  # each step's keys a sample of the same range, as a merge's steps are
        keys = list(range(step, 40_000, 4))
        spill.add(pl.DataFrame({"user_id": keys, "n": [1] * len(keys)}, schema=SCHEMA))
    sizes = [f.height for f in spill.ranges(5_000)]
    assert sum(sizes) == 40_000
    assert len(sizes) <= 9 and all(s <= 5_000 for s in sizes) and all(s >= 4_800 for s in sizes[:-1])


INT64 = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=150, deadline=None)
@given(
    bounds=st.one_of(
        st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=300),  # dense: the table decides
        st.lists(INT64, min_size=1, max_size=40),  # anywhere, up to the widest spans: searched
        st.lists(st.integers(0, 50), min_size=1, max_size=20).map(lambda b: [*b, 10**12]),  # one far outlier
    ),
    keys=st.lists(st.one_of(st.integers(-(2**21), 2**21), INT64), max_size=300),
)
def test_range_lookup_gives_the_binary_search_answer_for_any_keys(bounds: list[int], keys: list[int]) -> None:
    sorted_bounds = np.unique(np.asarray(bounds, dtype=np.int64))
    k = np.asarray(keys, dtype=np.int64)
    assert RangeLookup(sorted_bounds).ranges(k).tolist() == np.searchsorted(sorted_bounds, k).tolist()
