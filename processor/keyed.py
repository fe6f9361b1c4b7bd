"""Keyed state: a table kept as a log-structured set of sorted Parquet files, read by key without a scan.

Why it exists: a delivery touches a few thousand keys among hundreds of millions. The merge must find their current
rows (the version a new row replaces, the items of an order whose date moved) at a cost that follows the delivery,
not the history: Hudi's record-level index problem, solved here with the parts of an LSM tree that object storage
allows (files are immutable; S3 serves byte ranges):

* every merge step appends its changed rows as a new *file*, sorted by the table's key, in small row groups whose
  min/max statistics locate a key; a lookup reads only the row groups that may hold one of the keys asked for;
* each file has a Bloom filter beside it, so keys that are not in a file (new ids, the common case) cost no read;
* a lookup resolves a key across files: the newest file wins (``latest`` tables), or the weights add up
  (``additive`` tables: a Z-set, as in DBSP; rows whose weight sums to 0 are gone);
* :func:`compact` merges the newest runs when they grow comparable to the run below them (size-tiered), so a table
  keeps a handful of runs and every row is rewritten a logarithmic number of times. It works by key range, so its
  memory is bounded by ``rows_per_file`` whatever the table's size.

The files of one merge form one *run*; a table is a list of runs, oldest first. Nothing here deletes anything:
the merge deletes files that the committed state no longer names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import msgspec
import numpy as np
import polars as pl
import pyarrow.parquet as pq

from processor.store import Store

#: Rows per Parquet row group: the unit a lookup reads. Small enough that a few thousand keys spread over a big
#: table read a small share of it; large enough that the footer stays small.
ROW_GROUP = 8192
BLOOM_BITS_PER_KEY = 12
BLOOM_MIN_ROWS = 4096  # a file smaller than a few row groups is cheaper to read than to filter
DEL = "_del"  # tombstone column of latest tables that delete rows
WEIGHT = "n"  # weight column of additive tables
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


class TableFile(msgspec.Struct, frozen=True, kw_only=True):
    """One immutable file of a table: where it is, how many rows, the range of its first key column."""

    key: str
    rows: int
    lo: int
    hi: int
    bloom: str | None = None


Run = list[TableFile]


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: dict[str, pl.DataType]
    full_key: tuple[str, ...]  # unique key of a row; files are sorted by it
    lookup: tuple[str, ...]  # the columns lookups give (a prefix of full_key); the Bloom filter is on them
    additive: bool = False  # rows carry a weight that adds across files; else the newest file's row wins
    deletes: bool = False  # latest tables only: rows with _del = true remove the key

    @property
    def first(self) -> str:
        return self.full_key[0]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash of each value (wrapping arithmetic)."""
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


def key_hash(frame: pl.DataFrame, columns: Sequence[str]) -> np.ndarray:
    h = np.zeros(frame.height, dtype=np.uint64)
    for c in columns:
        values = frame.get_column(c).cast(pl.Int64).to_numpy()
        with np.errstate(over="ignore"):
            h = _mix(h ^ values.astype(np.uint64))
    return h


