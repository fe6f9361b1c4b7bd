"""A first load's merge on the embedded stack: the merge task answers ``fanout``, a Map runs one ECS task per part,
a final task commits; the KPIs in DynamoDB are exact and nothing of the fan-out is left in the staging area.

The stack here fans out any first load above 200 staged rows into 3 parts (``SHOPKPI_FANOUT_ROWS``,
``SHOPKPI_MERGE_PARTS``), so a small shop takes the path a multi-GB first load takes on AWS.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestration import operations
from orchestration.local.stack import EmbeddedStack
from processor.aws.dynamo import MergeLock
from processor.settings import Settings
from tests.builders import item, order, product
from tests.orchestration.test_embedded_stack import (
    NUMBERS,
    entered,
    execution_arn,
    expected_kpis,
    finished,
    ledger_record,
    scheduled,
    stored_kpis,
    wrapped_tasks,
    write_csv,
)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def fanout_stack(root: Path) -> Iterator[EmbeddedStack]:
    """A stack whose first load fans out. Each test has one of its own (only a first load fans out), one after the
    other: two embedded stacks cannot run in one process at once."""
    stack = EmbeddedStack(
        Settings.load(env={}, stack=f"fan{uuid.uuid4().hex[:8]}", work_dir=root / "work"),
        port=0,
        # parts run side by side: on a busy 2-core machine their first heartbeats come late
        numbers={**NUMBERS, "HeartbeatSeconds": 25, "MergeTimeoutSeconds": 180},
        task_env={"SHOPKPI_BUCKETS": "6", "SHOPKPI_MERGE_PARTS": "3", "SHOPKPI_FANOUT_ROWS": "200"},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def operated(stack: EmbeddedStack) -> operations.Stack:
    assert stack.clients is not None and stack.outputs is not None
    return operations.Stack(stack.settings, stack.clients, stack.outputs)


@pytest.fixture
def op(tmp_path: Path) -> Iterator[operations.Stack]:
    with fanout_stack(tmp_path / "stack") as stack:
        yield operated(stack)


def shop(folder: Path) -> list[Path]:
    """300 orders over January 2032 and 601 items, one of them with another user than its order's."""
    products = write_csv(folder, "products_fan.csv", [product(1, "Toys"), product(2, "Books")])
    orders = write_csv(
        folder,
        "orders_fan.csv",
        [order(20_000 + i, 700 + i % 40, f"2032-01-{1 + i % 28:02d}T10:00:00") for i in range(300)],
    )
    items = write_csv(
        folder,
        "order_items_fan.csv",
        [
            item(80_000 + i, 20_000 + i % 300, 700 + (i % 300) % 40, 1 + i % 2, f"{1 + i % 5}.50", "complete",
                 created_at=f"2032-01-{1 + (i % 300) % 28:02d}T10:00:00")
            for i in range(600)
        ]
        + [item(89_999, 20_001, 999, 1, "2.00", "complete", created_at="2032-01-02T10:00:00")],  # user mismatch
    )  # fmt: skip
    return [products, orders, items]


def test_a_first_load_is_merged_by_parallel_part_tasks_with_exact_kpis(op: operations.Stack, tmp_path: Path) -> None:
    products, orders, items = shop(tmp_path)
    landed = operations.ingest(op, [products, orders, items])
    assert operations.wait(op, 300, landed, settle_s=1.0)
    assert {ledger_record(op, x).outcome for x in landed} == {"accepted"}

    parts, finished_once = set(), 0
    for name in {str(ledger_record(op, x).execution) for x in landed}:
        arn = execution_arn(op, name)
        assert finished(op, arn)["status"] == "SUCCEEDED"
        history = op.workflow.history(arn)
        parts |= {json.loads(c[1])["part"] for c in scheduled(history) if c[0] == "merge-part"}
        finished_once += entered(history).count("MergeFinish")
    assert finished_once == 1 and parts == {0, 1, 2}, (finished_once, parts)

    assert stored_kpis(op, "2032-01-01", "2032-01-31") == expected_kpis([products, orders, items])
    merged = operations.merge_rejects(op)  # the merge-time reject is counted and its row kept, as unsplit
    assert merged["user_mismatch"] == 1 and len(merged["rows"]) == 1, merged
    rejected = op.s3.get_bytes(merged["rows"][0].split("/", 3)[3])
    assert rejected is not None and b"89999" in rejected
    leftovers = [k for k in op.s3.list_keys("staging/state/") if k.endswith(("plan.json", "result.json"))]
    assert not leftovers


def test_a_failed_part_falls_back_to_one_merge_task_with_exact_kpis(tmp_path: Path) -> None:
    with fanout_stack(tmp_path / "stack") as stack, wrapped_tasks(stack, tmp_path, "stale_part", "1") as wrapped:
        op = operated(stack)
        files = shop(tmp_path)
        landed = operations.ingest(op, files)
        assert operations.wait(op, 300, landed, settle_s=1.0)
        assert wrapped.marker.exists()  # part 1 was given a plan that is not there
        names = {str(ledger_record(op, x).execution) for x in landed}
        fell_back = []
        for name in names:
            arn = execution_arn(op, name)
            described = finished(op, arn)
            assert described["status"] == "SUCCEEDED", described
            if "MergeFallback" in entered(op.workflow.history(arn)):
                fell_back.append(json.loads(described["output"])["merge"])
        [merged] = fell_back  # one execution planned the fan-out; its merge ran again as one task
        assert merged["fanout_failed"]["Error"] == "ShopKpi.StalePlan", merged
        assert stored_kpis(op, "2032-01-01", "2032-01-31") == expected_kpis(files)
        assert not [k for k in op.s3.list_keys("staging/state/") if k.endswith(("plan.json", "result.json"))]
        assert MergeLock(op.ledger.client, op.ledger.table).holder() is None  # let go, not left to run out
