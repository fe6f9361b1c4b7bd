"""The ECS task entry points (``shopkpi-task``): what runs inside the container, one command per workflow step.

=============  ===================================================================================================
``validate``   stream one landed file from S3 (or a local path), validate it, upload its staged segment, report and
               rejected rows; record the outcome. Result: ``accepted`` or ``rejected`` (both exit 0: a bad file is
               an expected outcome, not a task failure).
``transform``  commit an accepted file's segment into the staging area (it becomes visible to merges) and move the
               original to ``archive/``.
``quarantine`` move a rejected file's original to ``rejected/`` beside its report and rejected rows.
``merge``      under the merge lock: apply the files committed since the last merge to the keyed state (signed deltas
               of the order groups they change), publish the KPIs that moved (and, with ``--from``/``--to``,
               recompute and reconcile that range). A merge that finds the lock taken hands its work over.
=============  ===================================================================================================

Each command prints its result as one JSON line on stdout (``{"event": "task.result", ...}``) and, when the
``SHOPKPI_TASK_TOKEN`` environment variable holds a Step Functions task token, reports it with SendTaskSuccess or
SendTaskFailure (error = the project's error code). Exit codes: 0 done, 1 retryable error, 2 terminal error.

S3 layout of the landing bucket::

    incoming/<dataset>/...            landing (the trigger watches this prefix)
    archive/<dataset>/<date>/<name>   originals of accepted files, by arrival date
    rejected/<dataset>/<date>/<name>  originals of rejected files, with <name>.report.json and .rejected_rows.csv
    reports/<file_id>/report.json     every file's report; rejected_rows.csv beside it
    staging/                          typed, deduplicated staging area (see processor.stage)
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, cast

import msgspec
import orjson

from processor.errors import ConfigError, InternalError, LockBusy, NotFound, ShopKpiError
from processor.ingest import open_local
from processor.log import configure, context, get_logger
from processor.merge import Publication, current_kpis, merge
from processor.model import CategoryKpi, OrderKpi
from processor.pipeline import Validated, merge_local, segment_for, validate_stream
from processor.schema import detect_dataset, is_gzip
from processor.settings import Settings
from processor.stage import Segment, commit_manifest, file_id_for, is_committed
from processor.store import LocalStore, S3StagingStore, Store

if TYPE_CHECKING:
    from processor.aws.callback import Callback

log = get_logger("task")


class _ChunkStream(io.RawIOBase):
    """A readable byte stream over an iterator of chunks (an S3 response body), for the streaming CSV reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class Env:
    """What a task needs from AWS, built once from the settings (clients are created here, never at import)."""

    def __init__(self, settings: Settings) -> None:
        from processor.aws import make_clients
        from processor.aws.s3 import S3Store

        if not settings.bucket:
            raise ConfigError("SHOPKPI_BUCKET is not set (the task definition passes it from the stack)")
        self.settings = settings
        self.clients = make_clients(settings)
        self.s3 = S3Store(self.clients.s3, settings.bucket)
        self.staging: Store = S3StagingStore(self.s3, "staging", settings.work_dir / "staging-cache")
        self.lease: Callable[[], None] | None = None  # renews the merge lock's lease while a merge holds it

    def ledger(self) -> Any:
        from processor.aws.dynamo import Ledger

        if not self.settings.ledger_table:
            return None
        return Ledger(self.clients.dynamodb, self.settings.ledger_table)

    def kpi_tables(self) -> Any:
        from processor.aws.dynamo import KpiTables

        if not (self.settings.order_table and self.settings.category_table):
            return None
        return KpiTables(
            self.clients.dynamodb,
            self.settings.order_table,
            self.settings.category_table,
            threads=self.settings.writer_threads,
        )


def _s3_key(source: str, env: Env) -> str:
    from processor.aws.s3 import split_uri

    bucket, key = split_uri(source)
    if bucket != env.s3.bucket:
        raise ConfigError(f"{source} is not in the landing bucket {env.s3.bucket}")
    return key


@contextmanager
def _open_source(source: str, env: Env | None) -> Iterator[IO[bytes]]:
    if env is None:
        with open_local(Path(source)) as f:
            yield f
        return
    import gzip

    raw: IO[bytes] = io.BufferedReader(_ChunkStream(env.s3.iter_chunks(_s3_key(source, env))), 8 << 20)
    stream: IO[bytes] = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")) if is_gzip(source) else raw
    try:
        yield stream
    finally:
        stream.close()


