"""What the command line does against a deployed stack (embedded or AWS): ingest, wait, read KPIs, runs, rejects,
reprocess. Each function is one command's body; the stack is found from its CloudFormation outputs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec

from processor.aws import make_clients
from processor.aws.clients import Clients
from processor.aws.cloudformation import StackOutputs, Stacks
from processor.aws.control import Queue, Workflow
from processor.aws.dynamo import FileRecord, KpiTables, Ledger
from processor.aws.s3 import S3Store
from processor.errors import ConfigError
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


def ingest(stack: Stack, paths: list[Path], prefix: str = "incoming") -> list[Landed]:
    """Upload files (directories recursively) to ``incoming/<dataset>/<name>`` as a producer would."""
    landed = []
    for path in expand(paths):
        dataset = detect_dataset(path.name)
        key = f"{prefix}/{dataset.name if dataset else 'unknown'}/{path.name}"
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


def idle(stack: Stack) -> bool:
    """No event waiting or in flight in the buffer, and no execution running."""
    return stack.buffer.depth() == 0 and not stack.workflow.executions("RUNNING", limit=1)


def wait(stack: Stack, timeout_s: float, files: Sequence[Landed] = (), settle_s: float = 2.0) -> bool:
    """Block until the given files have an outcome (or a recorded failure) and the pipeline is idle for
    ``settle_s``."""
    deadline = time.monotonic() + timeout_s
    pending = list(files)
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        pending = [f for f in pending if record(stack, f) is None]
        if not pending and idle(stack):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= settle_s:
                return True
        else:
            quiet_since = None
        time.sleep(0.5)
    return False


def outcomes(stack: Stack, landed: list[Landed]) -> list[dict[str, Any]]:
    """One JSON-ready row per landed file: its key (``file``), its id and its ledger record's fields (``outcome``
    ``unknown`` when it has none yet)."""
    out = []
    for item in landed:
        found = record(stack, item)
        fields = msgspec.to_builtins(found) if found is not None else {"outcome": "unknown"}
        out.append({"file": item.key, "file_id": item.file_id, **fields})
    return out


def failed_executions(stack: Stack, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The executions named in these file records that did not succeed (a merge that failed after its retries,
    a file that failed...), with their error and cause."""
    names = sorted({str(r["execution"]) for r in records if r.get("execution")})
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
    check_range(date_from, date_to)
    return stack.workflow.start({"reprocess": {"from": date_from, "to": date_to}}, name_hint="reprocess")


def runs(stack: Stack, limit: int = 20) -> tuple[list[dict[str, Any]], list[FileRecord]]:
    """Recent executions (Step Functions) and recent file outcomes (ledger)."""
    executions = stack.workflow.executions(limit=limit)
    return executions, stack.ledger.files(limit=limit)


def rejects(stack: Stack, limit: int = 50) -> list[FileRecord]:
    """Files rejected by validation and files whose processing failed after its retries, newest first."""
    found = stack.ledger.files(limit=limit, outcome="rejected") + stack.ledger.files(limit=limit, outcome="failed")
    return sorted(found, key=lambda f: f.updated_at or "", reverse=True)[:limit]


def merge_rejects(stack: Stack) -> dict[str, Any]:
    """Items the merge rejects as the state stands (``user_mismatch``) and where their rows are kept."""
    from processor.merge import HEAD_KEY, Head

    data = stack.s3.get_bytes(f"staging/{HEAD_KEY}") if stack.s3.exists(f"staging/{HEAD_KEY}") else None
    head = msgspec.json.decode(data, type=Head) if data else Head()
    return {"user_mismatch": head.mismatched, "rows": [stack.s3.uri(f"staging/{k}") for k in head.rejects]}
