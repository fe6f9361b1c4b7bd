"""What the command line does against a deployed stack (embedded or AWS): ingest, wait, read KPIs, runs, rejects,
reprocess. Each function is one command's body and returns typed records (the CLI prints them as tables or JSON);
the stack is found from its CloudFormation outputs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec

from processor.aws import make_clients
from processor.aws.clients import Clients
from processor.aws.cloudformation import StackOutputs, Stacks
from processor.aws.control import Queue, Workflow
from processor.aws.dynamo import FileRecord, KpiTables, Ledger, RunRecord
from processor.aws.s3 import S3Store
from processor.errors import ConfigError
from processor.landing import S3Landing
from processor.model import CategoryKpi, OrderKpi
from processor.pipeline import expand
from processor.schema import detect_dataset
from processor.settings import Settings
from processor.stage import file_id_for

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass
class Stack:
    """Clients and the stack's outputs: everything a command needs."""

    settings: Settings
    clients: Clients
    outputs: StackOutputs

    @classmethod
    def connect(cls, settings: Settings) -> Stack:
        clients = make_clients(settings)
        outputs = StackOutputs.from_outputs(Stacks(clients.cloudformation).outputs(settings.stack))
        return cls(settings, clients, outputs)

    @property
    def s3(self) -> S3Store:
        return S3Store(self.clients.s3, self.outputs.bucket)

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.clients.dynamodb, self.outputs.ledger_table)

    @property
    def tables(self) -> KpiTables:
        return KpiTables(
            self.clients.dynamodb,
            self.outputs.order_table,
            self.outputs.category_table,
            threads=self.settings.writer_threads,
        )

    @property
    def workflow(self) -> Workflow:
        return Workflow(self.clients.stepfunctions, self.outputs.state_machine_arn)

    @property
    def buffer(self) -> Queue:
        return Queue(self.clients.sqs, self.outputs.buffer_queue_url)


@dataclass
class Landed:
    path: Path
    key: str
    file_id: str
    source: str = ""  # s3://bucket/key
    landed_at: str = ""  # the object's LastModified (ISO 8601, UTC)


def landing_keys(paths: list[Path], prefix: str = "incoming") -> list[tuple[Path, str]]:
    """Where each file (directories read recursively) lands: ``<prefix>/<dataset>/<path>``.

    ``<path>`` is the file's path under the directory it was found in (its name, for a file given itself), so
    ``day1/orders.csv`` and ``day2/orders.csv`` land as two objects, not one overwriting the other; a leading
    folder named after the dataset, or a local ``incoming/<dataset>/``, is not repeated. The dataset is read from
    the whole local path, as ``shopkpi process`` reads it (``.../incoming/orders/part-0001.csv`` is orders). Two
    files that would still land at the same key (two files of one name given one by one, or two directories with
    the same layout) raise :class:`ConfigError` before anything is uploaded: the second would silently replace the
    first."""
    planned: list[tuple[Path, str]] = []
    by_key: dict[str, Path] = {}
    for given in paths:
        files = expand([given])
        for path in files:
            dataset = detect_dataset(path.as_posix())
            name = dataset.name if dataset else "unknown"
            rel = list(path.relative_to(given).parts) if given.is_dir() else [path.name]
            lower = [part.lower() for part in rel[:-1]]
            for i in range(len(lower) - 1):  # a local copy of a landing area: incoming/<dataset>/ is not repeated
                if lower[i] == prefix.lower() and lower[i + 1] == name:
                    rel = rel[i + 2 :]
                    break
            else:
                if lower and lower[0] == name:
                    rel = rel[1:]
            key = "/".join([prefix, name, *rel])
            if key in by_key and by_key[key] != path:
                raise ConfigError(
                    f"{by_key[key]} and {path} would both land at {key}, the second replacing the first: "
                    "rename one, or pass the folder that holds both"
                )
            if key not in by_key:
                by_key[key] = path
                planned.append((path, key))
    return planned


def ingest(stack: Stack, paths: list[Path], prefix: str = "incoming") -> list[Landed]:
    """Upload files (directories recursively) to the keys :func:`landing_keys` gives them, as a producer would."""
    return upload(stack, landing_keys(paths, prefix))


