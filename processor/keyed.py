"""Keyed state: a table kept as a log-structured set of sorted Parquet files, read by key without a scan.

Why it exists: a delivery touches a few thousand keys among hundreds of millions. The merge must find their current
rows (the version a new row replaces, the items of an order whose date moved) at a cost that follows the delivery,
not the history: Hudi's record-level index problem, solved here with the parts of an LSM tree that object storage
allows (files are immutable; S3 serves byte ranges):

* every merge step appends its changed rows as a new *file*, sorted by the table's first key column, in small row
  groups whose min/max statistics locate a key; a lookup reads only the row groups that may hold one of the keys
  asked for;
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

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import msgspec
import numpy as np
import polars as pl
import pyarrow.parquet as pq

from processor.pairs import group_by_pair
from processor.parquet import required_where_full, write_options
from processor.spill import RangeSpill
from processor.store import Store

#: Rows per Parquet row group: the unit a lookup reads. Small enough that a few thousand keys spread over a big
#: table read a small share of it; large enough that the footer stays small.
ROW_GROUP = 8192
BLOOM_BITS_PER_KEY = 12  # per distinct lookup key of a file (about 2 % false positives)
BLOOM_MIN_ROWS = 4096  # a file smaller than a few row groups is cheaper to read than to filter
DEL = "_del"  # tombstone column of latest tables that delete rows
WEIGHT = "n"  # weight column of additive tables
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ONE, _S27, _S30, _S31, _S40, _S52, _S63 = (np.uint64(v) for v in (1, 27, 30, 31, 40, 52, 63))
#: Keys hashed or added to a filter per pass: whole-array expressions over tens of millions of keys spent about a
#: third of their time faulting in fresh pages for their temporaries; 2 MB buffers are reused and stay in cache.
_BLOCK = 1 << 18


class TableFile(msgspec.Struct, frozen=True, kw_only=True):
    """One immutable file of a table: where it is, how many rows, the range of its first key column."""

    key: str
    rows: int
    lo: int
    hi: int
    bloom: str | None = None
    #: The residues ``first key mod TableSpec.modulus`` present in the file, when they are not all of them: a
    #: lookup skips a file that cannot hold its keys without even probing the Bloom filter (a first load's steps
    #: each write one range of staging buckets).
    parts: list[int] | None = None


Run = list[TableFile]
#: Shown the rows of each file a flush or a rewrite writes (see KeyedTable.flush).
Visitor = Callable[[pl.DataFrame], None]


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: dict[str, pl.DataType]
    full_key: tuple[str, ...]  # unique key of a row; files are sorted by its first column
    lookup: tuple[str, ...]  # the columns lookups give (a prefix of full_key); the Bloom filter is on them
    additive: bool = False  # rows carry a weight that adds across files; else the newest file's row wins
    deletes: bool = False  # latest tables only: rows with _del = true remove the key
    modulus: int = 0  # > 0: files record which residues of their first key they hold (the staging buckets)

    @property
    def first(self) -> str:
        return self.full_key[0]


def _mix_into(z: np.ndarray, scratch: np.ndarray) -> None:
    """splitmix64's finaliser, in place: a fast, well-spread 64-bit hash of each value (wrapping arithmetic)."""
    for shift, mult in ((_S30, _M1), (_S27, _M2), (_S31, None)):
        np.right_shift(z, shift, out=scratch)
        z ^= scratch
        if mult is not None:
            z *= mult


