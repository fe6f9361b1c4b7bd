"""Stream one CSV file through validation into a staged segment (the body of the validation task).

The file is never held in memory: :mod:`processor.reader` cuts the byte stream into chunks of about
``settings.chunk_mb`` megabytes of whole records; each chunk is validated (:func:`processor.validate.check_chunk`)
and its valid rows (for orders and items, the facts the merge reads of them: :data:`FACTS`) are appended to one
Parquet *segment* in row groups of whole buckets (a few chunks written together), so a later merge reads some
buckets by row-group pruning. Rejected rows are appended to a CSV beside it with their line, reason and column.

The one rule that spans chunks, duplicate primary keys within the file, is exact without holding every key in
memory: repeats within a chunk are rejected at once, and the chunks' distinct keys go to a
:class:`processor.duplicates.KeySpill` (only once the keys stop ascending chunk after chunk). Rejected rows are
streamed to disk as they are found; only a few samples per reason stay in memory.
"""

from __future__ import annotations

import gzip
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from processor import kpis as K
from processor.duplicates import KeySpill
from processor.errors import FileRejected, InternalError, Reason
from processor.parquet import write_options
from processor.reader import DEFAULT_MAX_RECORD_BYTES, read_chunks, read_header_line
from processor.schema import BUCKET, ORDER_ITEMS, ORDERS, ROUTE, Dataset, Kind, is_gzip
from processor.validate import (
    LINE,
    RAW,
    REASON,
    as_rejects,
    as_written,
    check_chunk,
    check_header,
    column_key,
    empty_rejects,
    unsplit_rejects,
)

SAMPLES_PER_REASON = 5
#: Characters of a rejected record's raw text kept in a report sample (the rejected-rows file has all of it).
SAMPLE_RAW_CHARS = 200
#: Extra column names listed in the warning (a header may have thousands).
_LISTED_EXTRAS = 20


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
    segment: Path  # Parquet of the valid rows (their facts, or typed rows), with _line and _b
    rejects: Path  # CSV of rejected rows, with _line, _reason, _column and the raw values
    buckets: list[int]  # buckets that received rows
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rejected_rows(self) -> int:
        return self.rows - self.valid_rows


class _RejectSink:
    """Appends rejected rows to a CSV and keeps counts and a few samples per reason (never the rows themselves)."""

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
        sampled = Counter(s[REASON] for s in self.samples)
        if any(sampled[r] < SAMPLES_PER_REASON for r in self.counts):
            # The first rows of each reason, picked by polars: a handful of rows reach Python, whatever the chunk.
            head = rejected.filter(pl.int_range(pl.len()).over(REASON) < SAMPLES_PER_REASON)
            for row in head.iter_rows(named=True):
                if sampled[row[REASON]] < SAMPLES_PER_REASON:
                    sampled[row[REASON]] += 1
                    self.samples.append(_sample(row))
        rejected.write_csv(self._file, include_header=self._header)
        self._header = False

    def close(self) -> None:
        if self._header:  # no rejects: still a valid, empty CSV with a header
            empty_rejects(self._dataset).write_csv(self._file)
            self._header = False
        self._file.close()