def upload(stack: Stack, planned: list[tuple[Path, str]]) -> list[Landed]:
    """Upload each file of :func:`landing_keys`'s plan to its key."""
    landed = []
    for path, key in planned:
        stack.s3.upload(path, key)
        info = stack.s3.head(key)
        source = stack.s3.uri(key)
        landed.append(Landed(path, key, file_id_for(source, info.etag), source, _iso(info.last_modified)))
    return landed


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(stack: Stack, item: Landed) -> FileRecord | None:
    """The ledger's record of a landed file: its outcome, or the failure the workflow recorded after this upload
    (a task that crashed, hung or could not start before the file had an id)."""
    found = stack.ledger.get_file(item.file_id)
    if found is not None:
        return found
    failure = stack.ledger.get_failure(item.source) if item.source else None
    # Second precision: the landing time comes from S3, the failure time from Step Functions.
    if failure is not None and (failure.updated_at or "")[:19] >= item.landed_at[:19]:
        return failure
    return None


@dataclass(frozen=True)
class WaitStatus:
    """What the pipeline has done with the files being watched, at one poll (what the progress display shows)."""

    elapsed_s: float
    files: int  # files to watch (landed, or still to land)
    landed: int
    validated: int  # landed files with an outcome: accepted, rejected, or failed
    merged: int  # accepted files whose execution succeeded (its merge ran: their KPIs are published)
    running: int  # executions running
    queued: int  # landing events waiting in the buffer (or in flight to an execution)

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.queued == 0


OnStatus = Callable[[WaitStatus], None]


class Watch:
    """Polls what the pipeline has done with some landed files. Each poll lists the running executions (at most
    100: enough to tell idle from busy), reads the buffer's depth, describes each execution once it has ended, and
    reads the ledger record of every file whose execution has not ended (a record can still change then: a file
    accepted by validation is recorded as failed when its transform fails)."""

    def __init__(self, stack: Stack, files: Iterable[Landed] = (), *, expected: int = 0) -> None:
        self.stack = stack
        self.started = time.monotonic()
        self.landed: list[Landed] = []
        self.records: dict[str, FileRecord] = {}  # file id -> its latest record
        self.ended: dict[str, str] = {}  # execution name -> its final status
        self.final: set[str] = set()  # file ids whose record was read after their execution ended
        self.expected = expected  # files still to land count too (the demo lands while it watches)
        for f in files:
            self.add(f)

    def add(self, item: Landed) -> None:
        self.landed.append(item)

    @property
    def pending(self) -> list[Landed]:
        """The files with no outcome yet."""
        return [f for f in self.landed if f.file_id not in self.records]

    def poll(self) -> WaitStatus:
        running = {str(e["name"]) for e in self.stack.workflow.executions("RUNNING", limit=100)}
        prefix = self.stack.outputs.state_machine_arn.replace(":stateMachine:", ":execution:", 1)
        for name in {r.execution for r in self.records.values() if r.execution} - running - self.ended.keys():
            self.ended[name] = str(self.stack.workflow.describe(f"{prefix}:{name}")["status"])
        for f in self.landed:
            if f.file_id not in self.final and (found := record(self.stack, f)) is not None:
                self.records[f.file_id] = found
                if found.execution in self.ended:  # ended before this read: the record is final
                    self.final.add(f.file_id)
        merged = [r for r in self.records.values() if r.outcome == "accepted" and self.ended.get(r.execution or "")]
        return WaitStatus(
            elapsed_s=time.monotonic() - self.started,
            files=max(self.expected, len(self.landed)),
            landed=len(self.landed),
            validated=len(self.records),
            merged=sum(self.ended[r.execution or ""] == "SUCCEEDED" for r in merged),
            running=len(running),
            queued=self.stack.buffer.depth(),
        )

    def until_idle(self, timeout_s: float, settle_s: float = 2.0, on_status: OnStatus | None = None) -> bool:
        """Poll until every file has an outcome (or a recorded failure) and the pipeline has been idle for
        ``settle_s``; False when ``timeout_s`` ran out first."""
        deadline = time.monotonic() + timeout_s
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            status = self.poll()
            if on_status is not None:
                on_status(status)
            if not self.pending and status.idle:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle_s:
                    return True
            else:
                quiet_since = None
            time.sleep(0.5)
        return False


