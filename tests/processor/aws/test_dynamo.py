"""KPI tables, the Ledger and the MergeLock against moto: access patterns, generation fencing, digests, retries, the
lock."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any, cast

import boto3
import msgspec
import pytest
from botocore.stub import Stubber

from processor.aws.dynamo import (
    BY_DATE,
    BY_KIND,
    FileRecord,
    KpiTables,
    Ledger,
    MergeLock,
    RunRecord,
    TableNames,
    create_tables,
    table_definitions,
)
from processor.errors import LockBusy, StaleWriter, Throttled
from processor.model import CategoryKpi, OrderKpi, ValidationResult
from tests.builders import day_kpi

PREFIX = "test"


class NoScan:
    """Delegates to a real client but fails the test on any Scan: every access pattern must be a Query/Get."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        assert name != "scan", "Scan used"
        return getattr(self._real, name)

    def get_paginator(self, name: str) -> Any:
        assert name != "scan", "Scan used"
        return self._real.get_paginator(name)


class FakeClock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def shared_client() -> Any:
    # Building a client costs ~0.1 s; moto intercepts any client while a mock is active, so one is enough.
    return boto3.client("dynamodb", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")


@pytest.fixture
def ddb(aws: None, shared_client: Any) -> Any:
    return shared_client


@pytest.fixture
def names(ddb: Any) -> TableNames:
    return create_tables(ddb, PREFIX)


@pytest.fixture
def kpis(ddb: Any, names: TableNames) -> KpiTables:
    return KpiTables(cast(Any, NoScan(ddb)), names.order, names.category, threads=4, sleep=lambda s: None)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(ddb: Any, names: TableNames, clock: FakeClock) -> Ledger:
    return Ledger(cast(Any, NoScan(ddb)), names.ledger, clock=clock)


@pytest.fixture
def lock(ddb: Any, names: TableNames, clock: FakeClock) -> MergeLock:
    return MergeLock(cast(Any, NoScan(ddb)), names.ledger, clock=clock)


def order_kpi(day: str, orders: int = 10, returned: int = 1, cents: int = 12_345) -> OrderKpi:
    return day_kpi(day, orders=orders, returned=returned, items=orders * 2, cents=cents, customers=orders - 1)


def category_kpi(category: str, day: str, orders: int = 3, cents: int = 4_999) -> CategoryKpi:
    return CategoryKpi(
        category=category,
        order_date=day,
        orders=orders,
        returned_orders=1,
        items=orders + 1,
        revenue_cents=cents,
    )


DAYS = ["2024-12-30", "2024-12-31", "2025-01-01", "2025-03-30"]
CATEGORIES = ["Accessories", "Jeans", "Tops & Tees"]


def sample() -> tuple[list[OrderKpi], list[CategoryKpi]]:
    daily = [order_kpi(d, orders=10 + i) for i, d in enumerate(DAYS)]
    category = [category_kpi(c, d, orders=1 + i + j) for i, d in enumerate(DAYS) for j, c in enumerate(CATEGORIES)]
    return daily, category


def raw_order_item(ddb: Any, names: TableNames, day: str) -> dict[str, Any]:
    key = {"order_year": {"S": day[:4]}, "order_date": {"S": day}}
    item: dict[str, Any] = ddb.get_item(TableName=names.order, Key=key)["Item"]
    return item


# --- table design ----------------------------------------------------------------------------------------
def test_table_definitions_are_on_demand_with_the_documented_keys() -> None:
    order, category, ledger = table_definitions("p")
    assert order["TableName"] == "p-order-kpis"
    assert [k["AttributeName"] for k in order["KeySchema"]] == ["order_year", "order_date"]
    assert [k["AttributeName"] for k in category["KeySchema"]] == ["category", "order_date"]
    (by_date,) = category["GlobalSecondaryIndexes"]
    assert by_date["IndexName"] == BY_DATE
    assert [k["AttributeName"] for k in by_date["KeySchema"]] == ["order_date", "category"]
    assert [k["AttributeName"] for k in ledger["KeySchema"]] == ["pk", "sk"]
    (by_kind,) = ledger["GlobalSecondaryIndexes"]
    assert by_kind["IndexName"] == BY_KIND
    assert [k["AttributeName"] for k in by_kind["KeySchema"]] == ["kind", "updated_at"]
    for table in (order, category, ledger):
        assert table["BillingMode"] == "PAY_PER_REQUEST"
    for index in (by_date, by_kind):
        assert index["Projection"] == {"ProjectionType": "ALL"}


def test_create_tables_is_idempotent_and_tables_are_active(ddb: Any, names: TableNames) -> None:
    assert create_tables(ddb, PREFIX) == names
    for name in (names.order, names.category, names.ledger):
        assert ddb.describe_table(TableName=name)["Table"]["TableStatus"] == "ACTIVE"


# --- publish and read back -------------------------------------------------------------------------------
def test_published_kpis_are_read_back_by_every_access_pattern(kpis: KpiTables) -> None:
    daily, category = sample()
    stats = kpis.publish(daily, category, generation=1, computed_at="2025-04-01T00:00:00Z", run_id="exec-1")
    assert (stats.written, stats.unchanged, stats.stale) == (16, 0, 0)
    assert (stats.daily_written, stats.category_written) == (4, 12)

    # order KPIs: a range spanning two year partitions, open-ended ranges (years index), one date
    assert kpis.daily("2024-12-31", "2025-03-30") == daily[1:]
    assert kpis.daily() == daily
    assert kpis.daily(date_from="2025-01-01") == daily[2:]
    assert kpis.daily(date_to="2024-12-31") == daily[:2]
    assert kpis.daily("2025-02-01", "2025-02-28") == []
    assert kpis.daily("2025-03-30", "2024-01-01") == []
    assert kpis.years() == ["2024", "2025"]

    # category KPIs: one category over a range (base table), all categories of a range or of a date (GSI)
    jeans = [c for c in category if c.category == "Jeans"]
    assert kpis.category("Jeans", "2024-12-31", "2025-01-01") == jeans[1:3]
    assert kpis.category("Jeans") == jeans
    assert kpis.category(None, "2025-01-01", "2025-12-31") == category[6:]
    assert kpis.category() == category
    assert kpis.category("Unknown") == []

    day, cats = kpis.date("2025-01-01")
    assert day == daily[2]
    assert cats == category[6:9]
    assert kpis.date("2020-01-01") == (None, [])


def test_items_hold_the_shown_figures_components_and_provenance(ddb: Any, names: TableNames, kpis: KpiTables) -> None:
    k = day_kpi("2025-03-30", orders=3, returned=1, items=5, cents=1_000_050, customers=2)
    kpis.publish([k], [], generation=7, computed_at="2025-04-01T10:00:00Z", run_id="exec-7")
    item = raw_order_item(ddb, names, "2025-03-30")
    assert Decimal(item["total_revenue"]["N"]) == Decimal("10000.50")
    assert Decimal(item["return_rate"]["N"]) == Decimal("33.33")
    assert item["revenue_cents"]["N"] == "1000050"
    assert item["returned_orders"]["N"] == "1"
    assert item["generation"]["N"] == "7"
    assert item["computed_at"]["S"] == "2025-04-01T10:00:00Z"
    assert item["run_id"]["S"] == "exec-7"
    assert len(item["digest"]["S"]) == 32


def test_many_items_are_written_in_parallel_batches(kpis: KpiTables) -> None:
    days = [f"2025-{m:02d}-{d:02d}" for m in (1, 2) for d in range(1, 21)]
    daily = [order_kpi(d) for d in days]
    category = [category_kpi(c, d) for d in days for c in CATEGORIES]
    stats = kpis.publish(daily, category, generation=1, computed_at="t", run_id="r")
    assert stats.written == 40 + 120  # 7 batches of at most 25 on 4 workers
    assert kpis.daily("2025-01-01", "2025-12-31") == daily
    assert kpis.category("Jeans") == [c for c in category if c.category == "Jeans"]


def test_an_older_generation_never_overwrites_a_newer_one(kpis: KpiTables) -> None:
    newer = [order_kpi("2025-03-30", orders=50)], [category_kpi("Jeans", "2025-03-30", orders=9)]
    older = [order_kpi("2025-03-30", orders=40)], [category_kpi("Jeans", "2025-03-30", orders=8)]
    kpis.publish(*newer, generation=5, computed_at="t5", run_id="r5")

    stats = kpis.publish(*older, generation=4, computed_at="t4", run_id="r4")
    assert (stats.written, stats.unchanged, stats.stale) == (0, 0, 2)
    assert kpis.date("2025-03-30") == (newer[0][0], newer[1])


def test_a_newer_generation_replaces_changed_values(kpis: KpiTables) -> None:
    kpis.publish([order_kpi("2025-03-30", orders=40)], [], generation=4, computed_at="t4", run_id="r4")
    stats = kpis.publish([order_kpi("2025-03-30", orders=50)], [], generation=5, computed_at="t5", run_id="r5")
    assert stats.written == 1
    assert kpis.daily()[0].total_orders == 50


def test_unchanged_kpis_are_skipped_and_keep_their_computed_at(ddb: Any, names: TableNames, kpis: KpiTables) -> None:
    daily, category = sample()
    kpis.publish(daily, category, generation=1, computed_at="2025-04-01T00:00:00Z", run_id="exec-1")
    stats = kpis.publish(daily, category, generation=2, computed_at="2025-04-02T00:00:00Z", run_id="exec-2")
    assert (stats.written, stats.unchanged, stats.stale) == (0, 16, 0)
    item = raw_order_item(ddb, names, DAYS[0])
    assert (item["computed_at"]["S"], item["generation"]["N"], item["run_id"]["S"]) == (
        "2025-04-01T00:00:00Z",
        "1",
        "exec-1",
    )


def test_a_reprocess_removes_a_category_item_left_on_a_date_without_an_order_item(kpis: KpiTables) -> None:
    # A category item whose date has no order item (left by a crash between writes, or by an older version) is
    # found by the reprocess of its range and removed, like any stored item the range no longer has.
    kpis.publish([order_kpi("2025-01-02")], [category_kpi("Jeans", "2025-01-03")], generation=1, computed_at="t",
                 run_id="r")  # fmt: skip
    stats = kpis.publish(
        [order_kpi("2025-01-02")], [], generation=2, computed_at="t", run_id="r", reconcile=("2025-01-01", "2025-01-31")
    )
    assert stats.removed == 1 and kpis.category(None, "2025-01-01", "2025-01-31") == []
    assert [k.order_date for k in kpis.daily("2025-01-01", "2025-01-31")] == ["2025-01-02"]


def test_duplicate_keys_in_one_publish_are_refused(kpis: KpiTables) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        kpis.publish([order_kpi("2025-03-30"), order_kpi("2025-03-30")], [], 1, "t", "r")


class Flaky:
    """A client whose first BatchGetItem returns every key unprocessed and whose first BatchWriteItem writes
    only half of the items, handing back the rest, as DynamoDB does under partial throttling."""

    def __init__(self, real: Any, always: bool = False) -> None:
        self._real = real
        self._always = always
        self._lock = threading.Lock()
        self.gets = 0
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.gets += 1
            first = self.gets == 1
        if first or self._always:
            return {"Responses": {}, "UnprocessedKeys": RequestItems}
        result: dict[str, Any] = self._real.batch_get_item(RequestItems=RequestItems)
        return result

    def batch_write_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.writes += 1
            first = self.writes == 1
        if self._always:
            return {"UnprocessedItems": RequestItems}
        if not first:
            result: dict[str, Any] = self._real.batch_write_item(RequestItems=RequestItems)
            return result
        sent = {t: r[: len(r) // 2] for t, r in RequestItems.items() if len(r) // 2}
        held = {t: r[len(r) // 2 :] for t, r in RequestItems.items()}
        if sent:
            self._real.batch_write_item(RequestItems=sent)
        return {"UnprocessedItems": held}


def test_unprocessed_keys_and_items_are_retried_until_done(ddb: Any, names: TableNames) -> None:
    flaky = Flaky(ddb)
    sleeps: list[float] = []
    tables = KpiTables(cast(Any, flaky), names.order, names.category, threads=2, sleep=sleeps.append, base_delay=0.01)
    daily, category = sample()
    stats = tables.publish(daily, category, generation=1, computed_at="t", run_id="r")
    assert stats.written == 16
    assert flaky.gets >= 2 and flaky.writes >= 2
    assert len(sleeps) >= 2 and all(0 <= s <= 0.01 * 2**8 for s in sleeps)  # backoff with jitter
    assert tables.daily() == daily
    assert tables.category() == category


def test_items_that_stay_unprocessed_raise_throttled_after_bounded_attempts(ddb: Any, names: TableNames) -> None:
    daily, _ = sample()
    flaky = Flaky(ddb, always=True)
    tables = KpiTables(cast(Any, flaky), names.order, names.category, threads=1, sleep=lambda s: None, max_attempts=3)
    with pytest.raises(Throttled) as e:
        tables.publish(daily, [], generation=1, computed_at="t", run_id="r")
    assert e.value.retryable
    assert flaky.gets == 3


def test_fence_stops_a_publish_whose_lock_was_lost(kpis: KpiTables) -> None:
    def lost() -> None:
        raise StaleWriter("lease expired")

    daily, category = sample()
    with pytest.raises(StaleWriter):
        kpis.publish(daily, category, generation=1, computed_at="t", run_id="r", fence=lost)
    assert kpis.category() == []


def test_dynamodb_throttling_is_translated(ddb: Any, names: TableNames) -> None:
    with Stubber(ddb) as stub:
        stub.add_client_error(
            "get_item", service_error_code="ProvisionedThroughputExceededException", http_status_code=400
        )
        with pytest.raises(Throttled) as e:
            KpiTables(ddb, names.order, names.category).date("2025-03-30")
    assert e.value.context["aws_code"] == "ProvisionedThroughputExceededException"
    assert e.value.context["operation"] == "dynamodb.get_item"


def test_bad_dates_are_refused_before_any_call(kpis: KpiTables) -> None:
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        kpis.daily("2025-3-1", None)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        kpis.publish([order_kpi("30/03/2025")], [], 1, "t", "r")


# --- ledger ----------------------------------------------------------------------------------------------
def outcome(file_id: str, ok: bool = True, **kw: Any) -> ValidationResult:
    return ValidationResult(
        file_id=file_id,
        source=f"s3://landing/incoming/{file_id}.csv",
        dataset="orders",
        outcome="accepted" if ok else "rejected",
        reason=None if ok else "missing_column",
        rows=100,
        valid_rows=98 if ok else 0,
        rejected_rows=2 if ok else 100,
        rejects_by_reason={"bad_type": 2} if ok else {},
        seconds=1.25,
        **kw,
    )


def test_files_are_listed_newest_first_and_filtered_by_outcome(ledger: Ledger, clock: FakeClock) -> None:
    for i, ok in enumerate([True, False, True, True, False]):
        ledger.record_file(outcome(f"f{i}", ok), execution=f"exec-{i}")
        clock.tick()

    assert [f.file_id for f in ledger.files()] == ["f4", "f3", "f2", "f1", "f0"]
    assert [f.file_id for f in ledger.files(limit=2)] == ["f4", "f3"]
    assert [f.file_id for f in ledger.files(outcome="rejected")] == ["f4", "f1"]
    assert [f.file_id for f in ledger.files(outcome="accepted", limit=1)] == ["f3"]

    latest = ledger.files(limit=1)[0]
    assert latest.outcome == "rejected" and latest.reason == "missing_column"
    accepted = ledger.get_file("f0")
    assert isinstance(accepted, FileRecord)
    assert accepted.rejects_by_reason == {"bad_type": 2}
    assert (accepted.rows, accepted.valid_rows, accepted.seconds) == (100, 98, 1.25)
    assert accepted.execution == "exec-0"
    assert accepted.error_code is None
    # As JSON: the attributes stored, without the key and index ones
    assert set(msgspec.to_builtins(accepted)) == {
        "file_id", "source", "dataset", "outcome", "rows", "valid_rows", "rejected_rows", "rejects_by_reason",
        "seconds", "execution", "updated_at",
    }  # fmt: skip


def test_a_reprocessed_file_replaces_its_outcome(ledger: Ledger, clock: FakeClock) -> None:
    ledger.record_file(outcome("f0", ok=False), execution="exec-1")
    clock.tick()
    ledger.record_file(outcome("f0", ok=True), execution="exec-2")
    assert [f.execution for f in ledger.files()] == ["exec-2"]
    assert ledger.files(outcome="rejected") == []


def test_runs_are_listed_newest_first_and_updated_in_place(ledger: Ledger, clock: FakeClock) -> None:
    ledger.record_run("exec-1", "RUNNING", "2025-04-01T00:00:00Z")
    clock.tick()
    ledger.record_run("exec-2", "RUNNING", "2025-04-01T00:00:01Z")
    clock.tick()
    ledger.record_run(
        "exec-1", "SUCCEEDED", "2025-04-01T00:00:00Z", "2025-04-01T00:01:00Z", {"files": 3, "seconds": 0.5}
    )
    runs = ledger.runs()
    assert [r.execution_id for r in runs] == ["exec-1", "exec-2"]
    assert runs[0].status == "SUCCEEDED"
    assert runs[0].summary == {"files": 3, "seconds": 0.5}
    assert runs[1].ended_at is None and "ended_at" not in msgspec.to_builtins(runs[1])
    assert ledger.runs(limit=1)[0].execution_id == "exec-1"
    assert isinstance(ledger.get_run("exec-2"), RunRecord)


def test_next_generation_counts_up_from_one(lock: MergeLock) -> None:
    # Atomicity is DynamoDB's (UpdateItem ADD); moto's in-process backend is not thread-safe, so no threads here.
    assert [lock.next_generation() for _ in range(5)] == [1, 2, 3, 4, 5]


# --- merge lock ------------------------------------------------------------------------------------------
def test_lock_is_exclusive_while_the_lease_is_live(lock: MergeLock, clock: FakeClock) -> None:
    generation = lock.acquire("exec-a", ttl_s=60)
    clock.tick(30)
    with pytest.raises(LockBusy) as e:
        lock.acquire("exec-b", ttl_s=60)
    assert e.value.retryable
    assert e.value.context["holder"] == "exec-a"
    lock.check("exec-a", generation)  # still ours


def test_an_expired_lease_is_taken_over_and_the_old_holder_becomes_stale(lock: MergeLock, clock: FakeClock) -> None:
    first = lock.acquire("exec-a", ttl_s=60)
    clock.tick(61)
    with pytest.raises(StaleWriter):
        lock.check("exec-a", first)  # expired, even before anyone else takes it
    second = lock.acquire("exec-b", ttl_s=60)
    assert second > first  # fencing: generations grow in lock order
    with pytest.raises(StaleWriter):
        lock.check("exec-a", first)
    lock.check("exec-b", second)


def test_release_is_only_by_the_holder(lock: MergeLock) -> None:
    generation = lock.acquire("exec-a", ttl_s=60)
    assert lock.release("exec-b") is False
    assert lock.release("exec-a", generation + 1) is False
    with pytest.raises(LockBusy):
        lock.acquire("exec-b", ttl_s=60)
    assert lock.release("exec-a", generation) is True
    assert lock.holder() is None
    with pytest.raises(StaleWriter):
        lock.check("exec-a")
    lock.acquire("exec-b", ttl_s=60)


def test_the_same_owner_can_retake_its_lock_and_fences_its_earlier_attempt(lock: MergeLock) -> None:
    first = lock.acquire("exec-a", ttl_s=60)
    second = lock.acquire("exec-a", ttl_s=60)  # a retried task of the same execution
    assert second > first
    with pytest.raises(StaleWriter):
        lock.check("exec-a", first)
    lock.check("exec-a", second)
    holder = lock.holder()
    assert holder is not None and holder.owner == "exec-a" and holder.generation == second


def test_lock_generations_share_the_counter(lock: MergeLock) -> None:
    assert lock.next_generation() == 1
    assert lock.acquire("exec-a", ttl_s=60) == 2
