"""Group-bys on a packed (id, date) key give exactly the two-column group-by's groups, for every id and date."""

from __future__ import annotations

from datetime import date

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.pairs import group_by_pair, packable

IDS = st.one_of(
    st.integers(0, 50),  # many rows per group
    st.integers(2**39 - 3, 2**39 + 3),  # both sides of the packing limit
    st.integers(-(2**63), 2**63 - 1),
    st.none(),
)
DAYS = st.one_of(st.dates(date(2024, 1, 1), date(2024, 1, 5)), st.dates(), st.none())


def plain(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.group_by("user_id", "order_date").agg(pl.len().alias("n"), pl.col("cents").sum())


def packed(frame: pl.DataFrame, *, in_order: bool = False) -> pl.DataFrame:
    aggs = [pl.len().alias("n"), pl.col("cents").sum()]
    return group_by_pair(frame, "user_id", "order_date", aggs, in_order=in_order)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(IDS, DAYS, st.integers(-1000, 1000)), max_size=60))
def test_packed_pairs_group_exactly_as_two_columns(rows: list[tuple[int | None, date | None, int]]) -> None:
    frame = pl.DataFrame(rows, schema={"user_id": pl.Int64, "order_date": pl.Date, "cents": pl.Int64}, orient="row")
    expected = plain(frame).sort("user_id", "order_date")
    got = packed(frame)
    assert got.schema == expected.schema
    assert got.sort("user_id", "order_date").equals(expected)
    assert packed(frame, in_order=True).equals(expected)  # sorted by (id, date) as it comes, nulls first


def test_pairs_outside_the_packed_range_take_the_two_column_group_by() -> None:
    base = {"user_id": [1, 2], "order_date": [date(2025, 3, 1), date(1970, 1, 1)], "cents": [5, 6]}
    assert packable(pl.DataFrame(base), "user_id", "order_date")
    for column, value in (("user_id", -1), ("user_id", 2**39), ("user_id", None), ("order_date", None)):
        frame = pl.DataFrame(base).with_columns(pl.Series(column, [1 if column == "user_id" else None, value]))
        frame = frame.cast({"user_id": pl.Int64, "order_date": pl.Date})
        assert not packable(frame, "user_id", "order_date"), (column, value)
        assert packed(frame).sort(pl.all()).equals(plain(frame).sort(pl.all()))
    far = pl.DataFrame(base).with_columns(pl.Series("order_date", [date(1, 1, 1), date(9999, 12, 31)]))
    assert packable(far, "user_id", "order_date")  # every date of a four-digit year fits
