"""What the command line does against a deployed stack (embedded or AWS): ingest, wait, read KPIs, runs, rejects,
reprocess. Each function is one command's body; the stack is found from its CloudFormation outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from processor.aws import make_clients
from processor.aws.clients import Clients
from processor.aws.control import Queue, StackOutputs, Stacks, Workflow
from processor.aws.dynamo import KpiTables, Ledger
from processor.aws.s3 import S3Store
from processor.errors import ConfigError
from processor.model import CategoryKpi, OrderKpi
from processor.pipeline import expand
from processor.schema import detect_dataset
from processor.settings import Settings
from processor.stage import file_id_for


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


def ingest(stack: Stack, paths: list[Path], prefix: str = "incoming") -> list[Landed]:
    """Upload files (directories recursively) to ``incoming/<dataset>/<name>`` as a producer would."""
    landed = []
    for path in expand(paths):
        dataset = detect_dataset(path.name)
        key = f"{prefix}/{dataset.name if dataset else 'unknown'}/{path.name}"
        stack.s3.upload(path, key)
        etag = stack.s3.head(key).etag
        landed.append(Landed(path, key, file_id_for(f"s3://{stack.outputs.bucket}/{key}", etag)))
    return landed


def idle(stack: Stack) -> bool:
    """No event waiting or in flight in the buffer, and no execution running."""
    return stack.buffer.depth() == 0 and not stack.workflow.executions("RUNNING", limit=1)


def wait(stack: Stack, timeout_s: float, file_ids: list[str] | None = None, settle_s: float = 2.0) -> bool:
    """Block until the given files have an outcome (if any) and the pipeline is idle for ``settle_s``."""
    deadline = time.monotonic() + timeout_s
    pending = set(file_ids or [])
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        pending = {f for f in pending if stack.ledger.get_file(f) is None}
        if not pending and idle(stack):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= settle_s:
                return True
        else:
            quiet_since = None
        time.sleep(0.5)
    return False


def outcomes(stack: Stack, landed: list[Landed]) -> list[dict[str, Any]]:
    out = []
    for item in landed:
        record = stack.ledger.get_file(item.file_id) or {"outcome": "unknown"}
        out.append({"file": item.key, "file_id": item.file_id, **record})
    return out


def daily(stack: Stack, date_from: str | None, date_to: str | None) -> list[OrderKpi]:
    return stack.tables.daily(date_from, date_to)


def category(stack: Stack, name: str | None, date_from: str | None, date_to: str | None) -> list[CategoryKpi]:
    return stack.tables.category(name, date_from, date_to)


def reprocess(stack: Stack, date_from: str, date_to: str) -> str:
    if date_from > date_to:
        raise ConfigError(f"--from {date_from} is after --to {date_to}")
    return stack.workflow.start({"reprocess": {"from": date_from, "to": date_to}}, name_hint="reprocess")


def runs(stack: Stack, limit: int = 20) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Recent executions (Step Functions) and recent file outcomes (ledger)."""
    executions = stack.workflow.executions(limit=limit)
    return executions, stack.ledger.files(limit=limit)


def rejects(stack: Stack, limit: int = 50) -> list[dict[str, Any]]:
    return stack.ledger.files(limit=limit, outcome="rejected")


def merge_rejects(stack: Stack) -> dict[str, Any]:
    """Items the merge rejects as the state stands (``user_mismatch``) and where their rows are kept."""
    from processor.merge import HEAD_KEY, Head

    data = stack.s3.get_bytes(f"staging/{HEAD_KEY}") if stack.s3.exists(f"staging/{HEAD_KEY}") else None
    head = msgspec.json.decode(data, type=Head) if data else Head()
    return {"user_mismatch": head.mismatched, "rows": [stack.s3.uri(f"staging/{k}") for k in head.rejects]}
