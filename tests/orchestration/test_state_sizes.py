"""Every state's input and output stays far below Step Functions' 256 KiB limit for the largest possible batch.

The real definition (``definition.render`` + ``substitute``) runs in the patched moto server against the largest
batch the Pipe can deliver: 50 records whose S3 keys are 1,024 bytes of UTF-8, mostly 2-byte characters, so each
URL-encoded key (as S3 writes it in its events) is about 3 KiB. The ECS tasks are faked in-process: each answers
through the real :class:`processor.aws.callback.Callback` (results bounded to 8 KiB, causes to 8 KiB)
with what :mod:`processor.tasks` would send. The batch takes every path of the Map iteration: accepted
(validate -> transform), rejected (validate -> quarantine), validate failing (-> RecordFailedSource, SNS, SQS) and
transform failing (-> RecordFailedFile, SNS, SQS); then the merge, with a year of dates in its summary.

Sizes are measured as AWS counts them: UTF-8 bytes of the compact JSON, non-ASCII characters unescaped, also
inside ``States.JsonToString``'s strings. moto writes ``", "`` separators and ``\\uXXXX`` escapes (at both levels
for JsonToString, so a 2-byte character takes 6 or 7 bytes): its own strings, also reported, are an upper bound,
and moto's own 256 KiB quota check (``parser/quotas.py``) applies to them.

Measured (moto 5.2.1, this definition, 2 cores: the execution takes about 2 s): the largest state data is
Summarise's output = AnyFileFailed's and FilesFailed's input, 167,151 bytes (64 % of 256 KiB; moto's text 173,135),
then Merge's output (167,134), ProcessFiles' output (161,971) and the execution input (157,401): the 50 encoded keys
(~3.1 KiB each) make nearly all of it. Inside an iteration the largest is a failed transform's state (item, result
and an 8 KiB cause): 19,632 bytes; a validation result 8,181 bytes.

Not exercised here: a failing merge. Its Catch puts the error beside the 50 files: with the cause cut to 8 KiB of
UTF-8 (processor/aws/callback.py), at most about 170 KB. (With the 32,000 characters AWS allows, it was 194,019
bytes for an ASCII cause and over the limit with 4-byte characters.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import boto3
import msgspec
import orjson
import pytest
from moto.core.config import default_user_config
from moto.server import ThreadedMotoServer

from orchestration import definition
from orchestration.local.moto_patches import MotoPatches, enable_execution
from processor.aws.callback import CAUSE_LIMIT, RESULT_LIMIT, Callback, bounded
from processor.aws.dynamo import create_tables
from processor.aws.s3 import event_key, join_uri, key_from_event
from processor.errors import FileRejected, Reason
from processor.model import MergeResult, ValidationResult
from processor.stage import Segment, file_id_for, segment_key
from processor.tasks import LandedEvent

pytestmark = pytest.mark.slow

REGION = "us-east-1"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/shopkpi-states"
#: Step Functions' limit on a state's (and an execution's) input or output, in UTF-8 bytes.
LIMIT = 256 * 1024
#: Where we want to stay: far from the limit.
COMFORT = 200 * 1024
#: The Pipe's largest batch (its BatchSize).
BATCH = 50
#: S3's longest key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
#: The worker-side "task": how long before it reports (it must not report from inside RunTask).
ANSWER_DELAY_S = 0.05
NUMBERS = {
    "HeartbeatSeconds": 30,
    "RetryIntervalSeconds": 1,
    "MaxConcurrency": 10,
    "ValidateTimeoutSeconds": 60,
    "StepTimeoutSeconds": 60,
    "MergeTimeoutSeconds": 60,
    "ExecutionTimeoutSeconds": 300,
}

# Which record takes which path (indices into the batch).
VALIDATE_FAILS = frozenset({3, 13, 23, 33, 43})
REJECTED = frozenset({7, 17, 27, 37, 47})
TRANSFORM_FAILS = frozenset({0})
ACCEPTED = frozenset(range(BATCH)) - VALIDATE_FAILS - REJECTED


# --- the batch ---------------------------------------------------------------------------------------------------
def _bucket() -> str:
    name = "shopkpi-landing-bucket-with-the-longest-name-s3-allows-"
    return (name + "x" * 63)[:63]


def _key(i: int) -> str:
    """A key of exactly 1,024 UTF-8 bytes, all but its ASCII frame 2-byte characters (3 encoded chars per byte)."""
    head, tail = f"incoming/orders/{i:05d}-", ".csv"
    free = MAX_KEY_BYTES - len(head) - len(tail)
    key = head + "é" * (free // 2) + "x" * (free % 2) + tail
    assert len(key.encode()) == MAX_KEY_BYTES
    return key


def _records() -> list[dict[str, str]]:
    """The batch as the Pipe delivers it: a bare array of {bucket, key (URL-encoded as in S3 events), etag}."""
    bucket = _bucket()
    return [
        {"bucket": bucket, "key": event_key(_key(i)), "etag": uuid.uuid5(uuid.NAMESPACE_URL, str(i)).hex}
        for i in range(BATCH)
    ]


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _unescaped(value: Any) -> Any:
    """``value`` with every string holding JSON (``States.JsonToString``'s) re-written compactly, non-ASCII kept."""
    if isinstance(value, dict):
        return {k: _unescaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unescaped(v) for v in value]
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return _compact(_unescaped(json.loads(value)))
        except ValueError:
            return value
    return value


def _size(text: str) -> int:
    """UTF-8 bytes of the JSON ``text`` as AWS writes it: compact, non-ASCII characters as they are, also inside
    ``States.JsonToString``'s strings (moto writes ``", "`` separators and ``\\uXXXX`` escapes at both levels)."""
    return len(_compact(_unescaped(json.loads(text))).encode())


# --- the fake tasks ------------------------------------------------------------------------------------------------
ARRIVAL = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)