class Bloom:
    """A Bloom filter over 64-bit hashes, two probes, stored as raw bytes (numpy, vectorised both ways)."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits  # uint8, length a power of two
        self.mask = np.uint64(bits.size * 8 - 1)

    @classmethod
    def build(cls, hashes: np.ndarray) -> Bloom:
        size = 1 << max(10, int(np.ceil(np.log2(max(1, hashes.size) * BLOOM_BITS_PER_KEY))))
        flags = np.zeros(size, dtype=bool)
        for pos in cls._probes(hashes, np.uint64(size - 1)):
            flags[pos] = True
        return cls(np.packbits(flags, bitorder="little"))

    @staticmethod
    def _probes(hashes: np.ndarray, mask: np.uint64) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore"):
            return (hashes & mask).astype(np.int64), (_mix(hashes) & mask).astype(np.int64)

    def may_contain(self, hashes: np.ndarray) -> np.ndarray:
        hit = np.ones(hashes.size, dtype=bool)
        for pos in self._probes(hashes, self.mask):
            hit &= ((self.bits[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).astype(bool)
        return hit


class KeyedTable:
    """One table of keyed state over a :class:`Store`: lookups by key, appends of changed rows, compaction."""

    def __init__(self, store: Store, spec: TableSpec, runs: list[Run], prefix: str) -> None:
        self.store = store
        self.spec = spec
        self.runs = [list(r) for r in runs]
        self.prefix = prefix  # where new files go: state/g=<generation>
        self._serial = 0
        self._blooms: dict[str, Bloom] = {}
        self._footers: dict[str, tuple[pq.FileMetaData, np.ndarray, np.ndarray]] = {}
        self._run_open = False  # whether this merge has started its run yet

    @property
    def files(self) -> list[TableFile]:
        return [f for run in self.runs for f in run]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def empty(self) -> pl.DataFrame:
        return pl.DataFrame(schema=self.spec.schema)

    # --- reads ------------------------------------------------------------------------------------------------
    def lookup(self, keys: pl.DataFrame) -> pl.DataFrame:
        """The current rows whose ``spec.lookup`` columns equal a row of ``keys`` (resolved across files)."""
        cols = list(self.spec.lookup)
        keys = keys.select(cols).unique()
        if keys.is_empty() or not self.runs:
            return self.empty()
        hashes = key_hash(keys, cols)
        first = keys.get_column(self.spec.first).to_numpy()
        found: list[pl.DataFrame] = []
        for age, f in enumerate(self.files):
            inside = (first >= f.lo) & (first <= f.hi)
            if f.bloom is not None and inside.any():
                inside[inside] = self._bloom(f).may_contain(hashes[inside])
            if inside.any():
                rows = self._read(f, np.unique(first[inside]))
                if rows.height:
                    rows = rows.join(keys.filter(pl.Series(inside)), on=cols, how="semi")
                    found.append(rows.with_columns(pl.lit(age, pl.Int32).alias("_age")))
        return self._resolve(found)

    def scan_column(self, column: str, values: Sequence[int], out: str) -> pl.Series:
        """Distinct ``out`` of every row (any version, even superseded) whose ``column`` is in ``values``.

        A superset of the current rows' values, which is all a caller that recomputes them needs. Reads one or two
        columns of every file: the price of a change that is genuinely wide (a product's new category)."""
        if not values or not self.runs:
            return pl.Series(out, [], pl.Int64)
        frames = [
            pl.scan_parquet(self.store.local_path(f.key))
            .select(column, out)
            .filter(pl.col(column).is_in(list(values)))
            .select(out)
            for f in self.files
        ]
        return pl.concat(frames).unique().collect().get_column(out)

    def scan(self) -> pl.LazyFrame:
        """Every current row (for a reprocess, which recomputes from the state; reads the whole table)."""
        if not self.runs:
            return self.empty().lazy()
        frames = [
            pl.scan_parquet(self.store.local_path(f.key)).with_columns(pl.lit(age, pl.Int32).alias("_age"))
            for age, f in enumerate(self.files)
        ]
        return self._resolve_lazy(pl.concat(frames))

    def _bloom(self, f: TableFile) -> Bloom:
        assert f.bloom is not None
        if f.bloom not in self._blooms:
            data = self.store.get_bytes(f.bloom)
            if data is None:
                raise FileNotFoundError(f"Bloom filter {f.bloom} of {f.key} is missing")
            self._blooms[f.bloom] = Bloom(np.frombuffer(data, dtype=np.uint8))
        return self._blooms[f.bloom]

    def _read(self, f: TableFile, wanted: np.ndarray) -> pl.DataFrame:
        """The row groups of ``f`` whose key range holds one of the sorted ``wanted`` values."""
        with self.store.open(f.key) as handle:
            md, lows, highs = self._footer(f, handle)
            hit = np.searchsorted(wanted, lows, "left") < np.searchsorted(wanted, highs, "right")
            groups = np.flatnonzero(hit).tolist()
            if not groups:
                return self.empty()
            pf = pq.ParquetFile(handle, metadata=md)
            table = pf.read_row_groups(groups)
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame.filter(pl.col(self.spec.first).is_in(pl.Series(wanted).implode()))

    def _footer(self, f: TableFile, handle: IO[bytes]) -> tuple[pq.FileMetaData, np.ndarray, np.ndarray]:
        """The file's Parquet footer and its row groups' key ranges (cached: files never change)."""
        if f.key not in self._footers:
            md = pq.ParquetFile(handle).metadata
            col = md.schema.to_arrow_schema().get_field_index(self.spec.first)
            lows = np.empty(md.num_row_groups, dtype=np.int64)
            highs = np.empty(md.num_row_groups, dtype=np.int64)
            for g in range(md.num_row_groups):
                st = md.row_group(g).column(col).statistics
                known = st is not None and st.has_min_max
                lows[g] = int(st.min) if known else f.lo
                highs[g] = int(st.max) if known else f.hi
            self._footers[f.key] = (md, lows, highs)
        return self._footers[f.key]

    def _resolve(self, found: list[pl.DataFrame]) -> pl.DataFrame:
        if not found:
            return self.empty()
        return self._resolve_lazy(pl.concat(found, how="vertical_relaxed").lazy()).collect()

    def _resolve_lazy(self, rows: pl.LazyFrame, *, keep_deleted: bool = False) -> pl.LazyFrame:
        key = list(self.spec.full_key)
        if self.spec.additive:
            out = rows.group_by(key).agg(pl.col(WEIGHT).sum())
            out = out if keep_deleted else out.filter(pl.col(WEIGHT) != 0)
        else:
            out = rows.sort("_age", descending=True).unique(subset=key, keep="first", maintain_order=False)
            if self.spec.deletes and not keep_deleted:
                out = out.filter(~pl.col(DEL))
        return out.select(list(self.spec.schema)).cast(self.spec.schema)  # type: ignore[arg-type]

    # --- writes -----------------------------------------------------------------------------------------------
    def append(self, rows: pl.DataFrame, scratch: Path) -> None:
        """Add ``rows`` (changed rows, tombstones or weights) as a new file of the newest run of this merge."""
        if rows.is_empty():
            return
        if not self._run_open:
            self.runs.append([])
            self._run_open = True
        self.runs[-1].append(self._write(rows, scratch))

    def _write(self, rows: pl.DataFrame, scratch: Path) -> TableFile:
        frame = rows.select(list(self.spec.schema)).cast(self.spec.schema).sort(list(self.spec.full_key))  # type: ignore[arg-type]
        self._serial += 1
        name = f"{self.prefix}/{self.spec.name}-{self._serial:04d}"
        scratch.mkdir(parents=True, exist_ok=True)
        local = scratch / f"{self.spec.name}-{self._serial:04d}.parquet"
        frame.write_parquet(local, compression="lz4", row_group_size=ROW_GROUP, statistics=True)
        self.store.put_file(local, name + ".parquet")
        local.unlink()
        bloom = None
        if frame.height >= BLOOM_MIN_ROWS:
            bloom = name + ".bloom"
            self.store.put_bytes(bloom, Bloom.build(key_hash(frame, self.spec.lookup)).bits.tobytes())
        first = frame.get_column(self.spec.first).to_numpy()
        return TableFile(key=name + ".parquet", rows=frame.height, lo=int(first[0]), hi=int(first[-1]), bloom=bloom)

    def compact(self, scratch: Path, *, fanout: int = 4, max_runs: int = 6, rows_per_file: int = 2_000_000) -> bool:
        """Merge the newest runs while they are within ``fanout`` of the run below (or there are too many runs).

        Returns whether anything was rewritten. The merged run replaces its inputs in :attr:`runs`; the inputs'
        files stay in the store until the caller deletes what the committed state no longer names."""
        self._run_open = False
        take = 1
        while take < len(self.runs):
            newer = sum(f.rows for run in self.runs[-take:] for f in run)
            below = sum(f.rows for f in self.runs[-take - 1])
            if below <= fanout * newer or len(self.runs) - take >= max_runs:
                take += 1
            else:
                break
        if take == 1:
            return False
        inputs = self.runs[-take:]
        bottom = take == len(self.runs)  # nothing older remains: tombstones and zero weights can go
        self.runs = [*self.runs[:-take], self._merge_runs(inputs, scratch, bottom, rows_per_file)]
        return True

    def _merge_runs(self, runs: list[Run], scratch: Path, bottom: bool, rows_per_file: int) -> Run:
        files = [f for run in runs for f in run]
        bounds = self._ranges(files, rows_per_file)
        out: Run = []
        for lo, hi in bounds:
            parts = []
            for age, f in enumerate(files):
                if f.hi < lo or f.lo > hi:
                    continue
                part = self._read_range(f, lo, hi)
                if part.height:
                    parts.append(part.with_columns(pl.lit(age, pl.Int32).alias("_age")))
            if not parts:
                continue
            merged = self._resolve_lazy(pl.concat(parts, how="vertical_relaxed").lazy(), keep_deleted=not bottom)
            frame = merged.collect()
            if frame.height:
                out.append(self._write(frame, scratch))
        return out

    def _read_range(self, f: TableFile, lo: int, hi: int) -> pl.DataFrame:
        first = self.spec.first
        return pl.scan_parquet(self.store.local_path(f.key)).filter(pl.col(first).is_between(lo, hi)).collect()

    def _ranges(self, files: list[TableFile], rows_per_file: int) -> list[tuple[int, int]]:
        """Key ranges of about ``rows_per_file`` rows each, from the row groups' statistics."""
        starts: list[tuple[int, int]] = []
        for f in files:
            with self.store.open(f.key) as handle:
                md, lows, _ = self._footer(f, handle)
            starts += [(int(lows[g]), md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        starts.sort()
        lo_all = min(f.lo for f in files)
        hi_all = max(f.hi for f in files)
        bounds: list[tuple[int, int]] = []
        lo, acc = lo_all, 0
        for start, n in starts:
            if acc >= rows_per_file and start > lo:
                bounds.append((lo, start - 1))
                lo, acc = start, 0
            acc += n
        bounds.append((lo, hi_all))
        return bounds
