"""Stream one CSV file through validation into a staged segment (the body of the validation task).

The file is never held in memory: :mod:`processor.reader` cuts the byte stream into chunks of about
``settings.chunk_mb`` megabytes of whole records; each chunk is validated (:func:`processor.validate.check_chunk`)
and its valid rows are appended to one Parquet *segment*, sorted by bucket within each chunk, so a later merge reads
some buckets by row-group pruning. Rejected rows are appended to a CSV beside it with their line, reason and column.

The one rule that spans chunks, duplicate primary keys within the file, is exact without holding every key in
memory: keys are spilled to disk in hash partitions and each partition is checked alone at the end.
"""

from __future__ import annotations

import gzip
import shutil
import time
import zlib
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from processor.errors import FileRejected, Reason
from processor.reader import iter_chunks, read_header
from processor.schema import BUCKET, Dataset, Kind, is_gzip
from processor.validate import LINE, REASON, as_rejects, check_chunk, check_header, empty_rejects

SAMPLES_PER_REASON = 5
_SPILL_PARTS = 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def bucket_expr(dataset: Dataset, buckets: int) -> pl.Expr:
    """Staging bucket of a row: ``route mod buckets`` (stable across versions, unlike a library hash)."""
    if dataset.route is None:
        return pl.lit(0, pl.Int32).alias(BUCKET)
    return pl.col(dataset.route).mod(buckets).cast(pl.Int32).alias(BUCKET)


@dataclass
class IngestOutput:
    dataset: str
    rows: int
    valid_rows: int
    rejects_by_reason: dict[str, int]
    samples: list[dict[str, Any]]
    segment: Path  # Parquet of valid typed rows, with _line and _b
    rejects: Path  # CSV of rejected rows, with _line, _reason, _column and the raw values
    buckets: list[int]  # buckets that received rows
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rejected_rows(self) -> int:
        return self.rows - self.valid_rows


class _RejectSink:
    """Appends rejected rows to a CSV and keeps counts and a few samples per reason."""

    def __init__(self, path: Path, dataset: Dataset) -> None:
        self.path = path
        self.counts: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []
        self._file = path.open("wb")
        self._header = True
        self._dataset = dataset

    def add(self, rejected: pl.DataFrame) -> None:
        if rejected.is_empty():
            return
        self.counts.update(dict(rejected.get_column(REASON).value_counts().iter_rows()))
        for row in rejected.iter_rows(named=True):
            if sum(1 for s in self.samples if s[REASON] == row[REASON]) < SAMPLES_PER_REASON:
                self.samples.append(row)
            elif len(self.samples) >= SAMPLES_PER_REASON * len(Reason):
                break
        rejected.write_csv(self._file, include_header=self._header)
        self._header = False

    def close(self) -> None:
        if self._header:  # no rejects: still a valid, empty CSV with a header
            empty_rejects(self._dataset).write_csv(self._file)
        self._file.close()