def wait(
    stack: Stack,
    timeout_s: float,
    files: Sequence[Landed] = (),
    settle_s: float = 2.0,
    on_status: OnStatus | None = None,
) -> bool:
    """Block until the given files have an outcome (or a recorded failure) and the pipeline is idle for
    ``settle_s``; ``on_status`` gets each poll's :class:`WaitStatus` (about two a second)."""
    return Watch(stack, files).until_idle(timeout_s, settle_s, on_status)


class FileOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """A landed file (its key in the bucket and its id) and its ledger record, None while it has none."""

    file: str
    file_id: str
    record: FileRecord | None = None

    @property
    def outcome(self) -> str:
        """``accepted``, ``rejected``, ``failed``, or ``unknown`` while the ledger has nothing."""
        return (self.record.outcome if self.record is not None else None) or "unknown"


def outcomes(stack: Stack, landed: Sequence[Landed]) -> list[FileOutcome]:
    """Each landed file with its ledger record (or the failure the workflow recorded for it)."""
    return [FileOutcome(file=item.key, file_id=item.file_id, record=record(stack, item)) for item in landed]


def failed_executions(stack: Stack, results: Sequence[FileOutcome]) -> list[dict[str, Any]]:
    """The executions named in these files' records that did not succeed (a merge that failed after its retries,
    a file that failed...), with their error and cause."""
    names = sorted({r.record.execution for r in results if r.record is not None and r.record.execution})
    prefix = stack.outputs.state_machine_arn.replace(":stateMachine:", ":execution:", 1)
    out = []
    for name in names:
        described = stack.workflow.describe(f"{prefix}:{name}")
        if described["status"] not in ("SUCCEEDED", "RUNNING"):
            out.append({k: described.get(k) for k in ("name", "status", "error", "cause")})
    return out


def daily(stack: Stack, date_from: str | None, date_to: str | None) -> list[OrderKpi]:
    return stack.tables.daily(date_from, date_to)


def category(stack: Stack, name: str | None, date_from: str | None, date_to: str | None) -> list[CategoryKpi]:
    return stack.tables.category(name, date_from, date_to)


def check_date(text: str) -> str:
    """``text`` when it is a calendar date written YYYY-MM-DD; else :class:`ConfigError` saying how to write one."""
    try:
        if _DATE.fullmatch(text):
            return date.fromisoformat(text).isoformat()
    except ValueError:
        pass
    raise ConfigError(f"{text!r} is not a date: write YYYY-MM-DD")


def check_range(date_from: str | None, date_to: str | None) -> None:
    """Both bounds (each optional) are dates and ``date_from`` is not after ``date_to``; else :class:`ConfigError`
    naming the option and the fix."""
    for option, value in (("--from", date_from), ("--to", date_to)):
        if value is not None:
            try:
                check_date(value)
            except ConfigError as e:
                raise ConfigError(f"{option}: {e.message}") from None
    if date_from is not None and date_to is not None and date_from > date_to:
        raise ConfigError(f"--from {date_from} is after --to {date_to}: swap them")


def stored_years(stack: Stack) -> list[str]:
    """The years that hold order KPIs (empty: nothing published yet)."""
    return stack.tables.years()


def category_names(stack: Stack) -> list[str]:
    """The category names of the newest dates with KPIs (the names to offer when a category matched nothing)."""
    return stack.tables.category_names()


def reprocess(stack: Stack, date_from: str, date_to: str) -> str:
    """Start an execution that recomputes the KPIs of the range; its ARN."""
    check_range(date_from, date_to)
    return stack.workflow.start({"reprocess": {"from": date_from, "to": date_to}}, name_hint="reprocess")


@dataclass(frozen=True)
class KpiSnapshot:
    """The stored KPI items of a date range at one moment."""

    daily: dict[str, OrderKpi]  # by order_date
    category: dict[tuple[str, str], CategoryKpi]  # by (category, order_date)


def snapshot(stack: Stack, date_from: str, date_to: str) -> KpiSnapshot:
    """Read the range's KPI items (a day holds one order item and one per category: small even for a year)."""
    return KpiSnapshot(
        {k.order_date: k for k in stack.tables.daily(date_from, date_to)},
        {(k.category, k.order_date): k for k in stack.tables.category(None, date_from, date_to)},
    )