def _identity(source: str, env: Env | None) -> tuple[str, datetime]:
    """(file id, arrival time) of a source: S3 ETag and LastModified, or a local file's size/mtime and now."""
    if env is None:
        stat = Path(source).stat()
        return file_id_for(str(Path(source).resolve()), f"{stat.st_size}:{stat.st_mtime_ns}"), datetime.now(UTC)
    info = env.s3.head(_s3_key(source, env))
    return file_id_for(source, info.etag), info.last_modified


def _report_prefix(file_id: str) -> str:
    return f"reports/{file_id}"


# --- validate ------------------------------------------------------------------------------------------------
class LandedEvent(msgspec.Struct, frozen=True):
    """One landed file as the workflow passes it to ``validate --event`` (the Pipe's input template): the key
    URL-encoded as S3 writes it in its events, the ETag when the event had one."""

    bucket: str
    key: str
    etag: str | None = None

    @property
    def source(self) -> str:
        from processor.aws.s3 import join_uri, key_from_event

        return join_uri(self.bucket, key_from_event(self.key))


def validate_event(event: LandedEvent, settings: Settings, env: Env | None) -> dict[str, Any]:
    """Validate the file of a landing event. Its object may be gone because an earlier run of the same event (an
    at-least-once queue) archived or quarantined it: then there is nothing to do. Gone without a trace of that, the
    file is lost (a key that was never in the bucket): a failure, so the workflow alerts, never a silent skip."""
    if env is None:
        raise ConfigError("validate --event reads from S3: SHOPKPI_BUCKET and the AWS settings must be set")
    source = event.source
    if not env.s3.exists(_s3_key(source, env)):
        if event.etag is not None and env.s3.exists(f"{_report_prefix(file_id_for(source, event.etag))}/report.json"):
            log.info("file.gone", source=source, message="already validated by an earlier delivery of its event")
            return {"source": source, "outcome": "skipped", "duplicate": True, "message": "source already processed"}
        raise NotFound(f"{source} does not exist and was never processed (event key {event.key!r})", source=source)
    return validate(source, settings, env, None)


def validate(source: str, settings: Settings, env: Env | None, local_staging: Path | None) -> dict[str, Any]:
    file_id, arrival = _identity(source, env)
    staging = env.staging if env else LocalStore(local_staging or Path("shopkpi-staging"))
    if is_committed(staging, file_id):
        log.info("file.duplicate", file_id=file_id)
        return {"file_id": file_id, "source": source, "outcome": "accepted", "duplicate": True}
    with _scratch(settings, "validate") as tmp:
        # Streamed straight from S3 (gunzipped on the fly): the file never lands on disk, only its staged segment.
        with _open_source(source, env) as stream:
            v = validate_stream(
                stream, source=source, file_id=file_id, arrival=arrival, settings=settings, work_dir=tmp
            )
        return _keep_validation(v, arrival, staging, env, settings.execution_id)


def _keep_validation(
    v: Validated, arrival: datetime, staging: Store, env: Env | None, execution: str
) -> dict[str, Any]:
    """Upload the segment (not yet committed), the report and the rejected rows; record the outcome."""
    fid = v.result.file_id
    report = dict(v.report)
    if v.output is not None:
        seg = segment_for(v, arrival)
        staging.put_file(v.output.segment, seg.key)
        report["segment"] = msgspec.structs.asdict(seg)
    if env is not None:
        prefix = _report_prefix(fid)
        if v.rejects_csv is not None and v.rejects_csv.exists():
            env.s3.upload(v.rejects_csv, f"{prefix}/rejected_rows.csv", content_type="text/csv")
            report["rejects"] = env.s3.uri(f"{prefix}/rejected_rows.csv")
        report["report"] = env.s3.uri(f"{prefix}/report.json")
        env.s3.put_bytes(f"{prefix}/report.json", orjson.dumps(report), content_type="application/json")
        if (ledger := env.ledger()) is not None:
            ledger.record_file(v.result, execution)
    else:
        staging.put_bytes(f"{_report_prefix(fid)}/report.json", orjson.dumps(report))
        if v.rejects_csv is not None and v.rejects_csv.exists():
            staging.put_file(v.rejects_csv, f"{_report_prefix(fid)}/rejected_rows.csv")
    return {k: report[k] for k in report if k not in ("samples",)}


