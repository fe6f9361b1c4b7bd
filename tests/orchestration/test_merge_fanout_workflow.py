"""A first load's merge on the embedded stack: the merge task answers ``fanout``, a Map runs one ECS task per part,
a final task commits; the KPIs in DynamoDB are exact and nothing of the fan-out is left in the staging area.

The stack here fans out any first load above 200 staged rows into 3 parts (``SHOPKPI_FANOUT_ROWS``,
``SHOPKPI_MERGE_PARTS``), so a small shop takes the path a multi-GB first load takes on AWS.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestration import operations
from orchestration.local.stack import EmbeddedStack
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
    write_csv,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def op(tmp_path_factory: pytest.TempPathFactory) -> Iterator[operations.Stack]:
    root = tmp_path_factory.mktemp("fanout-stack")
    stack = EmbeddedStack(
        Settings.load(env={}, stack=f"fan{uuid.uuid4().hex[:8]}", work_dir=root / "work"),
        port=0,
        # parts run side by side: on a busy 2-core machine their first heartbeats come late
        numbers={**NUMBERS, "HeartbeatSeconds": 25, "MergeTimeoutSeconds": 180},
        task_env={"SHOPKPI_BUCKETS": "6", "SHOPKPI_MERGE_PARTS": "3", "SHOPKPI_FANOUT_ROWS": "200"},
    )
    try:
        stack.start()
        assert stack.clients is not None and stack.outputs is not None
        yield operations.Stack(stack.settings, stack.clients, stack.outputs)
    finally:
        stack.stop()


def test_a_first_load_is_merged_by_parallel_part_tasks_with_exact_kpis(op: operations.Stack, tmp_path: Path) -> None:
    products = write_csv(tmp_path, "products_fan.csv", [product(1, "Toys"), product(2, "Books")])
    orders = write_csv(
        tmp_path,
        "orders_fan.csv",
        [order(20_000 + i, 700 + i % 40, f"2032-01-{1 + i % 28:02d}T10:00:00") for i in range(300)],
    )
    items = write_csv(
        tmp_path,
        "order_items_fan.csv",
        [
            item(80_000 + i, 20_000 + i % 300, 700 + (i % 300) % 40, 1 + i % 2, f"{1 + i % 5}.50", "complete",
                 created_at=f"2032-01-{1 + (i % 300) % 28:02d}T10:00:00")
            for i in range(600)
        ]
        + [item(89_999, 20_001, 999, 1, "2.00", "complete", created_at="2032-01-02T10:00:00")],  # user mismatch
    )  # fmt: skip
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