def _sample(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.pop(RAW, None)
    if raw is not None:
        row[RAW] = raw if len(raw) <= SAMPLE_RAW_CHARS else raw[:SAMPLE_RAW_CHARS] + "..."
    return row


def open_local(path: Path) -> IO[bytes]:
    """A local file as a byte stream, gunzipped on the fly when its name ends in .gz."""
    f: IO[bytes] = path.open("rb")
    return cast(IO[bytes], gzip.GzipFile(fileobj=f, mode="rb")) if is_gzip(path.name) else f


@dataclass(frozen=True)
class _Layout:
    """How a file's header maps onto its dataset."""

    fields: list[str]  # per header field, the contract column it names (extras: a placeholder, then dropped)
    present: list[str]  # contract columns the file has, in contract order
    absent: list[pl.Expr]  # absent optional columns, as nulls
    first_line: int  # the line after the header
    warnings: list[str]


def ingest(
    stream: IO[bytes],
    dataset: Dataset,
    work_dir: Path,
    *,
    buckets: int,
    chunk_bytes: int,
    max_invalid_share: float,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    facts: bool = True,
) -> IngestOutput:
    """Validate a CSV byte stream (already decompressed) and stage its valid rows into ``work_dir``.

    Steps: the header (:func:`_layout`), the chunks, validated and staged as they are read
    (:func:`_stage_chunks`), the duplicate keys across chunks (:func:`_drop_duplicates`), the file's verdict
    (:func:`_verdict`). Raises :class:`FileRejected` for file-level rules; its context carries whatever was counted.

    Orders and items are staged as their *facts* (``facts``, the default): what the merge reads of a row (keys,
    date, cents, return flags) and a digest of all of its typed values, not the row itself (see
    :data:`FACTS`). ``facts=False`` stages whole typed rows (a part of a split file, whose rows the combine step
    may still have to report in full).
    """
    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    layout = _layout(stream, dataset, max_record_bytes)
    segment = work_dir / "segment.parquet"
    rejects = _RejectSink(work_dir / "rejects.csv", dataset)
    derive = FACTS[dataset.name](dataset.names) if facts and dataset.name in FACTS else None
    schema = _arrow_schema(dataset, derive)
    t0 = time.perf_counter()
    sink = _SegmentSink(segment, schema, dataset, buckets, work_dir / "keys", derive)
    try:
        try:
            rows, valid_rows = _stage_chunks(stream, dataset, layout, sink, rejects, chunk_bytes, max_record_bytes)
        finally:
            sink.close()
        timings = {"validate": time.perf_counter() - t0}
        t0 = time.perf_counter()
        valid_rows -= _drop_duplicates(segment, schema, dataset, sink, rejects)
    finally:
        rejects.close()
    timings["duplicates"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    _verdict(rows, valid_rows, rejects, max_invalid_share)
    return IngestOutput(
        dataset=dataset.name,
        rows=rows,
        valid_rows=valid_rows,
        rejects_by_reason=dict(sorted(rejects.counts.items())),
        samples=rejects.samples,
        segment=segment,
        rejects=rejects.path,
        buckets=sorted(b for b, n in sink.bucket_rows.items() if n > 0),
        warnings=layout.warnings,
        timings=timings,
    )


def _layout(stream: IO[bytes], dataset: Dataset, max_record_bytes: int) -> _Layout:
    """Read and check the header: a column named twice or a required column missing rejects the file."""
    try:
        header, header_line = read_header_line(stream, max_bytes=max_record_bytes)
    except (OSError, EOFError, zlib.error) as e:
        raise FileRejected(Reason.UNREADABLE, f"cannot read the file: {e}") from e
    check = check_header(header, dataset)
    if check.duplicated:
        spelled = [
            f"{key} (as {', '.join(repr(h) for h in header if column_key(h) == key)})" for key in check.duplicated
        ]
        raise FileRejected(
            Reason.DUPLICATE_COLUMN,
            f"columns named twice (names match case-insensitively): {'; '.join(spelled)}",
            line=header_line,
            columns=list(check.duplicated),
        )
    if check.missing:
        raise FileRejected(
            Reason.MISSING_COLUMN,
            f"required columns missing: {', '.join(check.missing)}",
            line=header_line,
            missing=list(check.missing),
        )
    return _Layout(
        fields=[c if c is not None else f"_extra_{i}" for i, c in enumerate(check.columns)],
        present=[c for c in dataset.names if c not in check.absent_optional],
        absent=[pl.lit(None, pl.String).alias(c) for c in check.absent_optional],
        first_line=header_line + 1,
        warnings=[_extra_warning(check.extra)] if check.extra else [],
    )


def _stage_chunks(
    stream: IO[bytes],
    dataset: Dataset,
    layout: _Layout,
    sink: _SegmentSink,
    rejects: _RejectSink,
    chunk_bytes: int,
    max_record_bytes: int,
) -> tuple[int, int]:
    """Validate each chunk as it is read and hand its valid rows to ``sink``: (rows read, valid rows)."""
    rows = valid_rows = 0
    ints = frozenset(c.name for c in dataset.columns if c.kind is Kind.INT and c.name in layout.present)
    for chunk in read_chunks(
        stream,
        layout.fields,
        layout.present,
        chunk_bytes=chunk_bytes,
        ints=ints,
        first_line=layout.first_line,
        max_record_bytes=max_record_bytes,
    ):
        rows += chunk.rows.height + chunk.rejects.height
        if not chunk.rejects.is_empty():
            rejects.add(unsplit_rejects(chunk.rejects, dataset))
        if chunk.rows.is_empty():
            continue
        valid, rejected = check_chunk(chunk.rows.with_columns(layout.absent), dataset)
        if not rejected.is_empty() and chunk.typed_from is not None:
            rejected = as_written(rejected, chunk.text())
        rejects.add(rejected)
        # A key repeated within the chunk: found here, so the spill holds each key at most once per chunk.
        repeated = _repeats(valid.get_column(dataset.key))
        if repeated is not None:
            rejects.add(as_rejects(valid.filter(repeated), dataset, Reason.DUPLICATE_KEY, dataset.key))
            valid = valid.filter(~repeated)
        valid_rows += valid.height
        if not valid.is_empty():
            sink.submit(valid)
        # Let go of this chunk before waiting for the next: the loop variables would hold it (and its block) while
        # the reader parses the next one, a chunk more in memory per file being validated.
        del chunk, valid, rejected
    return rows, valid_rows


def _drop_duplicates(
    segment: Path, schema: pa.Schema, dataset: Dataset, sink: _SegmentSink, rejects: _RejectSink
) -> int:
    """Reject the rows whose key repeats an earlier chunk's (exact, from the key spill); how many were dropped.

    A segment of facts has not the rows' values: the reject records come from the whole rows the sink kept of every
    chunk from the first that broke the key order on, which hold every row a duplicate can be (:class:`_SegmentSink`).
    """
    dup_lines = sink.duplicate_lines()
    dropped = 0
    if len(dup_lines):

        def drop(removed: pl.DataFrame) -> None:
            nonlocal dropped
            if sink.derive is None:
                rejects.add(as_rejects(removed.drop(BUCKET), dataset, Reason.DUPLICATE_KEY, dataset.key))
            dropped += removed.height
            for b, n in removed.get_column(BUCKET).value_counts().iter_rows():
                sink.bucket_rows[b] -= n

        _drop_lines(segment, dup_lines, schema, drop)
        if sink.derive is not None:
            reported = 0
            for rows in _rows_of_lines(sink.whole_path, dup_lines):
                rejects.add(as_rejects(rows, dataset, Reason.DUPLICATE_KEY, dataset.key))
                reported += rows.height
            if reported != dropped:  # the sink's invariant broken: never drop a row that is not reported
                raise InternalError(f"{dropped} duplicate rows dropped, {reported} found among the rows kept whole")
    return dropped


def _rows_of_lines(path: Path, lines: np.ndarray) -> Iterator[pl.DataFrame]:
    """The rows of ``lines`` (sorted) in a Parquet of whole rows, a row group at a time."""
    source = pq.ParquetFile(path)
    try:
        for i in range(source.num_row_groups):
            group = pl.from_arrow(source.read_row_group(i))
            assert isinstance(group, pl.DataFrame)
            hit = _among(group.get_column(LINE), lines)
            if hit is not None:
                yield group.filter(hit)
    finally:
        source.close()


def _verdict(rows: int, valid_rows: int, rejects: _RejectSink, max_invalid_share: float) -> None:
    """The file-level rules on the counts: no data rows, or too many invalid ones, rejects the file."""
    broken = file_rule(rows, valid_rows, dict(sorted(rejects.counts.items())), rejects.samples, max_invalid_share)
    if broken is not None:
        raise broken


def file_rule(
    rows: int, valid_rows: int, counts: dict[str, int], samples: list[dict[str, Any]], max_invalid_share: float
) -> FileRejected | None:
    """The file-level rule a whole file's counts break (SPEC 2: no data rows, too many invalid rows), if any; a
    split file's combine step judges its totals with it too."""
    context: dict[str, Any] = {"rows": rows, "valid_rows": valid_rows, "rejects_by_reason": counts}
    if rows == 0:
        return FileRejected(Reason.EMPTY_FILE, "the file has a header but no data rows", **context)
    invalid = rows - valid_rows
    if invalid / rows > max_invalid_share:
        return FileRejected(
            Reason.TOO_MANY_INVALID,
            f"{invalid} of {rows} rows invalid ({invalid / rows:.1%}), above the limit of {max_invalid_share:.1%}",
            samples=samples,
            **context,
        )
    return None


def _repeats(keys: pl.Series) -> pl.Series | None:
    """Rows whose key repeats an earlier row of the same chunk; None when there are none (ascending keys, the
    usual export order, are recognised without hashing)."""
    k = keys.to_numpy()
    if k.size < 2 or bool((k[1:] > k[:-1]).all()):
        return None
    first = keys.is_first_distinct()
    return None if first.all() else ~first


def _extra_warning(extra: tuple[str, ...]) -> str:
    names = ", ".join(n or "(unnamed)" for n in extra[:_LISTED_EXTRAS])
    more = f" and {len(extra) - _LISTED_EXTRAS} more" if len(extra) > _LISTED_EXTRAS else ""
    return f"extra columns ignored: {names}{more}"


def _writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    # Readers prune row groups on the bucket's statistics, and on the route's when a bucket is too big for one
    # merge step; no other statistics are worth their bytes here.
    stats = [c for c in (BUCKET, LINE, ROUTE) if c in schema.names]
    return pq.ParquetWriter(path, schema, write_statistics=stats, **write_options(schema))


def _arrow_schema(dataset: Dataset, derive: list[pl.Expr] | None = None) -> pa.Schema:
    """The staged segment's schema: the typed rows, or their facts (``derive``), with ``_line`` and the bucket.

    Columns that validation never leaves null are declared required (a Parquet writer encodes a definition level
    per value of an optional column, null or not): the required columns of the contract, the line and the bucket,
    and every fact, each computed from required columns only (the return flags are never null either)."""
    staged = pl.DataFrame(schema=dataset.staged_schema())
    full = {*dataset.required, LINE, BUCKET}
    if derive is not None:
        staged = staged.select(*derive, LINE)
        full |= set(staged.columns)
    schema = staged.with_columns(pl.lit(0, pl.Int32).alias(BUCKET)).to_arrow().schema
    return pa.schema([f.with_nullable(f.name not in full) for f in schema])


def _as_staged(arrow: pa.Table, schema: pa.Schema) -> pa.Table:
    """``arrow`` in the staged schema. Validation already gives the staged types: a cast to the same types still
    costs a pass over the columns (about 0.3 CPU-s for the 2 GB items file), so it runs only when a type differs;
    otherwise only the required flags are set, with no copy (a null in a required column still fails the write:
    pyarrow's writer checks)."""
    if arrow.schema.remove_metadata() == pa.schema([f.with_nullable(True) for f in schema]):
        return pa.Table.from_arrays(arrow.columns, schema=schema)
    return arrow.cast(schema)


#: Per dataset staged as facts, the expressions that turn its typed rows into them (processor.kpis).
FACTS: dict[str, Callable[[Sequence[str]], list[pl.Expr]]] = {
    ORDERS.name: K.order_facts,
    ORDER_ITEMS.name: K.item_facts,
}


class _SegmentSink:
    """Writes valid chunks to the segment on a background thread, overlapping I/O with the next chunk's checks.

    At most :attr:`QUEUED_CHUNKS` chunks wait to be written and :attr:`CHUNKS_PER_WRITE` are held for one write, as
    typed columns (about 10 MB a chunk at the default 8 MB chunks: some 80 MB of a file's memory in all). Each chunk
    is sorted by bucket as it comes, and a write puts the held chunks' rows in row groups that start and end on
    bucket boundaries (:func:`bucket_row_groups`): a merge step reads some buckets, and the rows of other buckets in
    its row groups are decoded for nothing (with groups of an eighth of a chunk cut anywhere, a first load's steps
    decoded each staged file about five times over; docs/performance.md).

    Keys go to the spill only once the file leaves the usual export order: while each chunk's keys ascend above the
    previous chunk's, no key can repeat across chunks, so nothing is spilled; if a later chunk breaks that order,
    the keys of the chunks before it are read back from the finished segment (:meth:`duplicate_lines`).

    A segment of facts (``derive``) does not hold the rows' values, which the reject record of a duplicate key must
    show. A duplicate is a row whose key an *earlier* line holds, so it cannot be in the leading chunks whose keys
    ascend (each above every key before it): only the chunks from the first that breaks the order on are kept as
    whole rows too (:attr:`whole_path`), and a file in the usual export order keeps none.
    """

    #: Most row groups per write. Fewer, bigger groups keep the footer small (every merge step reads it again);
    #: more keep a step from decoding other buckets' rows. 16 for 32 buckets: two buckets a group.
    GROUPS_PER_WRITE = 16
    #: Chunks written together: their rows of a bucket share row groups, so a file has a quarter of the row groups
    #: (and of the footer) that a write per chunk gives, for the same share of other buckets' rows in a group.
    CHUNKS_PER_WRITE = 4
    #: Chunks that may wait for the writer. Every fourth chunk's write is four chunks' Parquet encoding at once; with
    #: one chunk waiting, validation stood still behind it (3.7 s of 11 s on the 2 GB items file, measured), while
    #: over a whole file the writer is busy well under half of the time.
    QUEUED_CHUNKS = 4

    def __init__(
        self,
        path: Path,
        schema: pa.Schema,
        dataset: Dataset,
        buckets: int,
        spill_dir: Path,
        derive: list[pl.Expr] | None = None,
    ) -> None:
        self.schema = schema
        self.dataset = dataset
        self.buckets = buckets
        self.derive = derive
        self.writer = _writer(path, schema)
        self.whole_path = path.with_suffix(".rows.parquet")
        self._whole: pq.ParquetWriter | None = None
        self.spill = KeySpill(spill_dir)
        self.bucket_rows: Counter[int] = Counter()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-writer")
        self._pending: deque[Future[None]] = deque()  # submitted chunks not yet written, oldest first
        self._path = path
        self._ordered = True  # every chunk so far ascends above the previous one
        self._fence = 0  # the highest key so far, while ordered
        self._unspilled = 0  # the rows of the ordered leading chunks, whose keys are not in the spill
        self._unspilled_lines = 0  # ... which are the segment's rows of lines up to this one
        self._held: list[tuple[pa.Table, np.ndarray]] = []  # chunks sorted by bucket, their rows per bucket

    def submit(self, valid: pl.DataFrame) -> None:
        self._wait(keep=self.QUEUED_CHUNKS - 1)
        self._pending.append(self._pool.submit(self._write, valid))

    def _write(self, valid: pl.DataFrame) -> None:
        self._note_keys(valid.get_column(self.dataset.key).to_numpy(), valid.get_column(LINE).to_numpy())
        if self.derive is not None:
            if not self._ordered:  # rows a duplicate may be among: kept whole for its reject record
                whole = valid.to_arrow()
                if self._whole is None:
                    self._whole = _writer(self.whole_path, whole.schema)
                self._whole.write_table(whole)
            valid = valid.select(*self.derive, LINE)
        table = valid.with_columns(bucket_expr(self.dataset, self.buckets))
        # Buckets fit 16 bits (at most 4096), which numpy sorts by radix: a stable sort (rows of a bucket stay in
        # line order) at a fraction of the cost of a general sort of the frame.
        bucket = table.get_column(BUCKET).to_numpy().astype(np.uint16)
        table = table[np.argsort(bucket, kind="stable")]
        counts = np.bincount(bucket, minlength=self.buckets)
        self.bucket_rows.update({int(b): int(counts[b]) for b in np.flatnonzero(counts)})
        self._held.append((_as_staged(table.to_arrow(), self.schema), counts))
        if len(self._held) >= self.CHUNKS_PER_WRITE:
            self._write_held()

    def _write_held(self) -> None:
        """Write the held chunks as row groups of whole buckets: a group takes each chunk's rows of its buckets (a
        slice, each chunk being sorted by bucket), so no chunk is copied again."""
        if not self._held:
            return
        held, self._held = self._held, []
        offsets = [np.concatenate([[0], np.cumsum(counts)]) for _, counts in held]
        total: np.ndarray = np.sum([counts for _, counts in held], axis=0)
        reach = np.cumsum(total)  # rows up to and including each bucket
        first = written = 0
        for rows in bucket_row_groups(total, self.GROUPS_PER_WRITE):
            written += rows
            last = int(np.searchsorted(reach, written))  # the group's last bucket
            parts = [t.slice(o[first], o[last + 1] - o[first]) for (t, _), o in zip(held, offsets, strict=True)]
            self.writer.write_table(pa.concat_tables(parts), row_group_size=rows)
            first = last + 1

    def _note_keys(self, keys: np.ndarray, lines: np.ndarray) -> None:
        if self._ordered and (self._unspilled == 0 or keys[0] > self._fence) and bool((keys[1:] > keys[:-1]).all()):
            self._fence = int(keys[-1])
            self._unspilled += keys.size
            self._unspilled_lines = int(lines[-1])
            return
        self._ordered = False
        self.spill.add(keys, lines)

    def duplicate_lines(self) -> np.ndarray:
        """Lines whose key repeats an earlier line of the file, ascending (after :meth:`close`)."""
        if not self._ordered and self._unspilled:
            # Chunks written together share row groups (sorted by bucket), so the ordered chunks' rows are found by
            # their lines (chunks number their lines upwards), not by their place in the file.
            source = pq.ParquetFile(self._path)
            left = self._unspilled
            for batch in source.iter_batches(columns=[self.dataset.key, LINE], batch_size=1 << 20):
                lines = batch.column(1).to_numpy()
                mine = lines <= self._unspilled_lines
                if mine.any():
                    self.spill.add(batch.column(0).to_numpy()[mine], lines[mine])
                    left -= int(mine.sum())
                if not left:
                    break
            source.close()
        return self.spill.duplicate_lines()

    def _wait(self, keep: int = 0) -> None:
        """Wait for the submitted chunks to be written but the newest ``keep`` (raising what a write raised)."""
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self._wait()
            self._write_held()
        finally:
            self._pool.shutdown()
            self.writer.close()
            if self._whole is not None:
                self._whole.close()


def bucket_row_groups(counts: np.ndarray, max_groups: int) -> list[int]:
    """Row group sizes for rows sorted by bucket (``counts`` rows per bucket): at most ``max_groups`` groups, none
    empty, each ending on the bucket boundary nearest to a multiple of ``1 / max_groups`` of the rows. With buckets
    of about equal size that is ``buckets / max_groups`` buckets a group (two for 32 and 16): a merge step that reads
    one bucket decodes one other. (Closing a group once it reached its share made every other group three buckets
    when buckets differed by a few rows.)"""
    reach = np.cumsum(counts[counts > 0])  # rows up to the end of each non-empty bucket
    if reach.size == 0:
        return []
    total = int(reach[-1])
    targets = total * np.arange(1, max_groups) / max_groups
    after = np.clip(np.searchsorted(reach, targets), 0, reach.size - 1)
    before = np.maximum(after - 1, 0)
    nearer = np.where(np.abs(reach[before] - targets) <= np.abs(reach[after] - targets), before, after)
    ends = np.unique(np.append(reach[nearer], total))
    return [int(n) for n in np.diff(ends, prepend=0)]


def _drop_lines(segment: Path, lines: np.ndarray, schema: pa.Schema, removed: Callable[[pl.DataFrame], None]) -> None:
    """Rewrite the segment without ``lines`` (row group by row group, keeping the layout); each group's dropped rows
    go to ``removed`` at once, so memory holds one row group, not every dropped row."""
    tmp = segment.with_suffix(".dedup.parquet")
    source = pq.ParquetFile(segment)
    with _writer(tmp, schema) as writer:
        for i in range(source.num_row_groups):
            group = pl.from_arrow(source.read_row_group(i))
            assert isinstance(group, pl.DataFrame)
            hit = _among(group.get_column(LINE), lines)
            if hit is not None:
                removed(group.filter(hit))
                group = group.filter(~hit)
            if group.height:
                writer.write_table(group.to_arrow().cast(schema), row_group_size=group.height)
    source.close()
    tmp.replace(segment)


def _among(own: pl.Series, lines: np.ndarray) -> pl.Series | None:
    """Which of a row group's lines (``own``) are in ``lines`` (sorted); None when none is.

    A group holds lines of a few chunks: only the part of ``lines`` within its line range is looked up, so the work
    stays proportional to the rows, not groups times ``lines``."""
    lo = int(np.searchsorted(lines, int(cast(int, own.min())), side="left"))
    hi = int(np.searchsorted(lines, int(cast(int, own.max())), side="right"))
    if hi <= lo:
        return None
    hit = own.is_in(pl.Series(lines[lo:hi]).implode())
    return hit if hit.any() else None
