"""Real executions on the embedded stack: files land in S3, the trigger starts Step Functions, local ECS tasks
validate, stage and merge them, and the KPIs in DynamoDB equal the independent reference.

One :class:`EmbeddedStack` for the module (moto server, stack from ``infra/template.yaml``, local tasks, LocalPipe).
State is shared, so each test lands its own file names, with its own order, item and product ids and its own order
dates, and asserts only on what its files produced:

==================  ====================  ===========================  ===========
test                file names            ids (orders/items/products)  order dates
==================  ====================  ===========================  ===========
happy (+reprocess)  ``*_happy.csv``       1_01x_xxx                    2030-01
rejected file       ``*_rejected.csv``    1_02x_xxx                    2030-02
rejected rows       ``*_rows.csv``        1_03x_xxx                    2030-03
crash once          ``*_crash.csv``       1_04x_xxx                    2030-04
hang (one batch)    ``*_fail*.csv``       1_05x_xxx                    2030-05
duplicates          ``*_dup.csv``         1_07x_xxx                    2030-07
moved groups        ``*_move*.csv``       1_08x_xxx                    2030-08
encoded names       ``* *enc*.csv``       1_09x_xxx                    2030-09
end to end          ``*_e2e.csv``         generated (ids < 1e6)        2029-01
==================  ====================  ===========================  ===========

Numbers: ``HeartbeatSeconds`` 8 and ``MaxConcurrency`` 2. With 4 s and the default concurrency of 4, a burst of
six files timed out healthy tasks on this 2-core machine (several task processes importing polars at once sent
their first heartbeat after more than 4 s). At concurrency 2 a task takes 2-5 s from scheduling to its result, and
the test suite may share the machine with other test runs. The hang and crash cases pay for the heartbeat (3 x 8 s
and 1 x 8 s); everything else is fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from loadgen.generate import generate
from orchestration import operations
from orchestration.local.stack import EmbeddedStack
from processor.aws.dynamo import FileRecord
from processor.aws.s3 import event_key
from processor.schema import DATASETS
from processor.settings import Settings
from processor.stage import file_id_for
from shopkpi import cli
from tests.builders import item as base_item
from tests.builders import order, product
from tests.reference import reference_kpis, reference_rejects

pytestmark = pytest.mark.slow

NUMBERS = {
    "HeartbeatSeconds": 8,
    "MaxConcurrency": 2,
    "RetryIntervalSeconds": 1,
    "ValidateTimeoutSeconds": 60,
    "StepTimeoutSeconds": 30,
    "MergeTimeoutSeconds": 60,
}
#: Gathering window of the local trigger (its default): a burst of files (landed in about 0.2 s) is one execution.
PIPE_WINDOW_S = 1.0
WAIT_S = 90.0
#: Quiet time before the pipeline counts as idle. Short is safe: S3 -> EventBridge -> SQS is synchronous in moto, so
#: a landed file's event is in the buffer before ``ingest`` returns, and the trigger starts an execution before it
#: deletes the messages of its batch.
SETTLE_S = 0.5

Event = dict[str, Any]


# --- the stack ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    root = tmp_path_factory.mktemp("embedded")
    name = f"skt{uuid.uuid4().hex[:8]}"
    s = EmbeddedStack(
        Settings.load(env={}, stack=name, work_dir=root / "work"),
        port=0,
        numbers=NUMBERS,
        task_env={"SHOPKPI_BUCKETS": "4"},
        pipe_window_s=PIPE_WINDOW_S,
    )
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def op(stack: EmbeddedStack) -> operations.Stack:
    assert stack.clients is not None and stack.outputs is not None
    return operations.Stack(stack.settings, stack.clients, stack.outputs)


@pytest.fixture(scope="module")
def alert_queue(op: operations.Stack) -> str:
    """An SQS queue of ours subscribed to the alert topic (as an operator's mailbox would be)."""
    sqs = op.clients.sqs
    url = str(sqs.create_queue(QueueName=f"{op.settings.stack}-alerts-test")["QueueUrl"])
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    op.clients.sns.subscribe(TopicArn=op.outputs.alert_topic_arn, Protocol="sqs", Endpoint=arn)
    return url


# --- files -------------------------------------------------------------------------------------------------------
def write_csv(folder: Path, name: str, rows: Sequence[dict[str, object]], columns: Sequence[str] | None = None) -> Path:
    """A CSV of the dataset the name starts with: every column of the contract (or ``columns``), blanks for None."""
    dataset = next(DATASETS[n] for n in sorted(DATASETS, key=len, reverse=True) if name.startswith(n))
    names = list(columns or dataset.names)
    lines = [",".join(names)]
    lines += [",".join("" if r.get(c) is None else str(r[c]) for c in names) for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def item(
    item_id: int, order_id: int, user_id: int, product_id: int, price: str, created: str, status: str = "complete"
) -> dict[str, object]:
    """An item created at ``created`` (the shared builder's default date is not these tests' dates)."""
    return base_item(item_id, order_id, user_id, product_id, price, status, created_at=created)


@dataclass
class Shop:
    """Products, orders and items of one test, in three files."""

    products: Path
    orders: Path
    items: Path

    @property
    def paths(self) -> list[Path]:
        return [self.products, self.orders, self.items]


def small_shop(folder: Path, tag: str, base: int, month: str) -> Shop:
    """Two categories, four orders over two days of ``month`` (one returned, one cancelled), six items."""
    p1, p2, u1, u2, u3 = base + 1, base + 2, base + 11, base + 12, base + 13
    o = [base + 100 + i for i in range(4)]
    d1, d2 = f"{month}-03T09:15:00", f"{month}-04T18:40:00"
    products = write_csv(folder, f"products_{tag}.csv", [product(p1, f"Toys-{tag}"), product(p2, f"Books-{tag}")])
    orders = write_csv(
        folder,
        f"orders_{tag}.csv",
        [
            order(o[0], u1, d1),
            order(o[1], u2, d1, status="returned", returned_at=f"{month}-05T10:00:00"),
            order(o[2], u1, d2, status="cancelled"),
            order(o[3], u3, d2, status="shipped", shipped_at=f"{month}-05T08:00:00"),
        ],
    )
    items = write_csv(
        folder,
        f"order_items_{tag}.csv",
        [
            item(base + 200, o[0], u1, p1, "12.50", d1),
            item(base + 201, o[0], u1, p2, "7.99", d1),
            item(base + 202, o[1], u2, p1, "30.00", d1, status="returned"),
            item(base + 203, o[2], u1, p2, "4.10", d2, status="cancelled"),
            item(base + 204, o[3], u3, p2, "19.95", d2, status="shipped"),
            item(base + 205, o[3], u3, p1, "0.05", d2, status="shipped"),
        ],
    )
    return Shop(products, orders, items)


# --- pipeline helpers --------------------------------------------------------------------------------------------
def land(
    op: operations.Stack, paths: Sequence[Path], *, wait_for: Sequence[Path] | None = None
) -> list[operations.Landed]:
    """Upload ``paths`` in one burst and wait until the files of ``wait_for`` (default: all) have an outcome and
    the pipeline is idle.

    The uploads run in parallel, so the burst takes about the time of one upload (well under the trigger's
    gathering window even on a loaded machine): the files form one batch, one execution.
    """
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        landed = [x for one in pool.map(lambda p: operations.ingest(op, [p]), paths) for x in one]
    wanted = {Path(p) for p in (paths if wait_for is None else wait_for)}
    assert operations.wait(op, WAIT_S, [x for x in landed if x.path in wanted], settle_s=SETTLE_S), (
        f"pipeline not idle with outcomes for {sorted(p.name for p in wanted)}"
    )
    return landed


def ledger_record(op: operations.Stack, landed: operations.Landed) -> FileRecord:
    record = op.ledger.get_file(landed.file_id)
    assert record is not None, f"no ledger record for {landed.key}"
    return record


def execution_arn(op: operations.Stack, name: str) -> str:
    for e in op.workflow.executions(limit=1000):
        if e["name"] == name:
            return str(e["executionArn"])
    raise AssertionError(f"no execution named {name}")


def executions_of(op: operations.Stack, landed: Sequence[operations.Landed]) -> list[str]:
    """ARNs of the executions that validated these files (the ledger's ``execution`` is the execution name)."""
    names = sorted({str(ledger_record(op, x).execution) for x in landed})
    return [execution_arn(op, n) for n in names]


def finished(op: operations.Stack, arn: str, timeout_s: float = WAIT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        described = op.workflow.describe(arn)
        if described["status"] != "RUNNING" or time.monotonic() > deadline:
            return described
        time.sleep(0.5)


def entered(history: Sequence[Event]) -> list[str]:
    """Names of the states entered, in order."""
    return [e["stateEnteredEventDetails"]["name"] for e in history if "stateEnteredEventDetails" in e]


def validates(command: list[str], key: str) -> bool:
    """Whether a task command validates the landed file ``key`` (``validate --event {"bucket", "key", "etag"}``)."""
    return command[:2] == ["validate", "--event"] and json.loads(command[2])["key"] == event_key(key)


def task_command(event: Event) -> list[str]:
    """The container command of a TaskScheduled event (``["validate", "s3://..."]``, ``["merge"]``...)."""
    parameters = json.loads(event["taskScheduledEventDetails"]["parameters"])
    command: list[str] = parameters["Overrides"]["ContainerOverrides"][0]["Command"]
    return command


def _details(event: Event) -> dict[str, Any]:
    return next((v for k, v in event.items() if k.endswith("EventDetails")), {})


def task_attempts(history: Sequence[Event]) -> list[tuple[list[str], str, str | None]]:
    """(command, end event type, error) of every ECS task attempt, in the order they ended.

    Each end event (TaskSucceeded/TaskFailed/TaskTimedOut) is traced back through ``previousEventId`` to the
    TaskScheduled of its attempt, so attempts of parallel Map iterations are told apart. SNS and SQS tasks (the
    failure path) are left out.
    """
    by_id = {e["id"]: e for e in history}
    out = []
    for e in history:
        if e["type"] not in ("TaskSucceeded", "TaskFailed", "TaskTimedOut") or _details(e)["resourceType"] != "ecs":
            continue
        prev = by_id.get(e["previousEventId"])
        while prev is not None and prev["type"] != "TaskScheduled":
            prev = by_id.get(prev.get("previousEventId"))
        assert prev is not None, f"no TaskScheduled before event {e['id']} {e['type']}"
        assert _details(prev)["resourceType"] == "ecs", f"event {e['id']} traced back to another task"
        out.append((task_command(prev), e["type"], _details(e).get("error")))
    return out


def scheduled(history: Sequence[Event]) -> list[list[str]]:
    """Commands of the ECS tasks scheduled, in order."""
    return [task_command(e) for e in history if e["type"] == "TaskScheduled" and _details(e)["resourceType"] == "ecs"]


def uri(op: operations.Stack, key: str) -> str:
    return f"s3://{op.outputs.bucket}/{key}"


def by_category(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["order_date"], r["category"]))


def stored_kpis(op: operations.Stack, date_from: str, date_to: str) -> dict[str, list[dict[str, Any]]]:
    """The KPIs in DynamoDB for a date range, as the dicts of ``OrderKpi.public()`` / ``CategoryKpi.public()``."""
    return {
        "daily": [k.public() for k in op.tables.daily(date_from, date_to)],
        "category": by_category([k.public() for k in op.tables.category(None, date_from, date_to)]),
    }


def expected_kpis(files: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    ref = reference_kpis(list(files))
    return {"daily": ref["daily"], "category": by_category(ref["category"])}


def keys(op: operations.Stack, prefix: str) -> list[str]:
    return sorted(op.s3.list_keys(prefix))


def scan(op: operations.Stack, table: str) -> list[dict[str, Any]]:
    client = op.clients.dynamodb
    items: list[dict[str, Any]] = []
    for page in client.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
        items += page.get("Items", [])
    return sorted(items, key=lambda i: json.dumps({k: i[k] for k in sorted(i) if k in ("order_date", "category")}))


def read_queue(
    op: operations.Stack, url: str, match: Callable[[dict[str, Any]], bool], timeout_s: float = 20
) -> list[dict[str, Any]]:
    """JSON bodies of the messages of a queue that satisfy ``match`` (deleted once read): waits up to ``timeout_s``
    for a first one, then reads on until the queue has nothing more to give (to see duplicates too)."""
    sqs = op.clients.sqs
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        if not got and found:
            break
        for m in got:
            body = json.loads(m["Body"])
            if match(body):
                found.append(body)
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return found


# --- task definition swaps ---------------------------------------------------------------------------------------
_REGISTER_FIELDS = (
    "containerDefinitions",
    "requiresCompatibilities",
    "networkMode",
    "cpu",
    "memory",
    "executionRoleArn",
    "taskRoleArn",
    "ephemeralStorage",
    "runtimePlatform",
    "volumes",
)

WRAPPER = """\
import json
import os
import sys
import time

MODE, MATCH, MARKER = {mode!r}, {match!r}, {marker!r}
args = sys.argv[1:]
if MODE == "stale_part" and args[:1] == ["merge-part"] and json.loads(args[-1])["part"] == int(MATCH):
    with open(MARKER, "a") as f:
        f.write(args[-1] + "\\n")
    args[-1] = json.dumps({{**json.loads(args[-1]), "plan": "state/g=0/plan.json"}})  # a plan that is not there
if args[:1] == ["validate"] and MATCH in args[-1]:
    with open(MARKER, "a") as f:
        f.write(args[-1] + "\\n")
    if MODE == "hang":
        time.sleep(3600)
    if MODE == "crash_once" and len(open(MARKER).read().splitlines()) == 1:
        sys.exit(1)  # dies without reporting to Step Functions: only the heartbeat timeout can notice
os.execv(sys.executable, [sys.executable, "-m", "processor.tasks", *args])
"""


@dataclass
class Wrapped:
    """A task definition revision whose entry point is our wrapper around ``processor.tasks``."""

    script: Path
    marker: Path
    revision: str = ""

    def calls(self) -> list[str]:
        """Keys of the validate calls the wrapper intercepted, in order (each call's last argument is the event)."""
        lines = self.marker.read_text().splitlines() if self.marker.exists() else []
        return [json.loads(line)["key"] for line in lines]


@contextlib.contextmanager
def wrapped_tasks(stack: EmbeddedStack, folder: Path, mode: str, match: str) -> Iterator[Wrapped]:
    """Register a new revision of the stack's task definition family whose entry point runs a wrapper around
    ``processor.tasks``: with ``crash_once``, the first validate of a key containing ``match`` exits 1 without
    reporting; with ``hang``, every such validate sleeps; with ``stale_part``, the merge part numbered ``match``
    is given a plan that does not exist (it fails, terminally, as a part whose plan was swept). On exit the original
    container definition is registered again (a newer revision) and the processes the wrapper left hanging are
    killed."""
    assert stack.clients is not None and stack.outputs is not None
    ecs = stack.clients.client("ecs")
    family = stack.outputs.task_family
    original = ecs.describe_task_definition(taskDefinition=family)["taskDefinition"]
    # moto describes cpu/memory as numbers; RegisterTaskDefinition takes strings.
    base = {k: str(original[k]) if k in ("cpu", "memory") else original[k] for k in _REGISTER_FIELDS if original.get(k)}
    w = Wrapped(folder / f"wrapper_{mode}.py", folder / f"wrapper_{mode}.calls")
    w.script.write_text(WRAPPER.format(mode=mode, match=match, marker=str(w.marker)))
    container = dict(original["containerDefinitions"][0], entryPoint=[sys.executable, str(w.script)])
    try:
        registered = ecs.register_task_definition(family=family, **{**base, "containerDefinitions": [container]})
        w.revision = registered["taskDefinition"]["taskDefinitionArn"]
        current = ecs.describe_task_definition(taskDefinition=family)["taskDefinition"]
        assert current["taskDefinitionArn"] == w.revision, "the family does not resolve to the new revision"
        yield w
    finally:
        ecs.register_task_definition(family=family, **base)
        restored = ecs.describe_task_definition(taskDefinition=family)["taskDefinition"]
        assert restored["containerDefinitions"] == original["containerDefinitions"], "original not restored"
        kill_wrapped(stack, [w.script])


def kill_wrapped(stack: EmbeddedStack, scripts: Sequence[Path]) -> int:
    """Kill the task processes still running one of our wrappers; returns how many were running."""
    killed = 0
    for p in list(stack.processes):
        args = [str(a) for a in p.args] if isinstance(p.args, (list, tuple)) else [str(p.args)]
        if p.poll() is None and any(str(s) in args for s in scripts):
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            killed += 1
    return killed


# --- 1. happy path -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def happy(op: operations.Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[Shop, list[operations.Landed]]:
    """The happy path's files, landed once for the module (the reprocess test reuses them)."""
    shop = small_shop(tmp_path_factory.mktemp("happy"), "happy", 1_010_000, "2030-01")
    return shop, land(op, shop.paths)


def test_happy_path_lands_through_the_trigger_and_publishes_the_reference_kpis(
    op: operations.Stack, happy: tuple[Shop, list[operations.Landed]]
) -> None:
    shop, landed = happy

    records = {x.path.name: ledger_record(op, x) for x in landed}
    assert {n: r.outcome for n, r in records.items()} == dict.fromkeys(records, "accepted")
    assert {n: (r.rows, r.valid_rows) for n, r in records.items()} == {
        "products_happy.csv": (2, 2),
        "orders_happy.csv": (4, 4),
        "order_items_happy.csv": (6, 6),
    }

    arns = executions_of(op, landed)
    assert len(arns) == 1, "one burst of files is one batch, one execution"
    assert finished(op, arns[0])["status"] == "SUCCEEDED"
    history = op.workflow.history(arns[0])
    types = [e["type"] for e in history]
    assert types[0] == "ExecutionStarted" and types[-1] == "ExecutionSucceeded"
    assert {"MapStateEntered", "MapStateSucceeded"} <= set(types)
    assert types.count("MapIterationSucceeded") == 3
    started = json.loads(history[0]["executionStartedEventDetails"]["input"])
    assert isinstance(started, list) and all(set(r) == {"bucket", "key", "etag"} for r in started), "the Pipe's input"
    states = entered(history)
    assert states.count("Validate") == states.count("Transform") == 3 and "Quarantine" not in states
    assert states.index("Merge") > states.index("ProcessFiles") and states[-1] == "Done"
    attempts = task_attempts(history)
    assert all(end == "TaskSucceeded" for _, end, _ in attempts)
    validated = [c for c in scheduled(history) if c[0] == "validate"]
    assert all(c[1] == "--event" for c in validated)
    assert sorted(json.loads(c[2])["key"] for c in validated) == sorted(x.key for x in landed)
    assert sorted(c for c in scheduled(history) if c[0] == "transform") == sorted(
        ["transform", x.file_id] for x in landed
    )
    assert [c for c in scheduled(history) if c[0] == "merge"] == [["merge"]]

    assert stored_kpis(op, "2030-01-01", "2030-01-31") == expected_kpis(shop.paths)
    assert stored_kpis(op, "2030-01-01", "2030-01-31")["daily"], "the reference has KPIs to compare"

    for x in landed:
        assert not op.s3.exists(x.key), f"{x.key} still in incoming/"
        dataset = x.key.split("/")[1]
        assert [k for k in keys(op, f"archive/{dataset}/") if k.endswith(f"/{x.path.name}")], f"{x.key} not archived"


# --- 2. rejected file --------------------------------------------------------------------------------------------
def test_file_missing_a_required_column_is_quarantined_and_the_execution_succeeds(
    op: operations.Stack, tmp_path: Path
) -> None:
    columns = [c for c in DATASETS["orders"].names if c != "user_id"]
    bad = write_csv(tmp_path, "orders_rejected.csv", [order(1_020_001, 1, "2030-02-10T10:00:00")], columns=columns)
    (landed,) = land(op, [bad])

    record = ledger_record(op, landed)
    assert record.outcome == "rejected" and record.reason == "missing_column"
    (arn,) = executions_of(op, [landed])
    described = finished(op, arn)
    assert described["status"] == "SUCCEEDED", "a bad file is an expected outcome, not a failure"
    history = op.workflow.history(arn)
    states = entered(history)
    assert "Quarantine" in states and "FileRejected" in states and "Transform" not in states
    assert "FileFailed" not in states
    assert ["quarantine", landed.file_id] in scheduled(history)
    output = json.loads(described["output"])
    assert [(f["key"], f["outcome"], f["failed"]) for f in output["files"]] == [(landed.key, "rejected", False)]

    assert not op.s3.exists(landed.key)
    moved = [k for k in keys(op, "rejected/orders/") if k.endswith("/orders_rejected.csv")]
    assert len(moved) == 1
    assert op.s3.get_bytes(moved[0]) == bad.read_bytes()
    report = json.loads(op.s3.get_bytes(moved[0] + ".report.json"))
    assert report["outcome"] == "rejected" and report["reason"] == "missing_column"
    assert "user_id" in json.dumps(report)
    assert stored_kpis(op, "2030-02-01", "2030-02-28") == {"daily": [], "category": []}


# --- 3. rows rejected under the threshold ------------------------------------------------------------------------
def test_bad_rows_under_the_threshold_are_reported_and_only_good_rows_count(
    op: operations.Stack, tmp_path: Path
) -> None:
    base, day = 1_030_000, "2030-03-15T12:00:00"
    products = write_csv(tmp_path, "products_rows.csv", [product(base + 1, "Garden-rows")])
    orders = [order(base + 100 + i, base + 10 + i % 7, day) for i in range(40)]
    orders[5] = order(base + 105, base + 15, day, status="misplaced")  # unknown_status
    orders[17] = order(base + 117, base + 10, "2030-03-15 noon")  # bad_type
    orders_path = write_csv(tmp_path, "orders_rows.csv", orders)
    items = [item(base + 500 + i, base + 100 + i, base + 10 + i % 7, base + 1, "3.30", day) for i in range(40)]
    items[9] = {**items[9], "sale_price": "-3.30"}  # negative_money
    items_path = write_csv(tmp_path, "order_items_rows.csv", items)
    files = [products, orders_path, items_path]
    landed = land(op, files)

    want_rejects = {orders_path: [(7, "unknown_status"), (19, "bad_type")], items_path: [(11, "negative_money")]}
    for x in landed:
        record = ledger_record(op, x)
        assert record.outcome == "accepted", x.key
        if x.path not in want_rejects:
            continue
        assert reference_rejects(x.path) == want_rejects[x.path], "the test's own expectation agrees with the reference"
        assert record.rejected_rows == len(want_rejects[x.path])
        body = op.s3.get_bytes(f"reports/{x.file_id}/rejected_rows.csv").decode()
        lines = body.splitlines()
        header = lines[0].split(",")
        rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
        assert sorted((int(r["_line"]), r["_reason"]) for r in rows) == want_rejects[x.path]
        raw = x.path.read_text().splitlines()
        for r in rows:  # each bad row is kept with its values
            source = dict(zip(raw[0].split(","), raw[int(r["_line"]) - 1].split(","), strict=True))
            assert {c: r[c] for c in source} == source

    kpis = stored_kpis(op, "2030-03-01", "2030-03-31")
    assert kpis == expected_kpis(files)
    assert kpis["daily"][0]["total_orders"] == 38 and kpis["daily"][0]["total_items_sold"] == 37


# --- 4. a task that crashes once ---------------------------------------------------------------------------------
def test_validate_task_crashing_once_times_out_and_succeeds_on_retry(
    op: operations.Stack, stack: EmbeddedStack, tmp_path: Path
) -> None:
    base, day = 1_040_000, "2030-04-12T07:30:00"
    orders = write_csv(tmp_path, "orders_crash.csv", [order(base + i, base + 50 + i % 2, day) for i in range(3)])
    with wrapped_tasks(stack, tmp_path, "crash_once", "orders_crash.csv") as wrapped:
        landed = land(op, [orders])
    (target,) = landed

    assert wrapped.calls() == [target.key] * 2, "crashed once, ran again"
    assert ledger_record(op, target).outcome == "accepted"
    (arn,) = executions_of(op, landed)
    assert finished(op, arn)["status"] == "SUCCEEDED"
    history = op.workflow.history(arn)
    mine = [(end, error) for command, end, error in task_attempts(history) if validates(command, target.key)]
    assert mine == [("TaskTimedOut", "States.Timeout"), ("TaskSucceeded", None)]
    assert entered(history).count("Validate") == 1, "a Retry, in place"
    assert sum(validates(c, target.key) for c in scheduled(history)) == 2
    others = [end for command, end, _ in task_attempts(history) if not validates(command, target.key)]
    assert others and set(others) == {"TaskSucceeded"}
    assert stored_kpis(op, "2030-04-01", "2030-04-30") == expected_kpis([orders])
    assert stored_kpis(op, "2030-04-01", "2030-04-30")["daily"][0]["total_orders"] == 3


# --- 5 and 6. a task that hangs, in a batch with good files ------------------------------------------------------
@dataclass
class FailedBatch:
    shop: Shop
    good: list[operations.Landed]
    bad: operations.Landed
    arn: str
    described: dict[str, Any]
    history: list[Event]
    alerts: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    wrapped: Wrapped
    hanging: int
    printed: str  # what `shopkpi ingest --wait` printed
    exit_status: int


@pytest.fixture(scope="module")
def failed_batch(
    op: operations.Stack, stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory, alert_queue: str
) -> FailedBatch:
    """One execution (shared by the two tests below): three good files and one whose validate hangs, every try."""
    folder = tmp_path_factory.mktemp("failed-batch")
    shop = small_shop(folder, "fail", 1_050_000, "2030-05")
    bad_path = write_csv(folder, "orders_failhang.csv", [order(1_050_900, 1_050_011, "2030-05-20T10:00:00")])
    paths = [*shop.paths, bad_path]
    with wrapped_tasks(stack, folder, "hang", "orders_failhang.csv") as wrapped:
        # Landed as a user would, with `shopkpi ingest --wait`: it returns once every file has an outcome, the
        # hanging one included (recorded as failed by the workflow), and the execution has ended.
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = cli.main(["ingest", *map(str, paths), "--wait", "--timeout", str(WAIT_S)])
        hanging = kill_wrapped(stack, [wrapped.script])
    landed = [_landed(op, p) for p in paths]
    bad = next(x for x in landed if x.path == bad_path)
    good = [x for x in landed if x.path != bad_path]
    arns = executions_of(op, good)
    assert len(arns) == 1, "one burst of files is one batch, one execution"
    described = finished(op, arns[0])
    history = op.workflow.history(arns[0])
    alerts = read_queue(op, alert_queue, lambda b: bad.key in b.get("Message", ""))
    dead = read_queue(op, op.outputs.workflow_dlq_url, lambda b: b.get("key") == bad.key)
    return FailedBatch(
        shop, good, bad, arns[0], described, history, alerts, dead, wrapped, hanging, out.getvalue(), status
    )


def _landed(op: operations.Stack, path: Path) -> operations.Landed:
    """What `operations.ingest` returned for a file the CLI landed."""
    dataset = next(n for n in sorted(DATASETS, key=len, reverse=True) if path.name.startswith(n))
    key = f"incoming/{dataset}/{path.name}"
    etag = hashlib.md5(path.read_bytes()).hexdigest()  # a single-part upload's ETag
    source = uri(op, key)
    return operations.Landed(path, key, file_id_for(source, etag), source)


def test_hanging_validate_times_out_exhausts_retries_alerts_and_dead_letters(
    op: operations.Stack, failed_batch: FailedBatch
) -> None:
    fb = failed_batch
    attempts = [(end, error) for command, end, error in task_attempts(fb.history) if validates(command, fb.bad.key)]
    assert attempts == [("TaskTimedOut", "States.Timeout")] * 3, "first attempt and the two States.Timeout retries"
    assert len(fb.wrapped.calls()) == 3 and fb.hanging == 3
    states = entered(fb.history)
    assert {"FileFailed", "NotifyFileFailure", "DeadLetterFile"} <= set(states)
    assert fb.described["status"] == "FAILED" and fb.described["error"] == "ShopKpi.FilesFailed"
    assert fb.history[-1]["type"] == "ExecutionFailed"
    assert fb.history[-1]["executionFailedEventDetails"]["error"] == "ShopKpi.FilesFailed"

    (alert,) = fb.alerts
    assert alert["Subject"] == "shopkpi: a file failed"
    message = json.loads(alert["Message"])
    assert message["key"] == fb.bad.key and message["failed"] is True and message["outcome"] == "failed"
    assert message["error"]["Error"] == "States.Timeout"
    (dead,) = fb.dead_letters
    assert dead["failed"] is True and dead["error"]["Error"] == "States.Timeout"


def test_one_failing_file_does_not_stop_the_good_files_of_its_batch(
    op: operations.Stack, failed_batch: FailedBatch
) -> None:
    fb = failed_batch
    states = entered(fb.history)
    assert "Merge" in states and states.index("Merge") > states.index("DeadLetterFile"), "merge ran after the failure"
    merge = [end for command, end, _ in task_attempts(fb.history) if command == ["merge"]]
    assert merge == ["TaskSucceeded"]
    for x in fb.good:
        assert ledger_record(op, x).outcome == "accepted"
        assert not op.s3.exists(x.key)
    assert stored_kpis(op, "2030-05-01", "2030-05-31") == expected_kpis(fb.shop.paths), "good files published"
    assert op.s3.exists(fb.bad.key), "the bad file is left for a retry"
    assert [d["key"] for d in fb.dead_letters] == [fb.bad.key]


def test_a_file_failed_after_its_retries_is_recorded_as_failed_and_listed_with_rejects(
    op: operations.Stack, failed_batch: FailedBatch
) -> None:
    fb = failed_batch
    record = op.ledger.get_failure(fb.bad.source)
    assert record is not None and record.outcome == "failed" and record.error_code == "States.Timeout"
    assert record.execution == fb.described["name"]
    listed = [f for f in operations.rejects(op) if f.source == fb.bad.source]
    assert [f.outcome for f in listed] == ["failed"]


def test_ingest_wait_shows_the_failed_file_and_execution_and_exits_non_zero(
    op: operations.Stack, failed_batch: FailedBatch
) -> None:
    fb = failed_batch
    assert fb.exit_status == 5, fb.printed
    rows = {line.split()[1]: line for line in fb.printed.splitlines() if "incoming/" in line}
    assert "failed" in rows[fb.bad.key] and "States.Timeout" in rows[fb.bad.key]
    assert all("accepted" in rows[x.key] for x in fb.good)
    assert "Failed executions" in fb.printed and "ShopKpi.FilesFailed" in fb.printed


# --- 7. the same object delivered twice --------------------------------------------------------------------------
def test_the_same_object_delivered_twice_is_counted_and_staged_once(op: operations.Stack, tmp_path: Path) -> None:
    shop = small_shop(tmp_path, "dup", 1_070_000, "2030-07")
    # Every file uploaded twice in one burst: both events in one batch, the two copies validated side by side.
    first = land(op, [*shop.paths, *shop.paths])
    assert len({x.file_id for x in first}) == 3, "same key, same content: same file id"
    (arn,) = executions_of(op, first)
    records = json.loads(op.workflow.history(arn)[0]["executionStartedEventDetails"]["input"])
    orders_key = next(x.key for x in first if x.path == shop.orders)
    events = [r for r in records if r["key"] == orders_key]
    assert len(events) == 2, "two S3 events for the two uploads"
    assert set(events[0]) == {"bucket", "key", "etag"}, "only what the workflow needs travels"

    # Later, once archived: the products file uploaded a third time, and an S3 event of the orders file delivered
    # twice more (an at-least-once queue), its object no longer in incoming/.
    before = {e["executionArn"] for e in op.workflow.executions(limit=1000)}
    again = operations.ingest(op, [shop.products])
    event = {
        "detail": {"bucket": {"name": events[0]["bucket"]}, "object": {"key": orders_key, "etag": events[0]["etag"]}}
    }
    op.buffer.send(json.dumps(event))
    op.buffer.send(json.dumps(event))
    assert operations.wait(op, WAIT_S, settle_s=SETTLE_S)
    assert again[0].file_id == next(x.file_id for x in first if x.path == shop.products)

    later = [e["executionArn"] for e in op.workflow.executions(limit=1000) if e["executionArn"] not in before]
    outcomes = []
    for a in [arn, *later]:
        described = finished(op, a)
        assert described["status"] == "SUCCEEDED", (a, described.get("error"), described.get("cause"))
        if a != arn:
            outcomes += [(f["key"], f["outcome"]) for f in json.loads(described["output"])["files"]]
    assert sorted(outcomes) == sorted([(again[0].key, "accepted"), (orders_key, "skipped"), (orders_key, "skipped")])

    assert stored_kpis(op, "2030-07-01", "2030-07-31") == expected_kpis(shop.paths), "counted once"
    staged = keys(op, "staging/manifest/")
    for x in first[:3]:
        assert ledger_record(op, x).outcome == "accepted"
        assert [k for k in staged if Path(k).name.startswith(x.path.stem + "-")] == [
            f"staging/manifest/{x.file_id}.json"
        ]
        # Merged: the segment's rows now live in the keyed state, and the segment itself is gone.
        assert [k for k in keys(op, "staging/segments/") if f"/{x.path.stem}-" in k] == []
        assert not op.s3.exists(x.key)
        assert len([k for k in keys(op, "archive/") if k.endswith(f"/{x.path.name}")]) == 1


# --- 8. the end-to-end invariant ---------------------------------------------------------------------------------
def test_generated_shop_landed_in_random_order_gives_exactly_the_reference_kpis(
    op: operations.Stack, tmp_path: Path
) -> None:
    seed = 20290101
    gen = generate(tmp_path / "gen", orders=300, days=5, parts=3, seed=seed, start=date(2029, 1, 1))
    files = []
    for p in gen.paths:  # products.csv -> products_e2e.csv, orders_part2.csv -> orders_part2_e2e.csv
        renamed = tmp_path / "in" / p.name.replace(".csv", "_e2e.csv")
        renamed.parent.mkdir(exist_ok=True)
        shutil.copy(p, renamed)
        files.append(renamed)
    rng = random.Random(seed)
    rng.shuffle(files)
    landed: list[operations.Landed] = []
    for p in files:
        time.sleep(rng.uniform(0.0, 0.5))
        landed += operations.ingest(op, [p])
    assert operations.wait(op, WAIT_S * 2, landed, settle_s=SETTLE_S)

    assert {ledger_record(op, x).outcome for x in landed} == {"accepted"}
    for arn in executions_of(op, landed):
        assert finished(op, arn)["status"] == "SUCCEEDED"
    kpis = stored_kpis(op, "2029-01-01", "2029-12-31")
    expected = expected_kpis([x.path for x in landed])
    assert len(expected["daily"]) >= 5 and expected["category"]
    assert kpis["daily"] == expected["daily"]
    assert kpis["category"] == expected["category"]


# --- 8b. groups that move ---------------------------------------------------------------------------------------
def test_order_moved_to_another_date_and_product_moved_to_another_category_leave_no_stale_item(
    op: operations.Stack, tmp_path: Path
) -> None:
    shop = small_shop(tmp_path, "move", 1_080_000, "2030-08")
    land(op, shop.paths)
    assert stored_kpis(op, "2030-08-01", "2030-08-31") == expected_kpis(shop.paths)
    # Later files: product 2 is now a garden product, and order 3 (the day's only shipped one) moves to the 20th.
    base = 1_080_000
    revisions = [
        write_csv(tmp_path / "v2", "products_move_v2.csv", [product(base + 2, "Garden-move")]),
        write_csv(
            tmp_path / "v2",
            "orders_move_v2.csv",
            [order(base + 103, base + 13, "2030-08-20T11:00:00", status="shipped", shipped_at="2030-08-21T08:00:00")],
        ),
    ]
    land(op, revisions)
    expected = expected_kpis([*shop.paths, *revisions])
    assert {k["category"] for k in expected["category"]} == {"Toys-move", "Garden-move"}
    assert stored_kpis(op, "2030-08-01", "2030-08-31") == expected
    # No item is left behind for the groups that vanished: the tables hold exactly the recomputed keys.
    stored = {
        (i.get("category", {}).get("S"), i["order_date"]["S"])
        for t in (op.outputs.order_table, op.outputs.category_table)
        for i in scan(op, t)
        if i.get("order_date", {}).get("S", "").startswith("2030-08")
    }
    assert stored == {(None, k["order_date"]) for k in expected["daily"]} | {
        (k["category"], k["order_date"]) for k in expected["category"]
    }


# --- 9. reprocess ------------------------------------------------------------------------------------------------
def test_reprocessing_unchanged_inputs_succeeds_and_changes_no_kpi_item(
    op: operations.Stack, happy: tuple[Shop, list[operations.Landed]]
) -> None:
    """Every KPI the module published so far (at least the happy path's) is recomputed: none may change."""
    shop, _ = happy
    assert stored_kpis(op, "2030-01-01", "2030-01-31") == expected_kpis(shop.paths)
    tables = (op.outputs.order_table, op.outputs.category_table)
    before = {t: scan(op, t) for t in tables}
    # Every KPI item, not the order table's index of years (which has no figures).
    stored_dates = {i["order_date"]["S"] for i in before[op.outputs.order_table] if "total_orders" in i}
    assert {"2030-01-03", "2030-01-04"} <= stored_dates

    arn = operations.reprocess(op, "2029-01-01", "2030-12-31")
    described = finished(op, arn)
    assert described["status"] == "SUCCEEDED"
    history = op.workflow.history(arn)
    assert "Reprocess" in entered(history) and "ProcessFiles" not in entered(history)
    assert scheduled(history) == [["merge", "--from", "2029-01-01", "--to", "2030-12-31"]]
    merge = json.loads(described["output"])["merge"]
    assert stored_dates <= set(merge["dates"]), "every stored date was recomputed"
    assert merge["published"] == 0

    assert {t: scan(op, t) for t in tables} == before, "no item rewritten: not even computed_at moved"


# --- 10. names that S3 events URL-encode -------------------------------------------------------------------------
def test_file_names_that_s3_events_url_encode_are_processed_not_lost(op: operations.Stack, tmp_path: Path) -> None:
    # The embedded trigger encodes keys as S3 does ("a b" arrives as "a+b"): read as it comes, no such object exists.
    shop = small_shop(tmp_path, "enc", 1_090_000, "2030-09")
    names = ["products_red flower+1.csv", "orders_a=b:c é.csv", "order_items_(1) ~%20.csv"]
    paths = [p.rename(p.with_name(n)) for p, n in zip(shop.paths, names, strict=True)]
    landed = land(op, paths)
    for x in landed:
        assert ledger_record(op, x).outcome == "accepted", x.key
        assert not op.s3.exists(x.key), f"{x.key} left in incoming/"
    archived = {k.rsplit("/", 1)[-1] for k in keys(op, "archive/")}
    assert set(names) <= archived
    assert stored_kpis(op, "2030-09-01", "2030-09-30") == expected_kpis(paths)


def test_files_of_one_name_in_day_folders_are_all_ingested_and_counted(op: operations.Stack, tmp_path: Path) -> None:
    # A folder per day, the same file names in each: `shopkpi ingest FOLDER` lands every file, none replacing another.
    days = [small_shop(tmp_path / day, day, base, month) for day, base, month in
            (("day1", 1_100_000, "2030-10"), ("day2", 1_110_000, "2030-11"))]  # fmt: skip
    paths = [p.rename(p.with_name(p.name.rsplit("_", 1)[0] + ".csv")) for shop in days for p in shop.paths]
    assert sorted({p.name for p in paths}) == ["order_items.csv", "orders.csv", "products.csv"]
    landed = operations.ingest(op, [tmp_path])
    assert len({x.key for x in landed}) == len(paths) == 6
    assert operations.wait(op, WAIT_S, landed, settle_s=SETTLE_S)
    assert all(ledger_record(op, x).outcome == "accepted" for x in landed)
    assert stored_kpis(op, "2030-10-01", "2030-11-30") == expected_kpis(paths)
