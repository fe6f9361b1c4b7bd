"""Stream one local CSV file through validation into a staged segment (the body of the validation task).

The file is never held in memory: polars' streaming engine reads it in chunks of ``settings.chunk_rows`` rows, each
chunk is validated (:func:`processor.validate.check_chunk`) and its valid rows are appended to one Parquet
*segment*, one row group per (chunk, bucket), so a later merge reads just one bucket by row-group pruning. Rejected
rows are appended to a CSV beside it with their line, reason and column.

The one rule that spans chunks, duplicate primary keys within the file, is exact without holding every key in
memory: keys are spilled to disk in hash partitions and each partition is checked alone at the end.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from processor.errors import FileRejected, Reason
from processor.schema import Dataset, is_gzip
from processor.validate import LINE, REASON, as_rejects, check_chunk, check_header, empty_rejects

BUCKET = "_b"
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
            keys = np.fromfile(self.dir / f"k{p}.bin", dtype=np.int64)
            if len(keys) < 2 or len(np.unique(keys)) == len(keys):
                continue
            lines = np.fromfile(self.dir / f"l{p}.bin", dtype=np.int64)
            df = pl.DataFrame({"k": keys, "l": lines}).sort("l")
            found.append(df.filter(~pl.col("k").is_first_distinct()).get_column("l").to_numpy())
        shutil.rmtree(self.dir, ignore_errors=True)
        return np.sort(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)


def decompress(path: Path, dest: Path) -> Path:
    """Gunzip to disk in 8 MiB steps (bounded memory); a corrupt stream rejects the file."""
    try:
        with gzip.open(path, "rb") as src, dest.open("wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
    except (OSError, EOFError, zlib.error) as e:
        raise FileRejected(Reason.UNREADABLE, f"cannot decompress gzip: {e}") from e
    return dest


def read_header(path: Path) -> list[str]:
    with path.open("rb") as f:
        first = f.readline()
    if not first.strip():
        raise FileRejected(Reason.EMPTY_FILE, "the file is empty (no header row)")
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FileRejected(Reason.UNREADABLE, f"header is not UTF-8: {e}", line=1) from e
    return next(csv.reader(io.StringIO(text)))


def ingest(
    path: Path,
    dataset: Dataset,
    work_dir: Path,
    *,
    buckets: int,
    chunk_rows: int,
    max_invalid_share: float,
    name: str | None = None,
) -> IngestOutput:
    """Validate ``path`` (a local CSV, optionally gzip) and stage its valid rows into ``work_dir``.

    Raises :class:`FileRejected` for file-level rules; its context carries whatever was counted so far.
    """
    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    name = name or path.name
    timings: dict[str, float] = {}
    if is_gzip(name):
        path = decompress(path, work_dir / "decompressed.csv")
        timings["decompress"] = time.perf_counter() - started

    header = read_header(path)
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
    lf = (
        pl.scan_csv(
            path,
            infer_schema=False,
            row_index_name=LINE,
            row_index_offset=2,
            truncate_ragged_lines=True,
            with_column_names=lambda cols: [c.strip() for c in cols],
            encoding="utf8",
        )
        .select([LINE, *present])
        .with_columns([pl.lit(None, pl.String).alias(c) for c in check.absent_optional])
    )

    segment = work_dir / "segment.parquet"
    rejects = _RejectSink(work_dir / "rejects.csv", dataset)
    spill = _KeySpill(work_dir / "keys")
    schema = _arrow_schema(dataset)
    rows = valid_rows = 0
    bucket_rows: Counter[int] = Counter()
    t0 = time.perf_counter()
    try:
        with pq.ParquetWriter(segment, schema, compression="lz4") as writer:
            for chunk in lf.collect_batches(chunk_size=chunk_rows):
                valid, rejected = check_chunk(chunk, dataset)
                rows += chunk.height
                valid_rows += valid.height
                rejects.add(rejected)
                if valid.is_empty():
                    continue
                spill.add(valid.get_column(dataset.key).to_numpy(), valid.get_column(LINE).to_numpy())
                _write_by_bucket(writer, valid.with_columns(bucket_expr(dataset, buckets)), schema, bucket_rows)
    except pl.exceptions.PolarsError as e:
        rejects.close()
        raise FileRejected(Reason.UNREADABLE, f"cannot parse CSV after {rows} rows: {e}", rows=rows) from e
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


def _arrow_schema(dataset: Dataset) -> pa.Schema:
    staged = dataset.staged_schema()
    staged[BUCKET] = pl.Int32()
    return pl.DataFrame(schema=staged).to_arrow().schema


def _write_by_bucket(writer: pq.ParquetWriter, valid: pl.DataFrame, schema: pa.Schema, counts: Counter[int]) -> None:
    # One row group per bucket: min == max of _b in each group's statistics, so readers of one bucket skip the rest.
    for (b,), part in valid.partition_by(BUCKET, as_dict=True, maintain_order=False).items():
        counts[int(b)] += part.height  # type: ignore[call-overload]
        writer.write_table(part.to_arrow().cast(schema), row_group_size=max(part.height, 1))


def _drop_lines(segment: Path, lines: np.ndarray, schema: pa.Schema) -> pl.DataFrame:
    """Rewrite the segment without ``lines`` (row group by row group, keeping the layout); return what was dropped."""
    tmp = segment.with_suffix(".dedup.parquet")
    drop = pl.Series(lines)
    removed: list[pl.DataFrame] = []
    source = pq.ParquetFile(segment)
    with pq.ParquetWriter(tmp, schema, compression="lz4") as writer:
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
