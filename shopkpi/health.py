"""Pipeline health for the dashboard: what ran, what was refused, what waits, and when the KPIs last moved.

One :func:`snapshot` reads it all through the ``processor/aws`` adapters the other commands use, found from the
stack's outputs (``orchestration.operations.Stack``): recent Step Functions executions, the ledger's file outcomes
and newest merge record, and the depth of the buffer and of the two dead-letter queues. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from orchestration.operations import Stack
from processor.aws.control import Queue
from processor.aws.dynamo import FileRecord, RunRecord


class Execution(msgspec.Struct, kw_only=True, frozen=True):
    """One Step Functions execution: a batch of files, or a reprocess."""

    name: str
    status: str  # RUNNING | SUCCEEDED | FAILED | TIMED_OUT | ABORTED
    started_at: str | None
    stopped_at: str | None
    seconds: float | None  # None while it runs


class FileIssue(msgspec.Struct, kw_only=True, frozen=True):
    """A file that was refused, failed, or accepted with some of its rows rejected."""

    file: str  # its S3 key (or file id when the record has no source)
    outcome: str  # rejected | failed | accepted
    reason: str | None  # the file-level reason code, or the failure's error code
    message: str | None
    rows: int | None
    rejected_rows: int | None
    rejects_by_reason: dict[str, int]
    rejects: str | None  # where the rejected rows are kept
    updated_at: str | None


class Health(msgspec.Struct, kw_only=True, frozen=True):
    executions: list[Execution]
    files: list[FileIssue]
    queued_events: int  # file events in the buffer, waiting for (or handled by) the trigger
    dead_letters: dict[str, int]  # queue -> messages: events the trigger gave up on, inputs of failed executions
    waiting: dict[str, int]  # items waiting for their order or product, as of the newest merge
    orphans: dict[str, int]  # of those, waiting past the orphan grace period
    late_rejects: dict[str, int]  # items the merge rejects as the state stands (user_mismatch)
    last_merge: str | None  # when the newest merge ended: the KPIs are at least that fresh
    last_merge_published: int | None  # KPI items that merge wrote or removed
    last_file: str | None  # when the newest file outcome was recorded


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def executions(found: Sequence[dict[str, Any]], limit: int) -> list[Execution]:
    """The newest ``limit`` executions of a ``list_executions`` answer, newest first, with their duration."""
    newest = sorted(found, key=lambda e: e["startDate"], reverse=True)[:limit]
    return [
        Execution(
            name=str(e["name"]),
            status=str(e["status"]),
            started_at=_iso(e.get("startDate")),
            stopped_at=_iso(e.get("stopDate")),
            seconds=round((e["stopDate"] - e["startDate"]).total_seconds(), 1) if e.get("stopDate") else None,
        )
        for e in newest
    ]


def file_issues(records: Sequence[FileRecord], limit: int) -> list[FileIssue]:
    """Refused and failed files, and accepted files that lost rows, newest first."""
    issues = [r for r in records if r.outcome != "accepted" or (r.rejected_rows or 0) > 0]
    issues.sort(key=lambda r: r.updated_at or "", reverse=True)
    return [
        FileIssue(
            file=(r.source or "").split("/", 3)[-1] if r.source else str(r.file_id),
            outcome=r.outcome or "unknown",
            reason=r.reason or r.error_code,
            message=r.message or r.error_detail,
            rows=r.rows,
            rejected_rows=r.rejected_rows,
            rejects_by_reason=dict(r.rejects_by_reason or {}),
            rejects=r.rejects,
            updated_at=r.updated_at,
        )
        for r in issues[:limit]
    ]


def _newest_merge(runs: Sequence[RunRecord]) -> RunRecord | None:
    return next((r for r in runs if r.summary is not None), None)


def snapshot(stack: Stack, limit: int = 10) -> Health:
    """The pipeline's health now: the newest ``limit`` executions and file issues, queues, and the newest merge."""
    found = stack.workflow.executions(limit=limit)
    # Accepted files that lost rows are rarer than accepted files: look further back for them.
    records = [
        *stack.ledger.files(limit=limit, outcome="rejected"),
        *stack.ledger.files(limit=limit, outcome="failed"),
        *stack.ledger.files(limit=limit * 5, outcome="accepted"),
    ]
    latest_file = max((r.updated_at or "" for r in records), default="") or None
    merge = _newest_merge(stack.ledger.runs(limit=5))
    summary: dict[str, Any] = (merge.summary or {}) if merge else {}
    return Health(
        executions=executions(found, limit),
        files=file_issues(records, limit),
        queued_events=stack.buffer.depth(),
        dead_letters={
            "buffer": Queue(stack.clients.sqs, stack.outputs.buffer_dlq_url).depth(),
            "workflow": Queue(stack.clients.sqs, stack.outputs.workflow_dlq_url).depth(),
        },
        waiting=dict(summary.get("pending") or {}),
        orphans=dict(summary.get("orphans") or {}),
        late_rejects=dict(summary.get("late_rejects") or {}),
        last_merge=(merge.ended_at or merge.updated_at) if merge else None,
        last_merge_published=summary.get("published") if merge else None,
        last_file=latest_file,
    )
