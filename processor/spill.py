"""Rows set aside until the end of a merge, already cut by key range: the (user, date) counts' deferred rows.

A merge's steps cut its delivery by order, and each step changes (user, date) counts all over the user range; the
counts are written once, at the end, as files of disjoint user ranges (:meth:`processor.keyed.KeyedTable.defer`).
Kept as sorted Parquet files, the deferred rows were sorted and encoded at every step, then filtered again for
every range of the final files: about a third of a first load's merge. Here each batch is cut into ranges of
its first key as it comes (a counting sort on the range number, no sort by key), and written as one uncompressed
Arrow IPC file of one record batch per range, so that a group of ranges is read back alone. (Memory-mapped and
sliced instead, the files' pages counted as the process's memory while a group was read: 100 MB more at the peak
of the 2 GB first load.)

The ranges are the quantiles of the first batch, many more of them than files will be written
(:data:`RANGES`): a step's keys are a sample of the whole delivery's (steps are cut by order, not by user), and
:meth:`RangeSpill.ranges` then groups neighbouring ranges into files of about the rows asked for. Keys beyond
the first batch's fall in the first or the last range.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

#: Key ranges a spill cuts its rows into: many more than the files a flush writes (a few per million rows), so
#: that ranges taken from the first batch still divide a skewed delivery into files of about the size asked for.
RANGES = 256


class RangeLookup:
    """The range of each key: ``i`` when ``bounds[i - 1] < key <= bounds[i]`` (``np.searchsorted``'s answer).

    Why not ``np.searchsorted`` alone: a binary search over 255 bounds costs about 45 ns a key (its branches go
    either way at random), 11 ms for a merge step's quarter of a million customers. The span of the bounds is cut
    into at most 2^16 cells of equal width, and a table holds the range of each cell's first and last key: a key in
    a cell with no bound inside (nearly all of them) takes the range from the table; only keys in the few cells that
    hold a bound are searched. Exact for any keys and bounds; skewed bounds only send more keys to the search."""

    CELL_BITS = 16
    #: Bounds spread wider than this are searched: the table's arithmetic stays far from 64-bit overflow.
    MAX_SPAN = 1 << 61

    def __init__(self, bounds: np.ndarray) -> None:
        self.bounds = bounds.astype(np.int64)
        self.low = int(bounds[0]) if bounds.size else 0
        self.high = int(bounds[-1]) if bounds.size else 0
        self.table: tuple[np.ndarray, np.ndarray] | None = None
        if bounds.size and abs(self.low) <= self.MAX_SPAN and abs(self.high) <= self.MAX_SPAN:
            self.shift = max(0, (self.high - self.low).bit_length() - self.CELL_BITS)
            first = self.low + (np.arange(((self.high - self.low) >> self.shift) + 1, dtype=np.int64) << self.shift)
            last = np.minimum(first + ((1 << self.shift) - 1), self.high)
            self.table = (np.searchsorted(self.bounds, first), np.searchsorted(self.bounds, last))

    def ranges(self, keys: np.ndarray) -> np.ndarray:
        if self.table is None:
            found: np.ndarray = np.searchsorted(self.bounds, keys)
            return found
        cell = np.clip(keys, self.low, self.high)
        cell -= self.low
        cell >>= self.shift
        at_first: np.ndarray = self.table[0][cell]
        at_last = self.table[1][cell]
        unsure = np.flatnonzero(at_first != at_last)  # cells that hold a bound: searched
        at_first[unsure] = np.searchsorted(self.bounds, keys[unsure])
        at_first[keys > self.high] = self.bounds.size  # the table's last cell ends at the last bound
        return at_first


class RangeSpill:
    """Rows of one schema, cut by ranges of the column ``first`` into local Arrow IPC files (one per batch)."""

    def __init__(self, directory: Path, schema: dict[str, pl.DataType], first: str) -> None:
        self.directory = directory
        self.schema = schema
        self.arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
        self.first = first
        self.lookup: RangeLookup | None = None  # the ranges, set by the first batch
        self.files: list[Path] = []  # record batch i of each file holds the rows of range i
        self.rows = np.zeros(0, dtype=np.int64)  # rows of each range, over all files
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)

    def add(self, rows: pl.DataFrame) -> None:
        """Cut ``rows`` by range and write them as one more file."""
        if rows.is_empty():
            return
        rows = rows.select(list(self.schema)).cast(self.schema)  # type: ignore[arg-type]
        keys = rows.get_column(self.first).to_numpy()
        if self.lookup is None:
            cuts = np.linspace(0, 1, RANGES + 1)[1:-1]
            self.lookup = RangeLookup(np.unique(np.quantile(keys, cuts, method="lower")))
            self.rows = np.zeros(self.lookup.bounds.size + 1, dtype=np.int64)
        part = self.lookup.ranges(keys).astype(np.uint16)
        counts = np.bincount(part, minlength=self.rows.size)
        order = np.argsort(part, kind="stable")  # a radix sort of 16-bit range numbers
        starts = np.concatenate([[0], np.cumsum(counts)])
        path = self.directory / f"{len(self.files):05d}.arrow"
        table = rows[order].to_arrow().combine_chunks()
        (batch,) = table.to_batches()
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            for i in range(counts.size):  # record batch i: the rows of range i (maybe none)
                writer.write_batch(batch.slice(starts[i], counts[i]))
        self.files.append(path)
        self.rows += counts

    def ranges(self, rows_per_range: int) -> Iterator[pl.DataFrame]:
        """The spilled rows, one frame per group of neighbouring ranges of about ``rows_per_range`` rows, in key
        order of the groups (rows within a group in no particular order). Each file is opened, and its footer
        read, once; a group reads its ranges' record batches only."""
        with contextlib.ExitStack() as opened:
            readers = [pa.ipc.open_file(opened.enter_context(pa.OSFile(str(p)))) for p in self.files]
            lo = 0
            while readers and lo < self.rows.size:
                hi, n = lo, 0
                while hi < self.rows.size and (n == 0 or n + self.rows[hi] <= rows_per_range):
                    n += int(self.rows[hi])
                    hi += 1
                if n:
                    batches = [r.get_batch(i) for r in readers for i in range(lo, hi)]
                    frame = pl.from_arrow(pa.Table.from_batches(batches, self.arrow_schema), rechunk=True)
                    assert isinstance(frame, pl.DataFrame)
                    yield frame
                lo = hi

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
