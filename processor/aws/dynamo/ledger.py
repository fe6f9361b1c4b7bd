"""The ledger's records: file outcomes (written by the validate task, and by the workflow's failure path) and run
records, as typed :class:`FileRecord` and :class:`RunRecord`. The merge lock and the generation counter live in the
same table (:mod:`processor.aws.dynamo.merge_lock`); the item layout is in :mod:`processor.aws.dynamo`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from processor.aws.clients import aws_call
from processor.aws.dynamo.batch import Item, decode, encode, get_item, iso_now
from processor.aws.dynamo.tables import BY_KIND
from processor.aws.s3 import event_key, join_uri, split_uri
from processor.model import ValidationResult

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

_OUTCOMES = ("accepted", "rejected")
#: Outcomes a file record can show: ``failed`` is written by the workflow's failure path, not by a task.
_LISTED = (*_OUTCOMES, "failed")
#: Attributes that place an item in the table and its index, never part of a record.
_INTERNAL = ("pk", "sk", "kind")
S = TypeVar("S", bound=msgspec.Struct)


class FileRecord(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """What the ledger holds about one file: its validation outcome (the fields of
    :class:`~processor.model.ValidationResult`, ``execution`` and ``updated_at``), or the failure the workflow
    recorded (``outcome="failed"``, ``error_code``, ``error_detail``, ``execution``, ``updated_at``; with ``source``
    when the file never had an id). Every field is optional: a field the item lacks is ``None`` and is left out of
    the JSON (``msgspec.to_builtins``), so a record encodes to exactly the attributes stored."""

    file_id: str | None = None
    source: str | None = None
    dataset: str | None = None
    outcome: str | None = None  # "accepted" | "rejected" | "failed"
    reason: str | None = None
    message: str | None = None
    rows: int | None = None
    valid_rows: int | None = None
    rejected_rows: int | None = None
    rejects_by_reason: dict[str, int] | None = None
    arrival: str | None = None
    segment: str | None = None
    rejects: str | None = None
    report: str | None = None
    seconds: int | float | None = None
    execution: str | None = None  # the Step Functions execution's name
    updated_at: str | None = None  # ISO-8601 UTC
    error_code: str | None = None
    error_detail: str | None = None


class RunRecord(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """One merge run, as recorded at its end."""

    execution_id: str
    status: str
    started_at: str
    ended_at: str | None = None
    summary: dict[str, Any] | None = None
    updated_at: str | None = None


def _as(item: Item, kind: type[S]) -> S:
    """A ledger item as its record type (the table's own key and index attributes left out)."""
    return msgspec.convert({k: v for k, v in decode(item).items() if k not in _INTERNAL}, kind)


def _failure_key(source: str) -> Item:
    """Key of the failure record of an S3 object, as the state machine's RecordFailedSource state writes it: the
    SHA-256 of its location in the workflow's input (keys URL-encoded as in S3 events; hashed because an encoded key
    can pass DynamoDB's 2,048-byte limit on a partition key)."""
    bucket, key = split_uri(source)
    digest = hashlib.sha256(join_uri(bucket, event_key(key)).encode()).hexdigest()
    return encode({"pk": f"SOURCE#{digest}", "sk": "FAILED"})


class Ledger:
    """File outcomes and run records.

    ``clock`` (epoch seconds) is injectable so ``updated_at`` can be tested without sleeping.
    """

    def __init__(self, client: DynamoDBClient, table: str, *, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.table = table
        self._clock = clock

    def _put(self, record: dict[str, Any]) -> None:
        with aws_call("dynamodb.put_item", table=self.table, pk=record["pk"]):
            self.client.put_item(TableName=self.table, Item=encode(record))

    def _get(self, key: Item) -> Item | None:
        return get_item(self.client, self.table, key, pk=key["pk"]["S"])

    def _recent(self, kind: str, limit: int) -> list[Item]:
        """The newest ``limit`` items of one GSI partition, newest first."""
        out: list[Item] = []
        request: dict[str, Any] = {
            "TableName": self.table,
            "IndexName": BY_KIND,
            "KeyConditionExpression": "#k = :k",
            "ExpressionAttributeNames": {"#k": "kind"},
            "ExpressionAttributeValues": encode({":k": kind}),
            "ScanIndexForward": False,
        }
        while len(out) < limit:
            with aws_call("dynamodb.query", table=self.table, index=BY_KIND, kind=kind):
                r = self.client.query(**request, Limit=limit - len(out))
            out.extend(dict(i) for i in r.get("Items", []))
            if "LastEvaluatedKey" not in r:
                break
            request["ExclusiveStartKey"] = r["LastEvaluatedKey"]
        return out

    # --- files ----------------------------------------------------------------------------------------------
    def record_file(self, result: ValidationResult, execution: str) -> None:
        """Record (or replace, when a file is processed again) the outcome of one file.

        A failure the workflow recorded for the same S3 object before it was validated is cleared: it has an outcome
        now.
        """
        if result.outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {_OUTCOMES}, got {result.outcome!r}")
        record: dict[str, Any] = msgspec.structs.asdict(result)
        record.update(
            pk=f"FILE#{result.file_id}",
            sk="OUTCOME",
            kind=f"FILE#{result.outcome}",
            execution=execution,
            updated_at=iso_now(self._clock),
        )
        self._put(record)
        if result.source.startswith("s3://"):
            with aws_call("dynamodb.delete_item", table=self.table, source=result.source):
                self.client.delete_item(TableName=self.table, Key=_failure_key(result.source))

    def get_file(self, file_id: str) -> FileRecord | None:
        item = self._get(encode({"pk": f"FILE#{file_id}", "sk": "OUTCOME"}))
        return _as(item, FileRecord) if item else None

    def get_failure(self, source: str) -> FileRecord | None:
        """The failure the workflow recorded for an S3 object (``s3://bucket/key``) whose validation never ended
        (a task that crashed, hung or could not start): it has no file id yet, so it is found by its location."""
        item = self._get(_failure_key(source))
        return _as(item, FileRecord) if item else None

    def files(self, limit: int = 50, outcome: str | None = None) -> list[FileRecord]:
        """The most recent file outcomes, newest first; ``outcome`` keeps only accepted, rejected or failed files."""
        if outcome is not None and outcome not in _LISTED:
            raise ValueError(f"outcome must be one of {_LISTED}, got {outcome!r}")
        if limit <= 0:
            return []
        items = [i for o in ([outcome] if outcome else _LISTED) for i in self._recent(f"FILE#{o}", limit)]
        items.sort(key=lambda i: str(i["updated_at"]["S"]), reverse=True)
        return [_as(i, FileRecord) for i in items[:limit]]

    # --- runs -----------------------------------------------------------------------------------------------
    def record_run(
        self,
        execution_id: str,
        status: str,
        started_at: str,
        ended_at: str | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        """Record (or update: the whole record is replaced) one run; call at start and again at the end."""
        self._put(
            {
                "pk": f"RUN#{execution_id}",
                "sk": "RUN",
                "kind": "RUN",
                "execution_id": execution_id,
                "status": status,
                "started_at": started_at,
                "ended_at": ended_at,
                "summary": summary,
                "updated_at": iso_now(self._clock),
            },
        )

    def get_run(self, execution_id: str) -> RunRecord | None:
        item = self._get(encode({"pk": f"RUN#{execution_id}", "sk": "RUN"}))
        return _as(item, RunRecord) if item else None

    def runs(self, limit: int = 20) -> list[RunRecord]:
        """The most recently recorded runs, newest (last updated) first."""
        return [_as(i, RunRecord) for i in self._recent("RUN", limit)] if limit > 0 else []
