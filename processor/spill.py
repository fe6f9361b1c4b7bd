"""Rows set aside until the end of a merge, already cut by key range: the (user, date) counts' deferred rows.

A merge's steps cut its delivery by order, and each step changes (user, date) counts all over the user range; the
counts are written once, at the end, as files of disjoint user ranges (:meth:`processor.keyed.KeyedTable.defer`).
Kept as sorted Parquet files, the deferred rows were sorted and encoded at every step, then filtered again for
every range of the final files: about a third of a first load's merge. Here each batch is cut into ranges of
its first key as it comes (a counting sort on the range number, no sort by key), and written as one uncompressed
Arrow IPC file; a range is then read back as zero-copy slices of the memory-mapped files.

The ranges are the quantiles of the first batch, many more of them than files will be written
(:data:`RANGES`): a step's keys are a sample of the whole delivery's (steps are cut by order, not by user), and
:meth:`RangeSpill.ranges` then groups neighbouring ranges into files of about the rows asked for. Keys beyond
the first batch's fall in the first or the last range.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

#: Key ranges a spill cuts its rows into: many more than the files a flush writes (a few per million rows), so
#: that ranges taken from the first batch still divide a skewed delivery into files of about the size asked for.
RANGES = 256


class RangeSpill:
    """Rows of one schema, cut by ranges of the column ``first`` into local Arrow IPC files (one per batch)."""

    def __init__(self, directory: Path, schema: dict[str, pl.DataType], first: str) -> None:
        self.directory = directory
        self.schema = schema
        self.first = first
        self.bounds: np.ndarray | None = None  # a row goes to range i when bounds[i - 1] < key <= bounds[i]
        self.files: list[tuple[Path, np.ndarray]] = []  # each file and where each range starts in it
        self.rows = np.zeros(0, dtype=np.int64)  # rows of each range, over all files
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)

    def add(self, rows: pl.DataFrame) -> None:
        """Cut ``rows`` by range and write them as one more file."""
        rows = rows.select(list(self.schema)).cast(self.schema)  # type: ignore[arg-type]
        keys = rows.get_column(self.first).to_numpy()
        if self.bounds is None:
            cuts = np.linspace(0, 1, RANGES + 1)[1:-1]
            self.bounds = np.unique(np.quantile(keys, cuts, method="lower"))
            self.rows = np.zeros(self.bounds.size + 1, dtype=np.int64)
        part = np.searchsorted(self.bounds, keys, side="left").astype(np.uint16)
        counts = np.bincount(part, minlength=self.rows.size)
        order = np.argsort(part, kind="stable")  # a radix sort of 16-bit range numbers
        starts = np.concatenate([[0], np.cumsum(counts)])
        path = self.directory / f"{len(self.files):05d}.arrow"
        table = rows[order].to_arrow().combine_chunks()
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))
        self.files.append((path, starts))
        self.rows += counts

    def ranges(self, rows_per_range: int) -> Iterator[pl.DataFrame]:
        """The spilled rows, one frame per group of neighbouring ranges of about ``rows_per_range`` rows, in key
        order of the groups (rows within a group in no particular order)."""
        lo = 0
        while self.files and lo < self.rows.size:
            hi, n = lo, 0
            while hi < self.rows.size and (n == 0 or n + self.rows[hi] <= rows_per_range):
                n += int(self.rows[hi])
                hi += 1
            if n:
                # Mapped afresh for each group, so that only its pages are ever mapped (mapped pages count as the
                # process's memory): the frame is a copy, and the mappings go with ``parts``.
                parts = [self._read(path, starts[lo], starts[hi]) for path, starts in self.files]
                frame = pl.from_arrow(pa.concat_tables(parts), rechunk=True)
                del parts
                assert isinstance(frame, pl.DataFrame)
                yield frame
            lo = hi

    @staticmethod
    def _read(path: Path, start: int, end: int) -> pa.Table:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all().slice(start, end - start)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