# --- transform / quarantine ----------------------------------------------------------------------------------
def _load_report(file_id: str, staging: Store, env: Env | None) -> dict[str, Any]:
    key = f"{_report_prefix(file_id)}/report.json"
    data = env.s3.get_bytes(key) if env else staging.get_bytes(key)
    if data is None:
        raise ConfigError(f"no validation report for {file_id}: run validate first")
    report: dict[str, Any] = orjson.loads(data)
    return report


def _dated_key(area: str, source: str, arrival: str) -> str:
    dataset = detect_dataset(source)
    name = PurePosixPath(source.split("://", 1)[-1]).name
    return f"{area}/{dataset.name if dataset else 'unknown'}/{arrival[:10]}/{name}"


def transform(file_id: str, settings: Settings, env: Env | None, local_staging: Path | None) -> dict[str, Any]:
    staging = env.staging if env else LocalStore(local_staging or Path("shopkpi-staging"))
    report = _load_report(file_id, staging, env)
    if report.get("outcome") != "accepted" or "segment" not in report:
        raise ConfigError(f"{file_id} was not accepted by validation; nothing to transform")
    seg = msgspec.convert(report["segment"], type=Segment)
    fresh = commit_manifest(staging, seg)
    archived = None
    if env is not None and seg.source.startswith("s3://"):
        src_key = _s3_key(seg.source, env)
        if env.s3.exists(src_key):
            archived = _dated_key("archive", seg.source, report["arrival"])
            try:
                env.s3.move(src_key, archived)
            except NotFound:
                # The same object delivered twice, its two transforms side by side: the other one archived it.
                if env.s3.exists(src_key):
                    raise
                log.info("file.archived_by_another", file_id=file_id)
    return {"file_id": file_id, "committed": fresh, "archived": archived, "buckets": len(seg.buckets)}


def quarantine(file_id: str, settings: Settings, env: Env | None) -> dict[str, Any]:
    if env is None:
        return {"file_id": file_id, "quarantined": None}  # local files stay where they are; the report says why
    report = _load_report(file_id, env.staging, env)
    source = report["source"]
    dest = _dated_key("rejected", source, report["arrival"])
    try:
        env.s3.move(_s3_key(source, env), dest)
    except NotFound:
        # The same object delivered twice, its two quarantines side by side: the other one moved it.
        if not env.s3.exists(dest):
            raise
    env.s3.put_bytes(dest + ".report.json", orjson.dumps(report), content_type="application/json")
    rows_key = f"{_report_prefix(file_id)}/rejected_rows.csv"
    if env.s3.exists(rows_key):
        env.s3.copy(rows_key, dest + ".rejected_rows.csv")
    return {"file_id": file_id, "quarantined": env.s3.uri(dest), "reason": report.get("reason")}


# --- merge ---------------------------------------------------------------------------------------------------
def run_merge(
    settings: Settings, env: Env | None, local_staging: Path | None, force: tuple[str, str] | None
) -> dict[str, Any]:
    if env is None:
        store = LocalStore(local_staging or Path("shopkpi-staging"))
        with _scratch(settings, "merge") as scratch:
            result = merge_local(store, settings, scratch, force)
        daily, category = current_kpis(store)
        return {**msgspec.structs.asdict(result), "kpis": _kpis(daily, category)}
    ledger, tables = env.ledger(), env.kpi_tables()
    if ledger is None or tables is None:
        raise ConfigError("SHOPKPI_LEDGER_TABLE, SHOPKPI_ORDER_TABLE and SHOPKPI_CATEGORY_TABLE must be set")
    from processor.aws.dynamo import MergeLock

    lock = MergeLock(ledger.client, ledger.table)  # the lock is an item of the ledger table
    owner = f"{settings.execution_id}/{uuid.uuid4().hex[:8]}"
    try:
        generation = lock.acquire(owner, settings.lock_ttl_s)
    except LockBusy:
        # Another merge runs. A plain merge (not a reprocess, whose dates are its own) hands its work over: its files
        # are committed, and the running merge merges again before it lets go of the lock. So a burst of executions
        # does not queue on the lock (and fail once its retries run out) for work one merge does.
        holder = lock.hand_over(owner) if force is None else None
        if holder is None:
            raise
        log.info("merge.handed_over", holder=holder)
        return {"handed_over_to": holder}
    started = datetime.now(UTC).isoformat()
    # The lease is renewed with every heartbeat, so a long merge keeps it; a merge that lost it stops before its
    # next write (fence) and never moves the head.
    env.lease = lambda: lock.renew(owner, generation, settings.lock_ttl_s)
    try:
        computed_at = datetime.now(UTC).isoformat()

        def fence() -> None:
            lock.check(owner, generation)

        def publish(pub: Publication, gen: int) -> int:
            fence()
            stats = tables.publish(
                pub.daily,
                pub.category,
                gen,
                computed_at,
                settings.execution_id,
                fence=fence,
                remove_daily=pub.gone_daily,
                remove_category=pub.gone_category,
                reconcile=pub.reconcile,
            )
            return int(stats.written + stats.removed)

        rounds = 0
        while True:
            rounds += 1
            with context(stage="merge"), _scratch(settings, "merge") as scratch:
                result, _, _ = merge(
                    env.staging,
                    generation=generation,
                    scratch=scratch,
                    publish=publish,
                    force_dates=force if rounds == 1 else None,
                    buckets=settings.buckets,
                    orphan_grace_s=settings.orphan_grace_s,
                    rows_per_pass=settings.merge_rows,
                    fence=fence,
                )
            if lock.release(owner, generation, unless_pending=True) or not lock.take_pending(owner, generation):
                break  # released (or lost: the fence stopped any write) -- else a merge handed its files over
            log.info("merge.again", round=rounds + 1)
        summary = {**msgspec.structs.asdict(result), "rounds": rounds}
        ledger.record_run(settings.execution_id, "merged", started, datetime.now(UTC).isoformat(), summary)
        return summary
    finally:
        env.lease = None
        lock.release(owner, generation)


