"""The load test's engine without a stack: the landing schedule, the data cache, reading execution histories, the
latency rule, percentiles, and the independent DuckDB check (held to the one-process pipeline)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loadgen import loadtest as engine
from loadgen.generate import generate
from orchestration import operations
from processor.aws.dynamo import FileRecord, RunRecord
from processor.model import CategoryKpi, OrderKpi
from processor.pipeline import process_local
from processor.settings import Settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_schedule_is_seeded_and_spreads_files_over_the_window(tmp_path: Path) -> None:
    files = [tmp_path / f"f{i}.csv" for i in range(20)]
    first = engine.schedule(files, 30.0, seed=5)
    assert first == engine.schedule(files, 30.0, seed=5)
    assert first != engine.schedule(files, 30.0, seed=6)
    assert sorted(a.path for a in first) == sorted(files)
    assert all(0.0 <= a.at_s < 30.0 for a in first)
    assert [a.at_s for a in first] == sorted(a.at_s for a in first)


def test_percentile_is_a_measured_value_by_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert engine.percentile(values, 50) == 3.0
    assert engine.percentile(values, 95) == 5.0
    assert engine.percentile(values, 0) == 1.0
    assert engine.percentile([], 50) is None


def test_a_data_set_is_generated_once_then_reused_from_the_cache(tmp_path: Path) -> None:
    first = engine.dataset(tmp_path, size_gb=None, orders=300, seed=2, parts=2, days=2)
    again = engine.dataset(tmp_path, size_gb=None, orders=300, seed=2, parts=2, days=2)
    assert first.generated and not again.generated
    assert first.folder == again.folder == tmp_path / "300orders-seed2-parts2-days2"
    assert [f.name for f in again.files] == [
        "order_items_part1.csv", "order_items_part2.csv", "orders_part1.csv", "orders_part2.csv", "products.csv"
    ]  # fmt: skip
    assert not list(tmp_path.glob("*.partial"))


def _task(ev_id: int, prev: int, kind: str, seconds: float, **details: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"id": ev_id, "previousEventId": prev, "type": kind, "timestamp": at(seconds)}
    if details:
        event["stateEnteredEventDetails"] = details
    return event


def test_history_pairs_each_task_entry_with_its_exit_and_counts_retries() -> None:
    # Two files in a Map, interleaved; the first one's task times out once and is retried; then the merge.
    events = [
        _task(1, 0, "MapIterationStarted", 0),
        _task(2, 1, "TaskStateEntered", 0, name="Validate", input='{"key": "incoming/orders/a.csv"}'),
        _task(3, 0, "MapIterationStarted", 0),
        _task(4, 3, "TaskStateEntered", 1, name="Validate", input='{"key": "incoming/orders/b.csv"}'),
        _task(5, 2, "TaskScheduled", 1),
        _task(6, 4, "TaskScheduled", 1),
        _task(7, 5, "TaskTimedOut", 31),
        _task(8, 6, "TaskSucceeded", 5),
        _task(9, 8, "TaskStateExited", 5, name="Validate"),
        _task(10, 9, "ChoiceStateEntered", 5, name="Outcome"),
        _task(11, 7, "TaskScheduled", 32),
        _task(12, 11, "TaskSucceeded", 40),
        _task(13, 12, "TaskStateExited", 40, name="Validate"),
        _task(14, 13, "TaskStateEntered", 41, name="Merge", input="{}"),
        _task(15, 14, "TaskScheduled", 41),
        _task(16, 15, "TaskSucceeded", 45),
        _task(17, 16, "TaskStateExited", 45, name="Merge"),
    ]
    trace = engine.Trace()
    engine._read_history(events, "batch-1", {"incoming/orders/a.csv": 100, "incoming/orders/b.csv": 7}, trace)
    validate, merge = trace.stages["Validate"], trace.stages["Merge"]
    assert (validate.entries, validate.attempts, validate.retries, validate.failed_attempts) == (2, 3, 1, 1)
    assert validate.task_seconds == 40 + 4  # a.csv from 0 to 40, b.csv from 1 to 5
    assert validate.bytes == 107
    assert sorted(validate.done) == [(at(5).timestamp(), 7), (at(40).timestamp(), 100)]
    assert (merge.entries, merge.retries, merge.task_seconds) == (1, 0, 4)
    assert trace.merge_entered == {"batch-1": at(41).timestamp()}


def _landed(name: str, landed_s: float) -> engine.LandedFile:
    item = operations.Landed(Path(name), f"incoming/orders/{name}", name)
    return engine.LandedFile(item, 10, 0.0, landed_s, landed_s, at(landed_s).timestamp())


def test_latency_ends_when_the_merge_that_took_the_files_over_ends() -> None:
    # "a" merged in its own execution's merge (run 10..20); "b"'s execution entered Merge at 15 while that run held
    # the lock and handed its files over: b's KPIs are visible when that run ended (20), not when b's execution did.
    landed = [_landed("a", 2.0), _landed("b", 12.0), _landed("c", 13.0)]
    records = {
        "a": FileRecord(file_id="a", outcome="accepted", execution="ex-a"),
        "b": FileRecord(file_id="b", outcome="accepted", execution="ex-b"),
        "c": FileRecord(file_id="c", outcome="rejected", execution="ex-b"),
    }
    trace = engine.Trace(merge_entered={"ex-a": at(9).timestamp(), "ex-b": at(15).timestamp()})
    runs = [RunRecord(execution_id="ex-a", status="merged", started_at=at(10).isoformat(), ended_at=at(20).isoformat())]
    assert engine.latencies(landed, records, trace, runs) == {"a": 18.0, "b": 8.0}


def test_compare_names_missing_extra_and_differing_items() -> None:
    day = OrderKpi(order_date="2025-03-01", total_orders=2, returned_orders=1, total_items_sold=3, revenue_cents=500,
                   unique_customers=2)  # fmt: skip
    cat = CategoryKpi(category="Books", order_date="2025-03-01", orders=1, returned_orders=0, items=1, revenue_cents=99)
    expected = engine.Expected(
        daily={
            "2025-03-01": {**engine._components(day), "revenue_cents": 501},
            "2025-03-02": engine._components(day),
        },
        category={},
        seconds=0.0,
    )
    check = engine.compare([day], [cat], expected)
    assert not check.agrees
    assert check.differences == [
        {"table": "daily", "key": "2025-03-01", "field": "revenue_cents", "stored": 500, "duckdb": 501},
        {"table": "daily", "key": "2025-03-02", "field": "missing"},
        {"table": "category", "key": ("Books", "2025-03-01"), "field": "extra"},
    ]


def test_duckdb_computes_the_same_kpis_as_the_one_process_pipeline(tmp_path: Path) -> None:
    gen = generate(tmp_path / "shop", orders=3000, days=4, parts=2, seed=9)
    local = process_local(list(gen.paths), tmp_path / "staging", Settings.load(env={}, work_dir=tmp_path / "work"))
    check = engine.compare(local.daily, local.category, engine.duckdb_kpis(gen.paths))
    assert check.differences == []
    assert (check.daily_items, check.category_items) == (4, len(local.category))
    assert check.category_items > 50