class ItemChanges(msgspec.Struct, frozen=True, kw_only=True):
    """How the KPI items of one table moved between two snapshots."""

    rewritten: int = 0  # stored before and after, with other values
    added: int = 0
    removed: int = 0


class KpiChanges(msgspec.Struct, frozen=True, kw_only=True):
    """What a reprocess changed in the KPI store: the dates whose items moved, and the items per table."""

    dates: list[str]
    daily: ItemChanges
    category: ItemChanges
    unchanged: int  # items stored before and after with the same values

    @property
    def changed(self) -> bool:
        return bool(self.dates)


def _item_changes(before: dict[Any, Any], after: dict[Any, Any]) -> tuple[ItemChanges, set[Any], int]:
    moved = {k for k in before.keys() & after.keys() if before[k] != after[k]}
    added, removed = after.keys() - before.keys(), before.keys() - after.keys()
    changes = ItemChanges(rewritten=len(moved), added=len(added), removed=len(removed))
    return changes, moved | added | removed, len(before.keys() & after.keys()) - len(moved)


def kpi_changes(before: KpiSnapshot, after: KpiSnapshot) -> KpiChanges:
    """The difference of two snapshots of the same range, item by item (values compared exactly)."""
    daily, days, same_daily = _item_changes(before.daily, after.daily)
    category, pairs, same_category = _item_changes(before.category, after.category)
    dates = sorted(set(days) | {d for _, d in pairs})
    return KpiChanges(dates=dates, daily=daily, category=category, unchanged=same_daily + same_category)


class ReprocessResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a reprocess execution ended and what it changed."""

    execution: str
    status: str  # the execution's: SUCCEEDED, FAILED, TIMED_OUT, ABORTED, RUNNING
    seconds: float | None  # from start to stop (None while it runs)
    changes: KpiChanges  # the range's KPI items before the start against after the end
    files_merged: int | None = None  # files the merge applied besides the range (the run record's count)
    rounds: int | None = None  # merge rounds (a merge handed over by another adds one)


def reprocess_result(stack: Stack, arn: str, before: KpiSnapshot, date_from: str, date_to: str) -> ReprocessResult:
    """The ended (or still running) execution's status and duration, its merge run record's counts, and the KPI
    items of the range compared with ``before``. Another execution merging new files at the same time moves items
    too: the comparison shows what the store now holds, whoever wrote it."""
    described = stack.workflow.describe(arn)
    name = arn.rsplit(":", 1)[-1]
    run = stack.ledger.get_run(name)
    summary = (run.summary if run is not None else None) or {}
    changes = kpi_changes(before, snapshot(stack, date_from, date_to))
    return ReprocessResult(
        execution=name,
        status=str(described["status"]),
        seconds=_seconds(described.get("startDate"), described.get("stopDate")),
        changes=changes,
        files_merged=summary.get("files_merged"),
        rounds=summary.get("rounds"),
    )


def _seconds(start: object, stop: object) -> float | None:
    if isinstance(start, datetime) and isinstance(stop, datetime):
        return round((stop - start).total_seconds(), 3)
    return None


def _iso_or_none(at: object) -> str | None:
    return at.astimezone(UTC).isoformat() if isinstance(at, datetime) else None


class ExecutionRun(msgspec.Struct, frozen=True, kw_only=True):
    """One execution of the workflow: when it ran, the files it validated by outcome, and what its merge did."""

    name: str
    status: str
    started_at: str | None  # ISO 8601, UTC
    stopped_at: str | None  # None while it runs
    seconds: float | None  # stopped - started (None while it runs)
    accepted: int = 0  # files this execution validated, by the outcome the ledger holds now
    rejected: int = 0
    failed: int = 0
    files_merged: int | None = None  # files its merge applied (None: it ran no merge of its own)
    dates: int | None = None  # dates whose KPIs its merge published or removed


#: At most this many file records are read to count the files of the listed executions.
FILES_READ = 10_000


def _files_since(ledger: Ledger, since: str) -> list[FileRecord]:
    """The file records updated since ``since`` (ISO 8601), newest first, at most :data:`FILES_READ`: the ledger
    lists files newest first, so read a window and widen it until it reaches back far enough."""
    window = 200
    while True:
        found = ledger.files(limit=window)
        if len(found) < window or (found[-1].updated_at or "") < since or window >= FILES_READ:
            return [f for f in found if (f.updated_at or "") >= since]
        window = min(window * 4, FILES_READ)


def runs(stack: Stack, limit: int = 20) -> tuple[list[ExecutionRun], list[FileRecord]]:
    """Recent executions (Step Functions), newest first, with their duration, file counts and merge, and the recent
    file outcomes (ledger)."""
    executions = stack.workflow.executions(limit=limit)
    starts = [s for e in executions if (s := _iso_or_none(e.get("startDate")))]
    files = _files_since(stack.ledger, min(starts)) if starts else []
    counts: dict[tuple[str, str], int] = {}
    for f in files:
        key = (f.execution or "", f.outcome or "")
        counts[key] = counts.get(key, 0) + 1
    out = []
    for e in executions:
        name = str(e["name"])
        run: RunRecord | None = stack.ledger.get_run(name)
        summary = (run.summary if run is not None else None) or {}
        out.append(
            ExecutionRun(
                name=name,
                status=str(e["status"]),
                started_at=_iso_or_none(e.get("startDate")),
                stopped_at=_iso_or_none(e.get("stopDate")),
                seconds=_seconds(e.get("startDate"), e.get("stopDate")),
                accepted=counts.get((name, "accepted"), 0),
                rejected=counts.get((name, "rejected"), 0),
                failed=counts.get((name, "failed"), 0),
                files_merged=summary.get("files_merged"),
                dates=len(summary["dates"]) if "dates" in summary else None,
            )
        )
    return out, files[:limit] if starts else stack.ledger.files(limit=limit)


def _accepted_with_rejected_rows(ledger: Ledger, limit: int) -> list[FileRecord]:
    """The newest ``limit`` accepted files that had rows rejected, among the newest :data:`FILES_READ` accepted
    files (the ledger cannot filter on the rejected rows, so read a window and widen it)."""
    window = max(4 * limit, 100)
    while True:
        found = ledger.files(limit=window, outcome="accepted")
        hits = [f for f in found if f.rejected_rows]
        if len(hits) >= limit or len(found) < window or window >= FILES_READ:
            return hits[:limit]
        window = min(window * 4, FILES_READ)


def _kept(stack: Stack, f: FileRecord) -> FileRecord:
    """The record with where its rows and report are kept and its file-level message, from its validation report
    (``reports/<file_id>/report.json``): the rejected-rows CSV is there for every file that had rejected rows,
    accepted or not (a quarantined file's are also copied beside it in ``rejected/``)."""
    report = S3Landing(stack.s3).get_report(f.file_id) if f.file_id else None
    if report is None:
        return f
    warnings = [str(w) for w in report.get("warnings") or []]
    message = f.message or report.get("message") or "; ".join(warnings) or None
    return msgspec.structs.replace(
        f, rejects=f.rejects or report.get("rejects"), report=f.report or report.get("report"), message=message
    )


def rejects(stack: Stack, limit: int = 20) -> list[FileRecord]:
    """Files with rejected rows, newest first: files rejected whole by validation, files whose processing failed
    after its retries, and accepted files some of whose rows were rejected; each with its rejected rows by reason,
    its file-level message, and the S3 URIs of its rejected rows (CSV) and of its report."""
    ledger = stack.ledger
    found = (
        ledger.files(limit=limit, outcome="rejected")
        + ledger.files(limit=limit, outcome="failed")
        + _accepted_with_rejected_rows(ledger, limit)
    )
    newest = sorted(found, key=lambda f: f.updated_at or "", reverse=True)[:limit]
    return [_kept(stack, f) for f in newest]


def merge_rejects(stack: Stack) -> dict[str, Any]:
    """Items the merge rejects as the state stands (``user_mismatch``) and where their rows are kept."""
    from processor.state import HEAD_KEY, Head

    data = stack.s3.get_bytes(f"staging/{HEAD_KEY}") if stack.s3.exists(f"staging/{HEAD_KEY}") else None
    head = msgspec.json.decode(data, type=Head) if data else Head()
    return {"user_mismatch": head.mismatched, "rows": [stack.s3.uri(f"staging/{k}") for k in head.rejects]}
