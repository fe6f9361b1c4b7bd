"""How a merge cuts its delivery into steps (processor.steps): pure functions over row-group statistics."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from processor.steps import RouteIndex, bucket_groups


def test_order_ranges_follow_where_the_ids_are_not_their_span() -> None:
    """Two clusters of ids far apart, 1,000 rows each (the row groups' statistics): steps of 500 rows cut each
    cluster in two and nothing in the empty stretch between them (ranges of equal width would hold everything in
    the first and the last)."""
    groups = np.array([[0, 0, 1, 1000, 1000], [0, 0, 10**9, 10**9 + 999, 1000]], dtype=np.int64)
    ranges = RouteIndex(groups).ranges(0, rows_per_pass=500, pieces=4)
    assert ranges == [(None, 501), (501, 10**9), (10**9, 10**9 + 500), (10**9 + 500, None)]


@given(st.dictionaries(st.integers(0, 63), st.floats(0, 5000), max_size=64), st.integers(1, 4000))
def test_bucket_groups_keep_every_bucket_once_in_order_and_within_the_limit(load: dict[int, float], limit: int) -> None:
    groups = [g for g in bucket_groups(load, limit) if g]
    assert [b for g in groups for b in g] == sorted(load)
    for g in groups:  # a group over the limit is a single bucket bigger than a step (cut again by order id)
        assert len(g) == 1 or sum(load[b] for b in g) <= limit