def _long_cause(source: str) -> str:
    """An InternalError message as processor.tasks builds it (``f"{type(e).__name__}: {e}"``), far too long: the
    callback cuts it to 32,000 characters. It quotes the (non-ASCII) source, as exception messages do."""
    line = f"ValueError: cannot decode row of {source}: unexpected byte 0xff in column 'status'\n"
    return ("Traceback (most recent call last):\n" + line * (40_000 // len(line) + 1))[:40_000]


def _accepted(event: LandedEvent) -> dict[str, Any]:
    """What ``validate`` reports for an accepted file (``_keep_validation``), made as large as it gets: warnings as
    long as ``bounded`` still keeps (cut to 50, ``"truncated": true``), so the callback sends nearly 8 KiB."""
    source = event.source
    fid = file_id_for(source, event.etag or "")
    result = ValidationResult(
        file_id=fid,
        source=source,
        dataset="orders",
        outcome="accepted",
        rows=12_345_678,
        valid_rows=12_300_000,
        rejected_rows=45_678,
        rejects_by_reason={str(r): 1_000 + n for n, r in enumerate(Reason) if n >= 6},
        arrival=ARRIVAL.isoformat(),
        seconds=812.345,
    )
    buckets = list(range(32))  # SHOPKPI_BUCKETS' default; bounded() cuts longer lists to 50 anyway
    segment = Segment(
        file_id=fid,
        dataset="orders",
        source=source,
        arrival_us=int(ARRIVAL.timestamp() * 1_000_000),
        rows=result.valid_rows,
        buckets=buckets,
        key=segment_key("orders", fid),
    )
    prefix = f"s3://{event.bucket}/reports/{fid}"
    report = {
        **msgspec.structs.asdict(result),
        "buckets": buckets,
        "warnings": [],
        "timings": {"read": 301.2, "parse": 250.1, "validate": 120.7, "write": 140.3},
        "segment": msgspec.structs.asdict(segment),
        "rejects": f"{prefix}/rejected_rows.csv",
        "report": f"{prefix}/report.json",
    }

    def with_warnings(length: int) -> dict[str, Any]:
        text = "column 'status' has trailing whitespace; " * (length // 41 + 1)
        return {**report, "warnings": [f"row {n * 1000 + 17}: {text[:length]}" for n in range(500)]}

    # The longest warnings that bounded() still keeps (cut to 50): the largest result a task can send.
    low, high = 0, 1000
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if "warnings" in bounded(with_warnings(middle)) else (low, middle - 1)
    return with_warnings(low)


def _rejected(event: LandedEvent) -> dict[str, Any]:
    source = event.source
    fid = file_id_for(source, event.etag or "")
    by_reason = {str(r): 10_000 + n for n, r in enumerate(Reason) if n >= 6}
    error = FileRejected(
        Reason.TOO_MANY_INVALID,
        "invalid rows exceed SHOPKPI_MAX_INVALID_SHARE (0.05): 6,000,000 of 12,000,000",
        rows=12_000_000,
        valid_rows=6_000_000,
        rejects_by_reason=by_reason,
    )
    result = ValidationResult(
        file_id=fid,
        source=source,
        dataset="orders",
        outcome="rejected",
        reason=str(Reason.TOO_MANY_INVALID),
        message=error.message,
        rows=12_000_000,
        valid_rows=6_000_000,
        rejected_rows=6_000_000,
        rejects_by_reason=by_reason,
        arrival=ARRIVAL.isoformat(),
        seconds=700.1,
    )
    prefix = f"s3://{event.bucket}/reports/{fid}"
    return {
        **msgspec.structs.asdict(result),
        "error": error.to_dict(),
        "rejects": f"{prefix}/rejected_rows.csv",
        "report": f"{prefix}/report.json",
    }


def _merge_summary() -> dict[str, Any]:
    """``run_merge``'s summary (``msgspec.structs.asdict(MergeResult)``) for a merge that touched a whole year."""
    first = date(2024, 1, 1)
    result = MergeResult(
        generation=123_456,
        segments=987_654,
        files_merged=BATCH,
        groups_recomputed=4_567_890,
        dates=[(first + timedelta(days=n)).isoformat() for n in range(366)],
        daily_kpis=366,
        category_kpis=366 * 40,
        removed_kpis=12,
        published=366 * 41,
        pending={"order_items": 12_345, "orders": 678},
        orphans={"order_items": 12, "orders": 3},
        late_rejects={"user_mismatch": 42},
        conflicts=7,
        state_rows={"orders": 98_765_432, "order_items": 234_567_890, "products": 29_120},
        seconds=1234.5,
    )
    return msgspec.structs.asdict(result)


@dataclass
class FakeTasks:
    """The ECS runner: answers each task through the callback API, from a thread, as the container would."""

    sfn: Any
    by_file_id: dict[str, int]  # file id -> index in the batch
    oversized: frozenset[int] = frozenset()  # these validates answer past the 256 KiB limit (not through bounded)
    commands: list[list[str]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, parameters: dict[str, Any]) -> None:
        (container,) = parameters["Overrides"]["ContainerOverrides"]
        command = list(container["Command"])
        token = next(e["Value"] for e in container["Environment"] if e["Name"] == "SHOPKPI_TASK_TOKEN")
        with self.lock:
            self.commands.append(command)
        thread = threading.Thread(target=self._answer, args=(command, token), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _answer(self, command: list[str], token: str) -> None:
        try:
            time.sleep(ANSWER_DELAY_S)
            callback = Callback(self.sfn, token)
            kind, args = command[0], command[1:]
            if kind == "validate":
                assert args[0] == "--event", command
                event = msgspec.json.decode(args[1], type=LandedEvent)  # as shopkpi-task's argument parser does
                index = int(key_from_event(event.key).split("/")[2][:5])
                if index in self.oversized:
                    big = {**_accepted(event), "warnings": ["x" * 1000] * 300}
                    self.sfn.send_task_success(taskToken=token, output=json.dumps(big))
                elif index in VALIDATE_FAILS:
                    callback.fail("ShopKpi.Internal", _long_cause(event.source))
                elif index in REJECTED:
                    callback.succeed(_rejected(event))
                else:
                    callback.succeed(_accepted(event))
            elif kind == "transform":
                (fid,) = args
                if self.by_file_id[fid] in TRANSFORM_FAILS:
                    callback.fail("ShopKpi.Internal", _long_cause(fid))
                else:
                    callback.succeed(
                        {
                            "file_id": fid,
                            "committed": True,
                            "archived": f"archive/orders/{ARRIVAL.date()}/{_key(self.by_file_id[fid]).split('/')[-1]}",
                            "buckets": 32,
                        }
                    )
            elif kind == "quarantine":
                (fid,) = args
                name = _key(self.by_file_id[fid]).split("/")[-1]
                callback.succeed(
                    {
                        "file_id": fid,
                        "quarantined": join_uri(_bucket(), f"rejected/orders/{ARRIVAL.date()}/{name}"),
                        "reason": str(Reason.TOO_MANY_INVALID),
                    }
                )
            elif kind == "merge":
                assert args == [], command
                callback.succeed(_merge_summary())
            else:
                raise AssertionError(f"unexpected command {command}")
        except BaseException as e:  # surfaced by the test
            self.errors.append(e)


# --- the run -------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    records: list[dict[str, str]]
    described: dict[str, Any]
    history: list[dict[str, Any]]
    tasks: FakeTasks
    ledger: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    seconds: float


def _client(endpoint: str, service: str) -> Any:
    return boto3.client(
        service,  # type: ignore[call-overload]
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _drain(sqs: Any, queue: str) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    while messages := sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", []):
        for m in messages:
            bodies.append(json.loads(m["Body"]))
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])
    return bodies


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    """One execution of the real definition over the largest batch, run to its end."""
    with _execute(_records()) as done:
        yield done


@pytest.fixture(scope="module")
def failed_batch() -> Iterator[Run]:
    """A batch of four whose second file's validation answers past 256 KiB: the Map fails as a whole."""
    with _execute(_records()[:4], oversized=frozenset({1})) as done:
        yield done


@contextlib.contextmanager
def _execute(records: list[dict[str, str]], oversized: frozenset[int] = frozenset()) -> Iterator[Run]:
    """Run the real definition over ``records`` in a fresh moto server, to its end.

    Setup, run and teardown of one server in one generator (longer than 60 lines) so that every resource it starts
    is stopped in the same ``finally``, whatever fails."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved_config = dict(default_user_config["stepfunctions"])
    patches: MotoPatches | None = None
    parser_log = logging.getLogger("moto.stepfunctions.parser")
    saved_level = parser_log.level
    parser_log.setLevel(logging.CRITICAL)  # it logs every absent JSONPath, which IsPresent expects
    try:
        enable_execution(endpoint)
        sfn, sns, sqs = (_client(endpoint, s) for s in ("stepfunctions", "sns", "sqs"))
        prefix = f"t{uuid.uuid4().hex[:8]}"
        tables = create_tables(_client(endpoint, "dynamodb"), prefix)
        topic = sns.create_topic(Name=f"{prefix}-alerts")["TopicArn"]
        dlq = sqs.create_queue(QueueName=f"{prefix}-workflow-dlq")["QueueUrl"]
        # The alerts, read back through a queue subscribed to the topic.
        inbox = sqs.create_queue(QueueName=f"{prefix}-alerts-inbox")["QueueUrl"]
        inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=inbox_arn, Attributes={"RawMessageDelivery": "true"})
        strings = {
            "ClusterArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/shopkpi",
            "TaskDefinition": "shopkpi-task",
            "SubnetA": "subnet-0a",
            "SubnetB": "subnet-0b",
            "SecurityGroup": "sg-0123",
            "AssignPublicIp": "DISABLED",
            "AlertTopicArn": topic,
            "DeadLetterQueueUrl": dlq,
            "LedgerTable": tables.ledger,
            **{
                f"{kind}TaskRoleArn": f"arn:aws:iam::{ACCOUNT}:role/shopkpi-{kind.lower()}"
                for kind in ("Validate", "Transform", "Quarantine", "Merge")
            },
        }
        text = definition.substitute(definition.render(NUMBERS), strings)
        machine = sfn.create_state_machine(name=f"{prefix}-workflow", definition=text, roleArn=ROLE)["stateMachineArn"]
        by_file_id = {
            file_id_for(join_uri(r["bucket"], key_from_event(r["key"])), r["etag"]): i for i, r in enumerate(records)
        }
        tasks = FakeTasks(sfn, by_file_id, oversized)
        patches = MotoPatches(tasks, server_port=port).install()

        started = time.monotonic()
        execution = sfn.start_execution(stateMachineArn=machine, input=json.dumps(records))["executionArn"]
        deadline = started + 120
        while (described := sfn.describe_execution(executionArn=execution))["status"] == "RUNNING":
            assert time.monotonic() < deadline, "the execution is still running after 120 s"
            time.sleep(0.2)
        seconds = time.monotonic() - started
        for t in tasks.threads:
            t.join(timeout=10)
        patches.uninstall()  # the execution is over; moto takes one patch set at a time, and the fixtures overlap

        history: list[dict[str, Any]] = []
        page: dict[str, Any] = {}
        while True:
            answer = sfn.get_execution_history(executionArn=execution, maxResults=1000, **page)
            history += answer["events"]
            if not answer.get("nextToken"):
                break
            page = {"nextToken": answer["nextToken"]}
        ledger = _client(endpoint, "dynamodb").scan(TableName=tables.ledger)["Items"]
        yield Run(
            records=records,
            described=dict(described),
            history=history,
            tasks=tasks,
            ledger=ledger,
            alerts=_drain(sqs, inbox),
            dead_letters=_drain(sqs, dlq),
            seconds=seconds,
        )
    finally:
        if patches:
            patches.uninstall()
        default_user_config["stepfunctions"] = saved_config  # type: ignore[typeddict-item]
        parser_log.setLevel(saved_level)
        with contextlib.suppress(OSError):  # moto keeps its state in this process: forget it
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
        server.stop()


# --- the history ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    state: str  # the state the event belongs to ("(execution)" for the execution's own events)
    what: str  # e.g. "TaskSucceeded.output"
    size: int  # compact UTF-8 bytes, as AWS counts
    raw: int  # UTF-8 bytes of moto's own string
    event_id: int


_PAYLOADS = ("input", "output", "parameters")


def _measure(history: list[dict[str, Any]]) -> list[Measured]:
    """Every input, output and parameters field in the history, with the state it belongs to."""
    by_id = {e["id"]: e for e in history}

    def state_of(event: dict[str, Any]) -> str:
        # Task events name no state: follow previousEventId back to the state they belong to.
        seen: dict[str, Any] | None = event
        while seen is not None:
            for key in ("stateEnteredEventDetails", "stateExitedEventDetails"):
                if key in seen:
                    return str(seen[key]["name"])
            if seen["type"].startswith("Execution"):
                return "(execution)"
            seen = by_id.get(seen.get("previousEventId", 0))
        return "?"

    measured = []
    for event in history:
        for key, details in event.items():
            if not key.endswith("EventDetails") or not isinstance(details, dict):
                continue
            for name in _PAYLOADS:
                value = details.get(name)
                if isinstance(value, str) and value:
                    measured.append(
                        Measured(
                            state_of(event), f"{event['type']}.{name}", _size(value), len(value.encode()), event["id"]
                        )
                    )
    return measured


def _largest_per_state(measured: list[Measured]) -> list[Measured]:
    best: dict[tuple[str, str], Measured] = {}
    for m in measured:
        if (m.state, m.what) not in best or m.size > best[(m.state, m.what)].size:
            best[(m.state, m.what)] = m
    return sorted(best.values(), key=lambda m: -m.size)


# --- tests ---------------------------------------------------------------------------------------------------------
def test_the_largest_batch_is_the_largest_input(run: Run) -> None:
    """The premise: 50 records of ~3 KiB encoded keys, each key 1,024 bytes once decoded."""
    assert len(run.records) == BATCH
    for r in run.records:
        assert len(key_from_event(r["key"]).encode()) == MAX_KEY_BYTES
        assert len(r["key"]) > 3000 and len(r["bucket"]) == 63 and len(r["etag"]) == 32
    started = next(e for e in run.history if e["type"] == "ExecutionStarted")
    assert json.loads(started["executionStartedEventDetails"]["input"]) == run.records


def test_the_batch_takes_every_path_then_merges_and_fails_for_its_failed_files(run: Run) -> None:
    assert not run.tasks.errors, run.tasks.errors
    assert run.described["status"] == "FAILED", run.described
    assert run.described.get("error") == "ShopKpi.FilesFailed", run.described
    kinds = Counter(c[0] for c in run.tasks.commands)
    assert kinds == {
        "validate": BATCH,  # no retries: ShopKpi.Internal is terminal
        "transform": len(ACCEPTED),
        "quarantine": len(REJECTED),
        "merge": 1,
    }, kinds
    types = Counter(e["type"] for e in run.history)
    assert types["MapIterationSucceeded"] == BATCH
    merge_ok = [
        e for e in run.history if e["type"] == "TaskStateExited" and e["stateExitedEventDetails"]["name"] == "Merge"
    ]
    assert len(merge_ok) == 1 and json.loads(merge_ok[0]["stateExitedEventDetails"]["output"])["merge"] == (
        _merge_summary()
    )

    # The accepted results really were cut to the callback's limit (they carry what the Choice reads).
    succeeded = [
        json.loads(e["taskSucceededEventDetails"]["output"]) for e in run.history if e["type"] == "TaskSucceeded"
    ]
    validated = [v for v in succeeded if v.get("outcome") == "accepted" and "valid_rows" in v]
    assert len(validated) == len(ACCEPTED)
    assert all(v["truncated"] and len(v["warnings"]) == 51 for v in validated)
    sent = [len(orjson.dumps(v)) for v in validated]  # as the callback encodes it
    assert all(RESULT_LIMIT - 1_000 < n <= RESULT_LIMIT + len(b',"truncated":true') for n in sent), sent

    # Each failed file: alerted and dead-lettered with its error (the cause cut to 8 KiB), outcome "failed".
    failed = sorted(VALIDATE_FAILS | TRANSFORM_FAILS)
    summary = json.loads(merge_ok[0]["stateExitedEventDetails"]["output"])["files"]
    assert [i for i, f in enumerate(summary) if f["failed"]] == failed
    assert [f["outcome"] for f in summary].count("rejected") == len(REJECTED)
    for messages in (run.alerts, run.dead_letters):
        assert sorted(m["key"] for m in messages) == sorted(run.records[i]["key"] for i in failed)
        assert all(m["error"]["Error"] == "ShopKpi.Internal" for m in messages)
        assert all(len(m["error"]["Cause"].encode()) <= CAUSE_LIMIT for m in messages)
    outcomes = {(i["pk"]["S"], i["sk"]["S"]): i for i in run.ledger}
    (transform_failed,) = TRANSFORM_FAILS
    record = run.records[transform_failed]
    fid = file_id_for(join_uri(record["bucket"], key_from_event(record["key"])), record["etag"])
    assert outcomes[(f"FILE#{fid}", "OUTCOME")]["outcome"]["S"] == "failed"


def test_every_state_input_and_output_fits(run: Run) -> None:
    """Every input, output and task parameters in the history, as AWS counts them, is below 256 KiB and far from it.

    Measured maximum: 167,151 bytes (Summarise's output, 64 % of the limit); the table is printed (``-s``), the
    module docstring has the rest.
    """
    measured = _measure(run.history)
    assert measured, "no input or output in the history"
    table = _largest_per_state(measured)
    print(f"\nexecution took {run.seconds:.1f} s; largest inputs/outputs per state (bytes, compact UTF-8 / moto raw):")
    for m in table[:25]:
        print(f"  {m.state:<22} {m.what:<34} {m.size:>8,} {m.raw:>8,}  ({m.size / LIMIT:.0%} of 256 KiB)")
    over = [m for m in measured if max(m.size, m.raw) >= LIMIT]  # moto's escaped text: an upper bound
    assert not over, f"over Step Functions' 256 KiB limit: {over}"
    largest = table[0]
    assert largest.size < COMFORT, f"close to the 256 KiB limit: {largest}"
    # Every kind of payload was measured, the whole batch's included.
    whats = {m.what for m in measured}
    assert {"ExecutionStarted.input", "MapStateEntered.input", "MapStateExited.output", "TaskSucceeded.output"} <= whats


def test_a_file_failing_validation_is_recorded_in_the_ledger_by_its_source(run: Run) -> None:
    sources = {i["pk"]["S"] for i in run.ledger if i["sk"]["S"] == "FAILED"}
    assert len(sources) == len(VALIDATE_FAILS), [
        (e["taskFailedEventDetails"]["error"], e["taskFailedEventDetails"].get("cause", "")[:120])
        for e in run.history
        if e["type"] == "TaskFailed" and e["taskFailedEventDetails"]["error"].startswith("DynamoDB.")
    ][:1]
    # ... under the key the ledger reads them by (operations.record, for `shopkpi ingest --wait`).
    from processor.aws.dynamo.ledger import _failure_key

    wanted = {
        _failure_key(join_uri(run.records[i]["bucket"], key_from_event(run.records[i]["key"])))["pk"]["S"]
        for i in VALIDATE_FAILS
    }
    assert sources == wanted


def test_a_batch_that_fails_as_a_whole_dead_letters_every_file_and_merges_what_succeeded(
    failed_batch: Run,
) -> None:
    # On AWS a state output past 256 KiB is States.DataLimitExceeded, which no States.ALL catches (the embedded
    # stack patches moto to the same rule): Validate's Catch does not run, the iteration fails, the Map fails.
    run = failed_batch
    assert run.described["status"] == "FAILED" and run.described["error"] == "ShopKpi.FilesFailed"
    names = [e["stateEnteredEventDetails"]["name"] for e in run.history if "stateEnteredEventDetails" in e]
    assert "BatchFailed" in names and "DeadLetterBatchFiles" in names
    assert names.index("Merge") > names.index("DeadLetterBatchFiles"), "the merge still ran"
    assert [c for c in run.tasks.commands if c[0] == "merge"] == [["merge"]]
    assert sorted(m["file"]["key"] for m in run.dead_letters) == sorted(r["key"] for r in run.records)
    assert all(m["error"]["Error"] == "States.DataLimitExceeded" for m in run.dead_letters)
    # The batch's own alert (its error); moto may also have sent the per-file alert of an iteration that was still
    # on its failure path when the Map failed.
    batch_alerts = [a for a in run.alerts if set(a) == {"Error", "Cause"}]
    assert len(batch_alerts) == 1 and batch_alerts[0]["Error"] == "States.DataLimitExceeded", run.alerts
