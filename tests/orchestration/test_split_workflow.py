"""A big file on the embedded stack: the workflow splits it, validates its parts in parallel ECS tasks through a Map,
combines them, and the file ends as one: one outcome, one report, exact KPIs.

The stack here splits any file above 40 KB into parts of about 16 KB (4 at most), so small files take the path a
multi-GB file takes on AWS (``SHOPKPI_SPLIT_MB``, ``SHOPKPI_PART_MB``, ``SHOPKPI_MAX_PARTS``).
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

SPLIT = {
    "SHOPKPI_SPLIT_MB": str(40 / 1024),
    "SHOPKPI_PART_MB": str(16 / 1024),
    "SHOPKPI_MAX_PARTS": "4",
    # a cut needs a quote-free stretch of the record limit before it: a small limit lets small files be cut
    "SHOPKPI_MAX_RECORD_KB": "2",
}


@pytest.fixture(scope="module")
def op(tmp_path_factory: pytest.TempPathFactory) -> Iterator[operations.Stack]:
    root = tmp_path_factory.mktemp("split-stack")
    stack = EmbeddedStack(
        Settings.load(env={}, stack=f"sps{uuid.uuid4().hex[:8]}", work_dir=root / "work"),
        port=0,
        # parts run side by side: on a busy 2-core machine their first heartbeats come late
        numbers={**NUMBERS, "HeartbeatSeconds": 25, "ValidateTimeoutSeconds": 180, "StepTimeoutSeconds": 60},
        task_env={"SHOPKPI_BUCKETS": "4", **SPLIT},
    )
    try:
        stack.start()
        assert stack.clients is not None and stack.outputs is not None
        yield operations.Stack(stack.settings, stack.clients, stack.outputs)
    finally:
        stack.stop()


def test_a_big_file_is_validated_in_parallel_parts_and_ends_as_one_file_with_exact_kpis(
    op: operations.Stack, tmp_path: Path
) -> None:
    products = write_csv(tmp_path, "products_split.csv", [product(1, "Toys"), product(2, "Books")])
    orders = write_csv(
        tmp_path,
        "orders_split.csv",
        [order(10_000 + i, 500 + i % 50, f"2031-01-{1 + i % 28:02d}T10:00:00") for i in range(1_500)]
        + [order(10_000, 999, "2031-02-01T10:00:00")],  # a key repeated far from its first row: another part's
    )
    items = write_csv(
        tmp_path,
        "order_items_split.csv",
        [
            item(90_000 + i, 10_000 + i % 1_500, 500 + (i % 1_500) % 50, 1 + i % 2, f"{1 + i % 7}.25", "complete",
                 created_at=f"2031-01-{1 + (i % 1_500) % 28:02d}T10:00:00")
            for i in range(3_000)
        ]
        + [{"id": 95_000, "order_id": 10_001, "user_id": 501, "product_id": 1, "status": "lost",
            "created_at": "2031-01-02T10:00:00", "sale_price": "1.00"}],
    )  # fmt: skip
    assert items.stat().st_size > 3 * 16 * 1024
    landed = operations.ingest(op, [products, orders, items])
    assert operations.wait(op, 300, landed, settle_s=1.0)

    outcomes = {x.path.name: ledger_record(op, x) for x in landed}
    assert {n: r.outcome for n, r in outcomes.items()} == dict.fromkeys(outcomes, "accepted"), outcomes
    assert outcomes["orders_split.csv"].rejects_by_reason == {"duplicate_key": 1}
    assert outcomes["order_items_split.csv"].rejects_by_reason == {"unknown_status": 1}
    assert outcomes["order_items_split.csv"].rows == 3_001

    parts: dict[str, int] = {}
    for name in {str(r.execution) for r in outcomes.values()}:
        arn = execution_arn(op, name)
        assert finished(op, arn)["status"] == "SUCCEEDED"
        history = op.workflow.history(arn)
        for command in scheduled(history):
            if command[0] == "validate-part":
                file_id = json.loads(command[1])["file_id"]
                parts[file_id] = parts.get(file_id, 0) + 1
        assert "Combine" in entered(history) or not parts
    big = {outcomes[n].file_id for n in ("orders_split.csv", "order_items_split.csv")}
    assert set(parts) == big and min(parts.values()) >= 2, parts  # the products file is small: read whole
    assert not list(op.s3.list_keys("staging/parts/"))  # the parts' leftovers are gone

    assert stored_kpis(op, "2031-01-01", "2031-02-28") == expected_kpis([products, orders, items])