def _kpis(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi]) -> dict[str, Any]:
    return {"daily": [k.public() for k in daily], "category": [k.public() for k in category]}


def _work(settings: Settings) -> Path:
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    return settings.work_dir


_SCRATCH = re.compile(r"(?:validate|merge)-(\d+)-\w+")


@contextmanager
def _scratch(settings: Settings, kind: str) -> Iterator[Path]:
    """A private scratch directory in the work directory, removed afterwards.

    A killed task cannot clean up, so each directory is named after its process and every task first removes the
    directories of processes that no longer exist (locally, tasks share one work directory; on Fargate each task has
    its own disk and this finds nothing).
    """
    root = _work(settings)
    for old in root.iterdir():
        found = _SCRATCH.fullmatch(old.name)
        if found and old.is_dir() and not _alive(int(found.group(1))):
            log.info("task.scratch_swept", path=str(old))
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# --- command line --------------------------------------------------------------------------------------------
def _callback(env: Env | None, settings: Settings) -> Callback | None:
    """The Step Functions callback of this task, when it was started with a task token."""
    token = os.environ.get("SHOPKPI_TASK_TOKEN")
    if not token:
        return None
    from processor.aws import make_clients
    from processor.aws.callback import Callback

    clients = env.clients if env is not None else make_clients(settings)
    return Callback(clients.stepfunctions, token)


def _report_result(result: dict[str, Any] | None, error: ShopKpiError | None, callback: Callback | None) -> int:
    """Print the result line, send it to Step Functions; return the exit status.

    A result Step Functions did not take is a failure of the task, reported as such (its cause names why), so the
    state fails at once instead of waiting for a heartbeat timeout.
    """
    body = {
        "event": "task.result",
        "ok": error is None,
        **(result or {}),
        **({"error": error.to_dict()} if error else {}),
    }
    sys.stdout.buffer.write(orjson.dumps(body, default=str) + b"\n")
    sys.stdout.flush()
    status = 0 if error is None else 1 if error.retryable else 2
    if callback is None:
        return status
    try:
        if error is None:
            callback.succeed(result or {})
        else:
            callback.fail(error.code, error.message)
        return status
    except ShopKpiError as e:
        log.error("task.report_failed", code=e.code, message=e.message)
        if error is None:
            try:
                callback.fail(e.code, f"the task finished but its result was not accepted: {e.message}")
            except ShopKpiError as again:
                log.error("task.report_failed", code=again.code, message=again.message)
        return 1 if e.retryable else 2


