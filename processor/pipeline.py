"""The steps of the pipeline, composed over local files and a staging store.

:func:`validate_file` is the validation task's body for one local file; :func:`process_local` runs validation,
staging and the merge for files on disk in one process, with no AWS at all (``shopkpi process``, the benchmarks,
and the property tests use it). The ECS tasks in :mod:`processor.tasks` call the same functions with an S3 store.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import msgspec

from processor import fanout
from processor.errors import FileRejected, Reason
from processor.ingest import IngestOutput, ingest, open_local
from processor.log import context, get_logger
from processor.merge import merge
from processor.model import CategoryKpi, MergeResult, OrderKpi, ValidationResult
from processor.schema import detect_dataset
from processor.settings import Settings
from processor.stage import Segment, commit, file_id_for, is_committed, segment_key
from processor.state import current_kpis, load_head
from processor.store import LocalStore, Store

log = get_logger("pipeline")


@dataclass
class Validated:
    result: ValidationResult
    report: dict[str, Any]
    output: IngestOutput | None  # None when the file was rejected whole
    rejects_csv: Path | None  # rejected rows (also for rejected files, when rows were read)


def validate_file(
    path: Path, *, source: str, file_id: str, arrival: datetime, settings: Settings, work_dir: Path
) -> Validated:
    """Validate one local file (``source`` names the dataset). Never raises for bad data."""
    with open_local(path) as stream:
        return validate_stream(
            stream, source=source, file_id=file_id, arrival=arrival, settings=settings, work_dir=work_dir
        )


def validate_stream(
    stream: IO[bytes],
    *,
    source: str,
    file_id: str,
    arrival: datetime,
    settings: Settings,
    work_dir: Path,
    facts: bool = True,
) -> Validated:
    """Validate one file given as a (decompressed) byte stream; ``source`` names the dataset. ``facts``: see
    :func:`processor.ingest.ingest`."""
    started = time.perf_counter()
    dataset = detect_dataset(source)
    # A local name that is not UTF-8 (Python keeps its bytes as surrogates) is shown with those bytes escaped:
    # reports and logs are JSON, which cannot hold a lone surrogate.
    source = source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    base: dict[str, Any] = {
        "file_id": file_id,
        "source": source,
        "dataset": dataset.name if dataset else None,
        "arrival": arrival.astimezone(UTC).isoformat(),
    }
    with context(file=source, stage="validate"):
        try:
            if dataset is None:
                raise FileRejected(
                    Reason.UNKNOWN_DATASET,
                    "no dataset named by the path (incoming/<dataset>/...) or the file name "
                    "(products*, orders*, order_items*)",
                )
            out = ingest(
                stream,
                dataset,
                work_dir,
                buckets=settings.buckets,
                chunk_bytes=settings.chunk_mb << 20,
                max_invalid_share=settings.max_invalid_share,
                max_record_bytes=settings.max_record_kb << 10,
                facts=facts,
            )
        except FileRejected as e:
            return _rejected(e, base, work_dir, round(time.perf_counter() - started, 3))
        return _accepted(out, base, round(time.perf_counter() - started, 3))


def _rejected(e: FileRejected, base: dict[str, Any], work_dir: Path, seconds: float) -> Validated:
    """The result and report of a file rejected whole, with whatever was counted before the rule applied."""
    ctx = {k: v for k, v in e.context.items() if k != "reason"}
    result = ValidationResult(
        **base,
        outcome="rejected",
        reason=str(e.reason),
        message=e.message,
        rows=ctx.get("rows", 0),
        valid_rows=ctx.get("valid_rows", 0),
        rejected_rows=ctx.get("rows", 0) - ctx.get("valid_rows", 0),
        rejects_by_reason=ctx.get("rejects_by_reason", {}),
        seconds=seconds,
    )
    log.warning("file.rejected", reason=str(e.reason), message=e.message)
    rejects = work_dir / "rejects.csv"
    report = {**msgspec.structs.asdict(result), "error": e.to_dict()}
    return Validated(result, report, None, rejects if rejects.exists() else None)


def _accepted(out: IngestOutput, base: dict[str, Any], seconds: float) -> Validated:
    """The result and report of an accepted file: counts, buckets, samples of rejected rows, timings."""
    result = ValidationResult(
        **base,
        outcome="accepted",
        rows=out.rows,
        valid_rows=out.valid_rows,
        rejected_rows=out.rejected_rows,
        rejects_by_reason=out.rejects_by_reason,
        seconds=seconds,
    )
    log.info("file.accepted", rows=out.rows, rejected_rows=out.rejected_rows, **out.timings)
    report = {
        **msgspec.structs.asdict(result),
        "buckets": out.buckets,
        "samples": out.samples,
        "warnings": out.warnings,
        "timings": {k: round(v, 3) for k, v in out.timings.items()},
    }
    return Validated(result, report, out, out.rejects)


def segment_for(v: Validated, arrival: datetime) -> Segment:
    assert v.output is not None
    return Segment(
        file_id=v.result.file_id,
        dataset=v.output.dataset,
        source=v.result.source,
        arrival_us=int(arrival.timestamp() * 1_000_000),
        rows=v.output.valid_rows,
        buckets=v.output.buckets,
        key=segment_key(v.output.dataset, v.result.file_id),
    )


@dataclass
class LocalRun:
    files: list[ValidationResult]
    merge: MergeResult
    daily: list[OrderKpi]
    category: list[CategoryKpi]


def expand(paths: list[Path]) -> list[Path]:
    """Files and directories (recursively, sorted) -> files, in the order given."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            out.append(p)
    return out


