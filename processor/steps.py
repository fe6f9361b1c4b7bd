"""How a merge cuts its delivery into steps of bounded size (step 1 of :mod:`processor.merge`).

A step is a set of staged files and, for each, which of its rows it reads (:class:`Cut`): some staging buckets
(``order_id mod buckets``) and, when one bucket holds more rows than a step may, a range of order ids within it.
Orders and their items route by order id, so every cut keeps an order with its items, and each order group is
computed once. The single-task merge and each part of a fanned-out merge (:mod:`processor.fanout`) use these cuts.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from processor.schema import BUCKET, PRODUCTS, ROUTE
from processor.stage import Segment, scan_segment
from processor.store import Store


@dataclass(frozen=True)
class Cut:
    """The staged rows of a file that one step reads: those of some buckets and, when one bucket holds more rows
    than a step may, those of a range of order ids within it (orders and their items route by order id, so a cut
    keeps an order and its items together whichever way it is made)."""

    buckets: list[int]
    lo: int | None = None  # order ids from ``lo`` (inclusive) ...
    hi: int | None = None  # ... to ``hi`` (exclusive); None: no bound

    def predicate(self) -> pl.Expr:
        rows = pl.col(BUCKET).is_in(self.buckets)
        if self.lo is not None:
            rows &= pl.col(ROUTE) >= self.lo
        if self.hi is not None:
            rows &= pl.col(ROUTE) < self.hi
        return rows


#: A step: the files it reads and which of their rows (None: all of them).
Step = list[tuple[Segment, Cut | None]]


def delivery_steps(store: Store, delivery: list[Segment], rows_per_pass: int) -> list[Step]:
    """The delivery in steps of about ``rows_per_pass`` staged rows.

    A small delivery is one step. A bigger one is cut by staging bucket (``order_id mod buckets``) across all of its
    files, and a bucket bigger than a step by order id (:class:`RouteIndex`), so that an order and its items,
    wherever they were delivered, are applied in the same step and each order group is computed once (the whole
    products delivery goes with the first step). Any cut would be exact: a step compares every row with the state
    as the earlier steps left it.
    """
    big = [s for s in delivery if s.dataset != PRODUCTS.name]
    total = sum(s.rows for s in big)
    if total <= rows_per_pass:
        return [[(s, None) for s in delivery]]
    small: Step = [(s, None) for s in delivery if s.dataset == PRODUCTS.name]
    steps = bucket_steps(store, big, bucket_load(big), rows_per_pass)
    return [(small if i == 0 else []) + step for i, step in enumerate(steps)]


def bucket_load(segments: list[Segment]) -> dict[int, float]:
    """Staged rows per bucket (a file's rows spread evenly over the buckets it holds)."""
    load: dict[int, float] = {}
    for s in segments:
        for b in s.buckets:
            load[b] = load.get(b, 0.0) + s.rows / max(len(s.buckets), 1)
    return load


def bucket_groups(load: dict[int, float], limit: float) -> list[list[int]]:
    """Consecutive buckets in groups of at most about ``limit`` rows (a bucket bigger than that is a group)."""
    groups: list[list[int]] = [[]]
    acc = 0.0
    for b in sorted(load):
        if groups[-1] and acc + load[b] > limit:
            groups.append([])
            acc = 0.0
        groups[-1].append(b)
        acc += load[b]
    return groups


def bucket_steps(store: Store, segments: list[Segment], load: dict[int, float], rows_per_pass: int) -> list[Step]:
    """One step per group of the buckets in ``load`` (:func:`bucket_groups`: the files holding rows of those
    buckets, read for those buckets only), and per order id range of a bucket that holds more than
    ``rows_per_pass`` rows (:class:`RouteIndex`)."""
    index: RouteIndex | None = None
    steps: list[Step] = []
    for g in bucket_groups(load, rows_per_pass):
        files = [s for s in segments if set(g).intersection(s.buckets)]
        pieces = -(-int(sum(load.get(b, 0.0) for b in g)) // rows_per_pass)
        if len(g) == 1 and pieces > 1:
            index = index or RouteIndex.of(store, segments)
            ranges = index.ranges(g[0], rows_per_pass, pieces)
        else:
            ranges = [(None, None)]
        steps += [[(s, Cut(g, lo, hi)) for s in files] for lo, hi in ranges]
    return steps


Range = tuple[int | None, int | None]


@dataclass
class RouteIndex:
    """Where a big delivery's order ids lie, to cut a bucket that is bigger than a step into order-id ranges.

    Why: a step is at least one bucket, and with the bucket count fixed at the first load a bucket grows with the
    data, and a step's memory with it (at 5 GB of CSV a bucket of 32 held 1.8 M staged rows, and the merge peaked
    above 1 GiB). The staged files' row groups each hold a bucket or two of a few chunks, and their statistics say
    which order ids and how many rows; read once per merge from the files' footers, they give cuts of about
    ``rows_per_pass`` rows each however the ids are spread (:func:`_quantiles`). Files staged before those
    statistics were kept give only the span of the ids: ranges of equal width (ids are usually dense; skewed ones
    give uneven steps, never wrong ones: any cut is exact).
    """

    groups: np.ndarray | None  # per row group: lowest and highest bucket, lowest and highest order id, rows
    span: tuple[int, int] | None = None

    @classmethod
    def of(cls, store: Store, segments: list[Segment]) -> RouteIndex:
        found: list[np.ndarray] = []
        for seg in segments:
            for key in [p.key for p in seg.pieces] or [seg.key]:
                with store.open(key) as handle:
                    groups = _route_groups(pq.read_metadata(handle))
                if groups is None:
                    return cls(None, route_span(store, segments))
                found.append(groups)
        return cls(np.concatenate(found) if found else np.empty((0, 5), dtype=np.int64))

    def ranges(self, bucket: int, rows_per_pass: int, pieces: int) -> list[Range]:
        """Order-id ranges that together hold every row of ``bucket`` (the first and the last open-ended)."""
        if self.groups is None:
            assert self.span is not None
            lo, hi = self.span
            width = max(1, -(-(hi - lo + 1) // pieces))
            cuts = [lo + width * j for j in range(1, pieces) if lo + width * j <= hi]
        else:
            g = self.groups[(self.groups[:, 0] <= bucket) & (bucket <= self.groups[:, 1])]
            rows = g[:, 4] / (g[:, 1] - g[:, 0] + 1)  # a group of several buckets: its rows shared evenly
            cuts = _quantiles(g[:, 2], g[:, 3], rows, rows_per_pass)
        bounds: list[int | None] = [None, *cuts, None]
        return list(pairwise(bounds))


def _quantiles(low: np.ndarray, high: np.ndarray, rows: np.ndarray, step: int) -> list[int]:
    """Order ids that cut ``rows`` spread evenly over the ranges ``[low, high]`` into parts of about ``step``.

    The row groups' ranges overlap (orders and items files, chunks out of order), so their rows are summed as a
    density over the ids, whose running total is inverted at each multiple of ``step``."""
    points = np.concatenate([low, high + 1]).astype(np.float64)
    width = np.maximum(high + 1 - low, 1).astype(np.float64)
    order = np.argsort(points, kind="stable")
    points = points[order]
    density = np.maximum(np.cumsum(np.concatenate([rows / width, -rows / width])[order])[:-1], 0.0)
    between = density * np.diff(points)  # rows in [points[i], points[i + 1])
    before = np.concatenate([[0.0], np.cumsum(between)])
    targets = np.arange(1, int(np.ceil(before[-1] / step))) * float(step)
    i = np.clip(np.searchsorted(before, targets, side="right") - 1, 0, between.size - 1)
    frac = (targets - before[i]) / np.where(between[i] > 0, between[i], 1.0)
    at = np.ceil(points[i] + frac * (points[i + 1] - points[i])).astype(np.int64)
    return sorted(set(at.tolist()))


def _route_groups(md: pq.FileMetaData) -> np.ndarray | None:
    """(lowest bucket, highest bucket, lowest order id, highest order id, rows) of each row group; None without
    their statistics."""
    names = md.schema.names
    if BUCKET not in names or ROUTE not in names:
        return None
    b_col, r_col = names.index(BUCKET), names.index(ROUTE)
    out = np.empty((md.num_row_groups, 5), dtype=np.int64)
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        b, r = rg.column(b_col).statistics, rg.column(r_col).statistics
        if b is None or r is None or not (b.has_min_max and r.has_min_max):
            return None
        out[i] = (b.min, b.max, r.min, r.max, rg.num_rows)
    return out


def route_span(store: Store, segments: list[Segment]) -> tuple[int, int]:
    """The lowest and highest order id of the segments' rows (one integer column read by the streaming engine, so
    the column is never held whole)."""
    scans = [scan_segment(store, s).select(ROUTE) for s in segments]
    span = pl.concat(scans).select(pl.col(ROUTE).min().alias("lo"), pl.col(ROUTE).max().alias("hi"))
    lo, hi = span.collect(engine="streaming").row(0)
    return int(lo), int(hi)