def build_parser() -> argparse.ArgumentParser:
    # --staging is accepted before or after the command (``shopkpi-task validate f.csv --staging DIR``): the
    # subcommands share it through a parent whose default is SUPPRESS, so a value given first is not reset.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--staging", default=argparse.SUPPRESS, help=_STAGING_HELP)
    p = argparse.ArgumentParser(prog="shopkpi-task", description="shopkpi ECS task entry points")
    p.add_argument("--staging", help=_STAGING_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", parents=[common], help="validate one file (s3:// URI or local path)")
    what = v.add_mutually_exclusive_group(required=True)
    what.add_argument("source", nargs="?", help="s3://bucket/key or a local path")
    what.add_argument(
        "--event",
        type=lambda text: msgspec.json.decode(text, type=LandedEvent),
        help='the landed file as the workflow passes it: {"bucket", "key" (URL-encoded as in S3 events), "etag"}',
    )
    t = sub.add_parser(
        "transform", parents=[common], help="commit an accepted file's staged segment and archive the original"
    )
    t.add_argument("file_id")
    q = sub.add_parser("quarantine", parents=[common], help="move a rejected file to rejected/ with its report")
    q.add_argument("file_id")
    m = sub.add_parser("merge", parents=[common], help="recompute and publish the KPIs of the dates that changed")
    m.add_argument("--from", dest="date_from", help="also recompute this date range (reprocessing)")
    m.add_argument("--to", dest="date_to")
    return p


_STAGING_HELP = "local staging directory, for local sources (default ./shopkpi-staging)"


@contextmanager
def _heartbeat(env: Env | None, callback: Callback | None, settings: Settings) -> Iterator[None]:
    """While the task works, tell Step Functions it is alive (the state's HeartbeatSeconds catches a dead one),
    renew the merge lock's lease if the task holds it, and keep the task's deadline.

    The first beat goes at once: a cold start can use much of the heartbeat window. Step Functions never stops a
    container it no longer waits for, so the task stops itself: when a beat is answered that the token is dead (the
    state timed out, was retried, or its execution ended), or when its deadline (``SHOPKPI_TASK_DEADLINE``, set by the
    state just under its timeout) has passed, rather than run, and bill, on for nobody.
    """
    deadline = time.monotonic() + settings.task_deadline_s if settings.task_deadline_s > 0 else None
    if env is None and callback is None and deadline is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            if callback is not None:
                try:
                    alive = callback.heartbeat()
                except ShopKpiError as e:  # a missed beat is not fatal; the next one may pass
                    log.warning("task.heartbeat_failed", code=e.code, error=e.message)
                    alive = True
                if not alive:
                    log.error("task.abandoned", message="Step Functions no longer waits for this task: stopping")
                    os._exit(EXIT_ABANDONED)
            renew = env.lease if env is not None else None
            if renew is not None:
                try:
                    renew()
                except Exception as e:  # lost: the merge's fence stops it before its next write
                    log.warning("task.lease_renewal_failed", error=str(e))
            wait = settings.heartbeat_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("task.deadline", seconds=settings.task_deadline_s, message="deadline passed: stopping")
                    os._exit(EXIT_ABANDONED)
                wait = min(wait, left)
            if stop.wait(wait):
                return

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


#: Exit status of a task that stopped because Step Functions no longer waits for it, or its deadline passed.
EXIT_ABANDONED = 3


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load()
    configure(settings.log_level)
    local = Path(args.staging) if args.staging else None
    env: Env | None = None
    callback: Callback | None = None
    event = getattr(args, "event", None)
    source = event.source if event is not None else getattr(args, "source", None)
    with context(execution=settings.execution_id, stage=args.command, file=source):
        try:
            remote = args.command in ("merge", "transform", "quarantine") and local is None
            if str(getattr(args, "source", "")).startswith("s3://") or getattr(args, "event", None) or remote:
                env = Env(settings)
            callback = _callback(env, settings)
            commands: dict[str, Callable[[], dict[str, Any]]] = {
                "validate": lambda: (
                    validate_event(args.event, settings, env)
                    if args.event
                    else validate(args.source, settings, env, local)
                ),
                "transform": lambda: transform(args.file_id, settings, env, local),
                "quarantine": lambda: quarantine(args.file_id, settings, env),
                "merge": lambda: run_merge(
                    settings, env, local, (args.date_from, args.date_to) if args.date_from else None
                ),
            }
            with _heartbeat(env, callback, settings):
                result = commands[args.command]()
        except ShopKpiError as e:
            log.error("task.failed", code=e.code, message=e.message)
            return _report_result(None, e, callback)
        except Exception as e:  # a bug: report it (terminal) rather than leave the state waiting for a heartbeat
            log.error("task.crashed", exc_info=True, error=repr(e))
            return _report_result(None, InternalError(f"{type(e).__name__}: {e}"), callback)
        return _report_result(result, None, callback)


if __name__ == "__main__":
    raise SystemExit(main())