class _KeySpill:
    """Primary keys and lines, spilled to disk in hash partitions, to find duplicates in bounded memory."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._keys = [(directory / f"k{p}.bin").open("wb") for p in range(_SPILL_PARTS)]
        self._lines = [(directory / f"l{p}.bin").open("wb") for p in range(_SPILL_PARTS)]
        self.dir = directory

    def add(self, keys: np.ndarray, lines: np.ndarray) -> None:
        part = ((keys.astype(np.uint64) * _GOLDEN) >> np.uint64(60)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=_SPILL_PARTS))])
        k, ln = keys[order], lines[order]
        for p in range(_SPILL_PARTS):
            lo, hi = bounds[p], bounds[p + 1]
            if hi > lo:
                k[lo:hi].tofile(self._keys[p])
                ln[lo:hi].tofile(self._lines[p])

    def duplicate_lines(self) -> np.ndarray:
        """Lines whose key repeats an earlier line of the file (the first occurrence is kept)."""
        for f in (*self._keys, *self._lines):
            f.close()
        found: list[np.ndarray] = []
        for p in range(_SPILL_PARTS):
            keys = np.sort(np.fromfile(self.dir / f"k{p}.bin", dtype=np.int64))
            if not (keys[1:] == keys[:-1]).any():
                continue
            keys = np.fromfile(self.dir / f"k{p}.bin", dtype=np.int64)
            lines = np.fromfile(self.dir / f"l{p}.bin", dtype=np.int64)
            df = pl.DataFrame({"k": keys, "l": lines}).sort("l")
            found.append(df.filter(~pl.col("k").is_first_distinct()).get_column("l").to_numpy())
        shutil.rmtree(self.dir, ignore_errors=True)
        return np.sort(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)


def open_local(path: Path) -> IO[bytes]:
    """A local file as a byte stream, gunzipped on the fly when its name ends in .gz."""
    f: IO[bytes] = path.open("rb")
    return cast(IO[bytes], gzip.GzipFile(fileobj=f, mode="rb")) if is_gzip(path.name) else f


def ingest(
    stream: IO[bytes],
    dataset: Dataset,
    work_dir: Path,
    *,
    buckets: int,
    chunk_bytes: int,
    max_invalid_share: float,
) -> IngestOutput:
    """Validate a CSV byte stream (already decompressed) and stage its valid rows into ``work_dir``.

    Raises :class:`FileRejected` for file-level rules; its context carries whatever was counted so far.
    """
    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        header = read_header(stream)
    except (OSError, EOFError, zlib.error) as e:
        raise FileRejected(Reason.UNREADABLE, f"cannot read the file: {e}") from e
    check = check_header(header, dataset)
    if check.duplicated:
        raise FileRejected(Reason.UNREADABLE, f"columns named twice: {', '.join(check.duplicated)}", line=1)
    if check.missing:
        raise FileRejected(
            Reason.MISSING_COLUMN,
            f"required columns missing: {', '.join(check.missing)}",
            line=1,
            missing=list(check.missing),
        )
    warnings = [f"extra columns ignored: {', '.join(check.extra)}"] if check.extra else []
    present = [c for c in dataset.names if c not in check.absent_optional]
    absent = [pl.lit(None, pl.String).alias(c) for c in check.absent_optional]

    segment = work_dir / "segment.parquet"
    rejects = _RejectSink(work_dir / "rejects.csv", dataset)
    schema = _arrow_schema(dataset)
    rows = valid_rows = 0
    t0 = time.perf_counter()
    sink = _SegmentSink(segment, schema, dataset, buckets, work_dir / "keys")
    try:
        ints = frozenset(c.name for c in dataset.columns if c.kind is Kind.INT and c.name in present)
        for raw in iter_chunks(stream, header, present, chunk_bytes=chunk_bytes, ints=ints):
            chunk = raw.with_columns(absent) if absent else raw
            valid, rejected = check_chunk(chunk, dataset)
            rows += chunk.height
            valid_rows += valid.height
            rejects.add(rejected)
            if not valid.is_empty():
                sink.submit(valid)
        sink.close()
    except BaseException:
        sink.close()
        rejects.close()
        raise
    spill, bucket_rows = sink.spill, sink.bucket_rows
    timings["validate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dup_lines = spill.duplicate_lines()
    if len(dup_lines):
        removed = _drop_lines(segment, dup_lines, schema)
        rejects.add(as_rejects(removed.drop(BUCKET), dataset, Reason.DUPLICATE_KEY, dataset.key))
        valid_rows -= removed.height
        for b, n in removed.get_column(BUCKET).value_counts().iter_rows():
            bucket_rows[b] -= n
    rejects.close()
    timings["duplicates"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    counts = dict(sorted(rejects.counts.items()))
    context: dict[str, Any] = {"rows": rows, "valid_rows": valid_rows, "rejects_by_reason": counts}
    if rows == 0:
        raise FileRejected(Reason.EMPTY_FILE, "the file has a header but no data rows", **context)
    invalid = rows - valid_rows
    if invalid / rows > max_invalid_share:
        raise FileRejected(
            Reason.TOO_MANY_INVALID,
            f"{invalid} of {rows} rows invalid ({invalid / rows:.1%}), above the limit of {max_invalid_share:.1%}",
            samples=rejects.samples,
            **context,
        )
    return IngestOutput(
        dataset=dataset.name,
        rows=rows,
        valid_rows=valid_rows,
        rejects_by_reason=counts,
        samples=rejects.samples,
        segment=segment,
        rejects=rejects.path,
        buckets=sorted(b for b, n in bucket_rows.items() if n > 0),
        warnings=warnings,
        timings=timings,
    )


def _writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    # Dictionary encoding doubles the write time of this one-pass stage for little gain on these columns; the
    # bucket column's statistics are what readers prune on.
    return pq.ParquetWriter(path, schema, compression="lz4", use_dictionary=False, write_statistics=[BUCKET, LINE])


def _arrow_schema(dataset: Dataset) -> pa.Schema:
    staged = dataset.staged_schema()
    staged[BUCKET] = pl.Int32()
    return pl.DataFrame(schema=staged).to_arrow().schema


class _SegmentSink:
    """Writes valid chunks to the segment on a background thread, overlapping I/O with the next chunk's checks.

    At most one chunk waits to be written (bounded memory). Each chunk is sorted by bucket and written as a few row
    groups, so a group's bucket range (its min/max statistics) is narrow and readers of some buckets skip the rest.
    """

    GROUPS_PER_CHUNK = 8

    def __init__(self, path: Path, schema: pa.Schema, dataset: Dataset, buckets: int, spill_dir: Path) -> None:
        self.schema = schema
        self.dataset = dataset
        self.buckets = buckets
        self.writer = _writer(path, schema)
        self.spill = _KeySpill(spill_dir)
        self.bucket_rows: Counter[int] = Counter()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-writer")
        self._pending: Future[None] | None = None

    def submit(self, valid: pl.DataFrame) -> None:
        self._wait()
        self._pending = self._pool.submit(self._write, valid)

    def _write(self, valid: pl.DataFrame) -> None:
        self.spill.add(valid.get_column(self.dataset.key).to_numpy(), valid.get_column(LINE).to_numpy())
        table = valid.with_columns(bucket_expr(self.dataset, self.buckets)).sort(BUCKET)
        self.bucket_rows.update(dict(table.get_column(BUCKET).value_counts().iter_rows()))
        size = max(1, -(-table.height // self.GROUPS_PER_CHUNK))
        self.writer.write_table(table.to_arrow().cast(self.schema), row_group_size=size)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()
            self.writer.close()


def _drop_lines(segment: Path, lines: np.ndarray, schema: pa.Schema) -> pl.DataFrame:
    """Rewrite the segment without ``lines`` (row group by row group, keeping the layout); return what was dropped."""
    tmp = segment.with_suffix(".dedup.parquet")
    drop = pl.Series(lines)
    removed: list[pl.DataFrame] = []
    source = pq.ParquetFile(segment)
    with _writer(tmp, schema) as writer:
        for i in range(source.num_row_groups):
            group = pl.from_arrow(source.read_row_group(i))
            assert isinstance(group, pl.DataFrame)
            hit = group.get_column(LINE).is_in(drop.implode())
            if hit.any():
                removed.append(group.filter(hit))
                group = group.filter(~hit)
            if group.height:
                writer.write_table(group.to_arrow().cast(schema), row_group_size=group.height)
    source.close()
    tmp.replace(segment)
    return pl.concat(removed)