def key_hash(frame: pl.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """One 64-bit hash per row of ``columns`` (each value mixed into the hash of the columns before it)."""
    values = [frame.get_column(c).cast(pl.Int64).to_numpy().view(np.uint64) for c in columns]
    out = np.empty(frame.height, dtype=np.uint64)
    scratch = np.empty(min(_BLOCK, frame.height), dtype=np.uint64)
    for start in range(0, frame.height, _BLOCK):
        h = out[start : start + _BLOCK]
        tmp = scratch[: h.size]
        for i, v in enumerate(values):
            if i == 0:
                h[...] = v[start : start + _BLOCK]
            else:
                h ^= v[start : start + _BLOCK]
            _mix_into(h, tmp)
    return out


class Bloom:
    """A blocked Bloom filter over 64-bit hashes: both probes of a key fall in one 64-bit word, so a test costs one
    memory access (plain two-probe filters spend most of their time on cache misses). Stored as raw bytes: a key's
    word is its hash's low bits, its two bits are the hash's bits 40-45 and 52-57."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits  # the words' bytes, as stored
        self.words = bits.view(np.uint64)

    @classmethod
    def build(cls, hashes: np.ndarray) -> Bloom:
        size = 1 << max(4, int(np.ceil(np.log2(max(1, hashes.size) * BLOOM_BITS_PER_KEY / 64))))
        words = np.zeros(size, dtype=np.uint64)
        n = min(_BLOCK, hashes.size)
        word, want, tmp = (np.empty(n, dtype=np.uint64) for _ in range(3))
        for start in range(0, hashes.size, _BLOCK):
            h = hashes[start : start + _BLOCK]
            k = h.size
            cls._probe(h, size, word[:k], want[:k], tmp[:k])
            np.bitwise_or.at(words, word[:k].view(np.int64), want[:k])
        return cls(words.view(np.uint8))

    @staticmethod
    def _probe(hashes: np.ndarray, words: int, word: np.ndarray, want: np.ndarray, tmp: np.ndarray) -> None:
        """Each hash's word number into ``word`` and its two bits into ``want`` (``tmp``: scratch)."""
        np.bitwise_and(hashes, np.uint64(words - 1), out=word)
        for shift, into in ((_S40, want), (_S52, tmp)):
            np.right_shift(hashes, shift, out=into)
            into &= _S63
            np.left_shift(_ONE, into, out=into)
        want |= tmp

    def may_contain(self, hashes: np.ndarray) -> np.ndarray:
        word, want, tmp = (np.empty(hashes.size, dtype=np.uint64) for _ in range(3))
        self._probe(hashes, self.words.size, word, want, tmp)
        np.take(self.words, word.view(np.int64), out=tmp, mode="clip")  # in range: masked
        tmp &= want
        hit: np.ndarray = tmp == want
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
        self._pending: RangeSpill | None = None  # deferred rows (see defer)

    @property
    def files(self) -> list[TableFile]:
        return [f for run in self.runs for f in run]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def empty(self) -> pl.DataFrame:
        return pl.DataFrame(schema=self.spec.schema)

    # --- reads ------------------------------------------------------------------------------------------------
    def lookup(self, keys: pl.DataFrame, *, files: int | None = None) -> pl.DataFrame:
        """The current rows whose ``spec.lookup`` columns equal a row of ``keys`` (resolved across files).

        ``files=n`` looks in the n oldest files only: the table as it was before the files a caller knows cannot
        hold these keys."""
        cols = list(self.spec.lookup)
        if keys.is_empty() or not self.files[:files]:
            return self.empty()
        keys = keys.select(cols).unique()
        first = keys.get_column(self.spec.first).to_numpy()
        residues = first % self.spec.modulus if self.spec.modulus else None
        hashes: np.ndarray | None = None  # computed on the first Bloom filter that needs them
        found: list[pl.DataFrame] = []
        for age, f in enumerate(self.files[:files]):
            inside = (first >= f.lo) & (first <= f.hi)
            if f.parts is not None and residues is not None:
                allowed = np.zeros(self.spec.modulus, dtype=bool)
                allowed[f.parts] = True
                inside &= allowed[residues]
            if f.bloom is not None and inside.any():
                hashes = key_hash(keys, cols) if hashes is None else hashes
                inside[inside] = self._bloom(f).may_contain(hashes[inside])
            if inside.any():
                rows = self._read(f, np.unique(first[inside]), keys.filter(pl.Series(inside)))
                if rows.height:
                    found.append(rows.with_columns(pl.lit(age, pl.Int32).alias("_age")))
        return self._resolve(found)

    def scan_column(self, column: str, values: Sequence[int], out: str) -> pl.Series:
        """Distinct ``out`` of every row (any version, even superseded) whose ``column`` is in ``values``.

        A superset of the current rows' values, which is all a caller that recomputes them needs. Reads one or two
        columns of every file: the price of a change that is genuinely wide (a product's new category)."""
        if not values or not self.runs:
            return pl.Series(out, [], pl.Int64)
        frames = [
            pl.scan_parquet(self.store.local_path(f.key), glob=False)
            .select(column, out)
            .filter(pl.col(column).is_in(list(values)))
            .select(out)
            for f in self.files
        ]
        return pl.concat(frames).unique().collect().get_column(out)

    def _bloom(self, f: TableFile) -> Bloom:
        assert f.bloom is not None
        if f.bloom not in self._blooms:
            data = self.store.get_bytes(f.bloom)
            if data is None:
                raise FileNotFoundError(f"Bloom filter {f.bloom} of {f.key} is missing")
            self._blooms[f.bloom] = Bloom(np.frombuffer(data, dtype=np.uint8))
        return self._blooms[f.bloom]

    def _read(self, f: TableFile, wanted: np.ndarray, keys: pl.DataFrame) -> pl.DataFrame:
        """The rows of ``f`` whose lookup columns equal a row of ``keys`` (``wanted``: their sorted first keys).

        Two passes over the row groups whose key range may hold a wanted value: first their lookup columns only,
        to find the groups that really hold one (a Bloom filter's false positives cost only this), then the whole
        rows of those groups."""
        with self.store.open(f.key) as handle:
            md, lows, highs = self._footer(f, handle)
            hit = np.searchsorted(wanted, lows, "left") < np.searchsorted(wanted, highs, "right")
            groups = np.flatnonzero(hit)
            if not groups.size:
                return self.empty()
            pf = pq.ParquetFile(handle, metadata=md)
            cols = list(self.spec.lookup)
            probe = pl.from_arrow(pf.read_row_groups(groups.tolist(), columns=cols))
            assert isinstance(probe, pl.DataFrame)
            sizes = np.array([md.row_group(int(g)).num_rows for g in groups])
            owner = np.repeat(groups, sizes)
            found = probe.with_row_index("_i").join(keys, on=cols, how="semi").get_column("_i").to_numpy()
            needed = np.unique(owner[found])
            if not needed.size:
                return self.empty()
            table = pf.read_row_groups(needed.tolist())
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame.join(keys, on=cols, how="semi")

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
        return self._resolve_rows(pl.concat(found, how="vertical_relaxed"))

    def _resolve_rows(self, rows: pl.DataFrame, *, keep_deleted: bool = False) -> pl.DataFrame:
        key = list(self.spec.full_key)
        if self.spec.additive:
            weight = [pl.col(WEIGHT).sum()]
            # the (user, date) counts group by one packed key (group_by_pair checks the columns' types), in key
            # order: a file is written sorted, and runs of a sorted key group without a hash table
            if len(key) == 2:
                out = group_by_pair(rows, key[0], key[1], weight, in_order=True)
            else:
                out = rows.group_by(key).agg(*weight)
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
        self._this_run().append(self._write(rows, scratch))

    def defer(self, rows: pl.DataFrame, scratch: Path) -> None:
        """Add ``rows`` to this merge's run, but only at :meth:`flush`: lookups meanwhile do not see them.

        For tables whose lookups during a merge never need the merge's own rows. The rows wait in local files, cut
        by key range (:class:`processor.spill.RangeSpill`), and :meth:`flush` writes them as files of disjoint key
        ranges, so a key later checks one file per run, where a first load's steps would otherwise leave many files
        that all span the whole key range."""
        if rows.is_empty():
            return
        if self._pending is None:
            self._pending = RangeSpill(scratch / f"deferred-{self.spec.name}", self.spec.schema, self.spec.first)
        self._pending.add(rows)

    def flush(self, scratch: Path, rows_per_file: int, each: Visitor | None = None) -> list[TableFile]:
        """Write the deferred rows into the store (see :meth:`defer`); returns the new files. ``each`` is shown
        each file's rows (keys resolved, zero weights kept) before it is written."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        try:
            resolved = (self._resolve_rows(r, keep_deleted=True) for r in pending.ranges(rows_per_file))
            files = self._write_ranges(resolved, scratch, each)
        finally:
            pending.remove()
        if files:
            self._this_run().extend(files)
        return files

    def adopt(self, files: Run) -> None:
        """Add files another process wrote for this merge (a fanned-out merge's part) to this merge's run, as
        they are: exact for keys no other file of the run holds (parts own disjoint staging buckets)."""
        if files:
            self._this_run().extend(files)

    def absorb(self, files: Run, scratch: Path, rows_per_file: int, each: Visitor | None = None) -> Run:
        """Rewrite files of this table's store as files of disjoint key ranges in this merge's run, resolving
        keys they share (for an additive table: their weights add up); returns the new files. The inputs are
        not named by the run: the caller deletes them once the state that replaces them is committed. ``each``:
        see :meth:`flush`."""
        if not files:
            return []
        out = self._merge_runs([files], scratch, bottom=False, rows_per_file=rows_per_file, each=each)
        self._this_run().extend(out)
        return out

    @property
    def written(self) -> Run:
        """The files this merge added (its run), in order."""
        return list(self.runs[-1]) if self._run_open else []

    def _this_run(self) -> Run:
        """This merge's run (the newest), started by its first write."""
        if not self._run_open:
            self.runs.append([])
            self._run_open = True
        return self.runs[-1]

    def _write(self, rows: pl.DataFrame, scratch: Path) -> TableFile:
        # Sorted by the first key only: row-group statistics, key ranges and lookups all work on it, and a sort on
        # one integer column costs half a multi-column sort (rows of one first key keep no particular order).
        frame = rows.select(list(self.spec.schema)).cast(self.spec.schema)  # type: ignore[arg-type]
        # A file delivered in key order reaches here sorted (a step's rows keep their file order within a bucket):
        # a check is one pass over the column, where the sort gathers every column again.
        if not frame.get_column(self.spec.first).is_sorted():
            frame = frame.sort(self.spec.first)
        self._serial += 1
        name = f"{self.prefix}/{self.spec.name}-{self._serial:04d}"
        scratch.mkdir(parents=True, exist_ok=True)
        local = scratch / f"{self.spec.name}-{self._serial:04d}.parquet"
        table = required_where_full(frame.to_arrow())
        # Statistics of the first key only: lookups, key ranges and rewrites read no others (min/max of ids and
        # prices spread over the whole table prune nothing), and each column's cost a pass and footer bytes.
        stats = [self.spec.first]
        pq.write_table(table, local, row_group_size=ROW_GROUP, write_statistics=stats, **write_options(table.schema))
        self.store.put_file(local, name + ".parquet")
        local.unlink()
        bloom = None
        first = frame.get_column(self.spec.first).to_numpy()
        if frame.height >= BLOOM_MIN_ROWS:
            bloom = name + ".bloom"
            self.store.put_bytes(
                bloom, Bloom.build(key_hash(self._lookup_keys(frame, first), self.spec.lookup)).bits.tobytes()
            )
        parts = None
        if self.spec.modulus:
            present = np.flatnonzero(np.bincount(first % self.spec.modulus, minlength=self.spec.modulus))
            parts = present.tolist() if present.size < self.spec.modulus else None
        return TableFile(
            key=name + ".parquet", rows=frame.height, lo=int(first[0]), hi=int(first[-1]), bloom=bloom, parts=parts
        )

    def _lookup_keys(self, frame: pl.DataFrame, first: np.ndarray) -> pl.DataFrame:
        """The rows' lookup keys, each once where they repeat: a filter is sized and built per distinct key (the
        items by order repeat each order id about twice). ``first``: the first key, sorted."""
        if self.spec.lookup != (self.spec.first,) or self.spec.lookup == self.spec.full_key:
            return frame  # full keys are distinct in a file; longer lookup prefixes keep their repeats
        new = np.ones(first.size, dtype=bool)
        np.not_equal(first[1:], first[:-1], out=new[1:])
        return frame.select(self.spec.first).filter(new)

    def compact(self, scratch: Path, *, rows_per_file: int, fanout: int = 4, max_runs: int = 6) -> bool:
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

    def _merge_runs(
        self, runs: list[Run], scratch: Path, bottom: bool, rows_per_file: int, each: Visitor | None = None
    ) -> Run:
        """Rewrite ``runs`` as files of disjoint key ranges, resolving the keys they share."""
        files = [f for run in runs for f in run]

        def resolved() -> Iterator[pl.DataFrame]:
            for lo, hi in self._ranges(files, rows_per_file):
                parts = []
                for age, f in enumerate(files):
                    if f.hi < lo or f.lo > hi:
                        continue
                    part = self._read_range(f, lo, hi)
                    if part.height:
                        parts.append(part.with_columns(pl.lit(age, pl.Int32).alias("_age")))
                if parts:
                    yield self._resolve_rows(pl.concat(parts, how="vertical_relaxed"), keep_deleted=not bottom)

        return self._write_ranges(resolved(), scratch, each)

    def _write_ranges(self, frames: Iterator[pl.DataFrame], scratch: Path, each: Visitor | None) -> Run:
        """Write each frame (rows of one key range, ranges ascending) as a file, on a second thread while the next
        frame is read and resolved: the two take about as long, and nothing else runs beside a merge's last flush.
        At most two ranges are in memory at once."""
        out: Run = []
        writing: Future[TableFile] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rewrite-{self.spec.name}") as pool:
            for frame in frames:
                if not frame.height:
                    continue
                if each is not None:
                    each(frame)
                if writing is not None:
                    out.append(writing.result())
                writing = pool.submit(self._write, frame, scratch)
            if writing is not None:
                out.append(writing.result())
        return out

    def _read_range(self, f: TableFile, lo: int, hi: int) -> pl.DataFrame:
        first = self.spec.first
        return (
            pl.scan_parquet(self.store.local_path(f.key), glob=False).filter(pl.col(first).is_between(lo, hi)).collect()
        )

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
