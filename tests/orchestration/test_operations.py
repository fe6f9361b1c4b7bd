"""What ``wait`` reports while it waits (the progress of ``ingest --wait``, ``reprocess --wait`` and ``demo``), and
the difference of two KPI snapshots that ``reprocess --wait`` prints."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestration import operations
from processor.aws.dynamo import FileRecord
from processor.errors import ConfigError
from processor.model import CategoryKpi, OrderKpi


class Pipeline:
    """A stack whose ledger, executions and buffer move one step at each poll, as the pipeline would."""

    def __init__(self, steps: list[tuple[dict[str, FileRecord], list[str], int]]) -> None:
        self.steps = steps  # per poll: records by file id, running execution names, queued events
        self.poll = -1
        self.ledger = SimpleNamespace(get_file=self.get_file, get_failure=lambda source: None)
        self.workflow = SimpleNamespace(executions=self.executions, describe=self.describe)
        self.outputs = SimpleNamespace(state_machine_arn="arn:aws:states:us-east-1:1:stateMachine:shop")
        self.described: list[str] = []
        self.buffer = SimpleNamespace(depth=lambda: self.steps[self.poll][2])

    def executions(self, status: str, limit: int) -> list[dict[str, str]]:
        self.poll = min(self.poll + 1, len(self.steps) - 1)  # listed first in each poll
        return [{"name": n} for n in self.steps[self.poll][1]]

    def describe(self, arn: str) -> dict[str, str]:
        self.described.append(arn)
        return {"status": "FAILED" if arn.endswith("failing") else "SUCCEEDED"}

    def get_file(self, file_id: str) -> FileRecord | None:
        return self.steps[self.poll][0].get(file_id)


def landed(file_id: str) -> operations.Landed:
    return operations.Landed(Path(f"{file_id}.csv"), f"incoming/orders/{file_id}.csv", file_id)


def test_wait_reports_files_validated_and_merged_and_returns_once_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operations.time, "sleep", lambda s: None)
    a = FileRecord(outcome="accepted", execution="batch-1")
    r = FileRecord(outcome="rejected", execution="batch-1")
    late = FileRecord(outcome="accepted", execution="failing")
    pipeline = Pipeline(
        [
            ({}, [], 2),  # landed, the events still queued
            ({"a": a}, ["batch-1"], 0),  # one validated, its execution merging
            ({"a": a, "r": r, "f": late}, ["batch-1", "failing"], 0),
            ({"a": a, "r": r, "f": late}, ["failing"], 0),  # batch-1 ended: its accepted file is merged
            ({"a": a, "r": r, "f": late}, [], 0),  # the other one failed (its merge): its file is not
        ]
    )
    seen: list[operations.WaitStatus] = []
    files = [landed("a"), landed("r"), landed("f")]
    assert operations.wait(pipeline, 60, files, settle_s=0.0, on_status=seen.append)  # type: ignore[arg-type]
    assert [(s.validated, s.merged, s.running, s.queued) for s in seen] == [
        (0, 0, 0, 2),
        (1, 0, 1, 0),
        (3, 0, 2, 0),
        (3, 1, 1, 0),
        (3, 1, 0, 0),
    ]
    assert all(s.files == s.landed == 3 for s in seen)
    # Each execution is described once, when it has ended.
    assert sorted(pipeline.described) == [
        "arn:aws:states:us-east-1:1:execution:shop:batch-1",
        "arn:aws:states:us-east-1:1:execution:shop:failing",
    ]


def test_a_record_that_changes_after_validation_is_read_again_until_its_execution_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(operations.time, "sleep", lambda s: None)
    accepted = FileRecord(outcome="accepted", execution="batch-1")
    failed = FileRecord(outcome="failed", execution="batch-1", error_code="States.Timeout")
    pipeline = Pipeline([({"a": accepted}, ["batch-1"], 0), ({"a": failed}, [], 0)])
    seen: list[operations.WaitStatus] = []
    assert operations.wait(pipeline, 60, [landed("a")], settle_s=0.0, on_status=seen.append)  # type: ignore[arg-type]
    assert [(s.validated, s.merged) for s in seen] == [(1, 0), (1, 0)]  # failed after all: never merged


def test_wait_gives_up_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(operations.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(operations.time, "sleep", lambda s: None)
    pipeline = Pipeline([({}, ["batch-1"], 0)])
    assert not operations.wait(pipeline, 30, [landed("a")])  # type: ignore[arg-type]


def test_outcomes_are_typed_records_with_unknown_until_the_ledger_has_one() -> None:
    pipeline = Pipeline([({"a": FileRecord(outcome="accepted")}, [], 0)])
    pipeline.poll = 0
    results = operations.outcomes(pipeline, [landed("a"), landed("b")])  # type: ignore[arg-type]
    assert [(r.file, r.outcome) for r in results] == [
        ("incoming/orders/a.csv", "accepted"),
        ("incoming/orders/b.csv", "unknown"),
    ]
    assert results[1].record is None


def day(date: str, cents: int) -> OrderKpi:
    return OrderKpi(
        order_date=date, total_orders=1, returned_orders=0, total_items_sold=1, revenue_cents=cents, unique_customers=1
    )


def cat(name: str, date: str, cents: int) -> CategoryKpi:
    return CategoryKpi(category=name, order_date=date, orders=1, returned_orders=0, items=1, revenue_cents=cents)


def snapshot(days: list[OrderKpi], cats: list[CategoryKpi]) -> operations.KpiSnapshot:
    return operations.KpiSnapshot({d.order_date: d for d in days}, {(c.category, c.order_date): c for c in cats})


def test_kpi_changes_compare_item_by_item() -> None:
    before = snapshot(
        [day("2025-03-01", 100), day("2025-03-02", 200)],
        [cat("Books", "2025-03-01", 100), cat("Toys", "2025-03-02", 5)],
    )
    after = snapshot(
        [day("2025-03-01", 100), day("2025-03-02", 201), day("2025-03-03", 7)], [cat("Books", "2025-03-01", 100)]
    )
    changes = operations.kpi_changes(before, after)
    assert changes.dates == ["2025-03-02", "2025-03-03"]
    assert changes.daily == operations.ItemChanges(rewritten=1, added=1, removed=0)
    assert changes.category == operations.ItemChanges(rewritten=0, added=0, removed=1)
    assert changes.unchanged == 2 and changes.changed
    assert not operations.kpi_changes(after, after).changed


# --- where ingest lands files ----------------------------------------------------------------------------------------
def write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("order_id\n1\n")
    return path


def test_files_of_one_name_in_different_folders_land_as_different_objects(tmp_path: Path) -> None:
    day1, day2 = write(tmp_path / "day1" / "orders.csv"), write(tmp_path / "day2" / "orders.csv")
    assert operations.landing_keys([tmp_path]) == [
        (day1, "incoming/orders/day1/orders.csv"),
        (day2, "incoming/orders/day2/orders.csv"),
    ]


def test_a_file_given_itself_lands_under_its_name_and_its_dataset(tmp_path: Path) -> None:
    items = write(tmp_path / "deep" / "order_items_part3.csv")
    other = write(tmp_path / "notes.csv")
    assert operations.landing_keys([items, other]) == [
        (items, "incoming/order_items/order_items_part3.csv"),
        (other, "incoming/unknown/notes.csv"),
    ]


def test_a_local_landing_area_keeps_its_datasets_without_repeating_them(tmp_path: Path) -> None:
    # the dataset comes from the folder after incoming/, as shopkpi process reads it, not from the file name
    part = write(tmp_path / "copy" / "incoming" / "orders" / "2025" / "part-0001.csv")
    products = write(tmp_path / "copy" / "products" / "products.csv")  # a folder named after its dataset
    assert operations.landing_keys([tmp_path / "copy"]) == [
        (part, "incoming/orders/2025/part-0001.csv"),
        (products, "incoming/products/products.csv"),
    ]
    assert operations.landing_keys([tmp_path / "copy" / "incoming" / "orders"]) == [
        (part, "incoming/orders/2025/part-0001.csv")
    ]


def test_two_files_that_would_land_at_one_key_are_refused_before_anything_lands(tmp_path: Path) -> None:
    first, second = write(tmp_path / "a" / "orders.csv"), write(tmp_path / "b" / "orders.csv")
    with pytest.raises(ConfigError) as refused:
        operations.landing_keys([first, second])
    assert refused.value.message == (
        f"{first} and {second} would both land at incoming/orders/orders.csv, the second replacing the first: "
        "rename one, or pass the folder that holds both"
    )
    assert operations.landing_keys([first, first]) == [(first, "incoming/orders/orders.csv")]  # named twice: once