@dataclass(frozen=True)
class _Landed:
    """A local file about to be validated: its identity and its place in the arrival order."""

    path: Path
    source: str
    file_id: str
    arrival: datetime


def stage_local(paths: list[Path], store: Store, settings: Settings, work: Path) -> list[ValidationResult]:
    """Validate local files and commit the accepted ones to ``store``, without merging.

    Files arrive in the order given (a later file wins over an earlier one on a conflicting key). A file staged
    before, or named twice, is recognised (same path, size and modification time) and skipped. Files are validated
    side by side, one per core (:func:`_validators`): each validation streams its file in bounded memory, and no
    file's result depends on another's. They are committed in the order given.
    """
    landed = _landed(paths, store)
    if not landed:
        return []

    def validate(f: _Landed) -> Validated:
        fwork = work / f.file_id
        return validate_file(
            f.path, source=f.source, file_id=f.file_id, arrival=f.arrival, settings=settings, work_dir=fwork
        )

    results: list[ValidationResult] = []
    with ThreadPoolExecutor(max_workers=_validators(len(landed)), thread_name_prefix="validate") as pool:
        futures = [pool.submit(validate, f) for f in landed]
        try:
            for f, future in zip(landed, futures, strict=True):
                v = future.result()
                _keep_outputs(store, v)
                if v.output is not None:
                    commit(store, v.output.segment, segment_for(v, f.arrival))
                results.append(v.result)
                shutil.rmtree(work / f.file_id, ignore_errors=True)
        except BaseException:
            for future in futures:  # an unexpected error stops the run, as it would between two files
                future.cancel()
            raise
    return results


def _landed(paths: list[Path], store: Store) -> list[_Landed]:
    """The files to validate, in arrival order: those staged before, and repeats of a file, are skipped."""
    base = datetime.now(UTC)
    out: list[_Landed] = []
    seen: set[str] = set()
    for i, path in enumerate(expand(paths)):
        stat = path.stat()
        source = str(path.resolve())
        file_id = file_id_for(source, f"{stat.st_size}:{stat.st_mtime_ns}")
        if file_id in seen or is_committed(store, file_id):
            log.info("file.already_staged", file=source)
            continue
        seen.add(file_id)
        out.append(_Landed(path, source, file_id, base + timedelta(microseconds=i)))  # argument order is arrival
    return out


def _validators(files: int) -> int:
    """Files validated at once: one per core this process may use (each also has a reader and a writer thread,
    which mostly wait on polars and pyarrow, both multi-threaded), at most 4 so memory stays bounded (each
    validation holds a few chunks of ``SHOPKPI_CHUNK_MB``)."""
    return max(1, min(files, len(os.sched_getaffinity(0)), 4))


def process_local(paths: list[Path], staging: Path, settings: Settings) -> LocalRun:
    """Validate, stage and merge local files, then return every KPI the staging directory now holds.

    ``staging`` may be reused across calls: it keeps the staged data, so later calls add to what earlier ones saw.
    """
    store = LocalStore(staging)
    work = settings.work_dir / f"process-{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{os.getpid()}"
    try:
        results = stage_local(paths, store, settings, work)
        summary = merge_local(store, settings, work / "merge")
        daily, category = current_kpis(store)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return LocalRun(results, summary, daily, category)


def merge_local(
    store: LocalStore, settings: Settings, scratch: Path, force_dates: tuple[str, str] | None = None
) -> MergeResult:
    """Merge a local staging directory under its file lock (concurrent runs on one directory take turns)."""
    with context(stage="merge"), store.lock():
        generation = load_head(store).generation + 1
        plan = None
        threads = settings.merge_threads or len(os.sched_getaffinity(0)) // 2
        if force_dates is None and threads >= 2:
            plan = fanout.plan(
                store,
                generation=generation,
                scratch=scratch / "plan",
                buckets=settings.buckets,
                parts=settings.merge_parts,
                min_rows=settings.fanout_rows,
                rows_per_pass=settings.merge_rows,
            )
        if plan is not None:
            result, _, _ = fanout.merge_in_threads(
                store, plan, scratch, workers=threads, orphan_grace_s=settings.orphan_grace_s
            )
            return result
        result, _, _ = merge(
            store,
            generation=generation,
            scratch=scratch,
            force_dates=force_dates,
            buckets=settings.buckets,
            orphan_grace_s=settings.orphan_grace_s,
            rows_per_pass=settings.merge_rows,
        )
    return result


def rejects_key(file_id: str) -> str:
    """Where a local run keeps a file's rejected rows, under its staging directory."""
    return f"rejects/{file_id}.csv"


def _keep_outputs(store: Store, v: Validated) -> None:
    """Report and rejected rows of every file, next to the staged data."""
    fid = v.result.file_id
    store.put_bytes(f"reports/{fid}.json", msgspec.json.encode(v.report))
    if v.rejects_csv is not None and v.rejects_csv.exists():
        store.put_file(v.rejects_csv, rejects_key(fid))
