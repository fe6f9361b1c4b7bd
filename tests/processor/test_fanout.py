"""A first load's merge fanned out over parts (processor.fanout) holds what the single-task merge holds."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor import fanout
from processor.errors import StalePlan
from processor.merge import Publication, merge
from processor.model import MergeResult
from processor.pipeline import process_local, stage_local
from processor.settings import Settings
from processor.state import current_kpis, load_head
from processor.store import LocalStore
from tests.builders import WriteCsv, item, order, product
from tests.processor.test_invariant import KpiTable, Plan, _delivered, plans
from tests.reference import reference_kpis

# What a fan-out writes beside the state (the parts' keyed files are adopted by the committed state as they are).
PART_FILE = re.compile(
    r"plan(\.json|-products\.parquet|-duplicates\.parquet)$|result\.json$|/p\d+/(daily|category|pending|rejects|users)"
)
PART_DIR = re.compile(r"/p(\d+)/")
COMPARED = ("files_merged", "groups_recomputed", "dates", "pending", "late_rejects", "conflicts", "state_rows")


def fanned_out(store: LocalStore, scratch: Path, parts: int, publish: Any = None) -> MergeResult | None:
    """Plan, every part (last first: their order must not matter), then the final step, as the workflow runs them."""
    plan = fanout.plan(
        store, generation=0, scratch=scratch / "plan", buckets=3, parts=parts, min_rows=1, rows_per_pass=7
    )
    if plan is None:
        return None
    for i in reversed(range(len(plan.parts))):
        fanout.run_part(store, plan, i, scratch / f"p{i}")
    return fanout.finish(store, plan, scratch / "finish", publish=publish)[0]


def merge_rejects(store: LocalStore) -> list[str]:
    return sorted(line for key in load_head(store).rejects for line in store.local_path(key).read_text().splitlines())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
@given(plans(), st.integers(2, 4))
def test_fanned_out_first_load_then_incremental_merges_equal_one_task_merges(plan: Plan, parts: int) -> None:
    """Two staging areas get the same batches; the first merge of one is fanned out. After every batch both KPI
    tables, the summaries and the merge-time rejects are equal, and equal the brute-force reference."""
    with _delivered(plan) as (root, files, config):
        one, fan = LocalStore(root / "one"), LocalStore(root / "fan")
        one_table, fan_table = KpiTable(), KpiTable()
        done = 0
        for n, size in enumerate(plan.batches):
            batch = files[done : done + size]
            done += size
            stage_local(batch, one, config, root / "work")
            stage_local(batch, fan, config, root / "work")
            expected, _, _ = merge(one, generation=0, scratch=root / "m1", publish=one_table.publish, rows_per_pass=7)
            got = fanned_out(fan, root / f"f{n}", parts, fan_table.publish) if n == 0 else None
            if got is None:  # a later batch, or a first one too small to split: the single-task merge
                got, _, _ = merge(fan, generation=0, scratch=root / "m2", publish=fan_table.publish, rows_per_pass=7)
            assert {k: getattr(got, k) for k in COMPARED} == {k: getattr(expected, k) for k in COMPARED}
            assert fan_table.kpis() == one_table.kpis() == reference_kpis(files[:done])
            assert merge_rejects(fan) == merge_rejects(one)
        assert current_kpis(fan) == current_kpis(one)
        assert not [k for k in fan.list_keys("state/") if PART_FILE.search(k)]


def shop(write_csv: WriteCsv) -> list[Path]:
    """Twelve orders over two days and their items, two items files that both hold item 1 (the later wins)."""
    orders = [order(o, 100 + o % 5, f"2025-03-0{1 + o % 2}T08:00:00") for o in range(1, 13)]
    items = [item(o, o, 100 + o % 5, 1 + o % 2, "4.00") for o in range(1, 13)]
    return [
        write_csv("products.csv", [product(1, "Books"), product(2, "Toys")]),
        write_csv("orders.csv", orders),
        write_csv("order_items.csv", items),
        write_csv("order_items_fix.csv", [item(1, 2, 102, 2, "9.00")], folder="later"),
    ]


def staged_shop(write_csv: WriteCsv, tmp_path: Path, settings: Settings) -> tuple[list[Path], LocalStore]:
    """The shop's files, validated and staged (not merged) under ``tmp_path/staging``."""
    files = shop(write_csv)
    store = LocalStore(tmp_path / "staging")
    stage_local(files, store, settings, tmp_path / "work")
    return files, store


@pytest.fixture
def three_buckets(settings: Settings, tmp_path: Path) -> Settings:
    return Settings.load(env={}, buckets=3, work_dir=tmp_path / "work", merge_rows=5)


def test_shopkpi_process_fans_out_a_big_first_load_with_the_same_kpis(
    write_csv: WriteCsv, tmp_path: Path, three_buckets: Settings
) -> None:
    files = shop(write_csv)
    one = process_local(files, tmp_path / "one", three_buckets)
    fan_settings = dataclasses.replace(three_buckets, merge_parts=3, fanout_rows=1, merge_threads=2)
    fan = process_local(files, tmp_path / "fan", fan_settings)
    assert fan.merge.groups_recomputed == one.merge.groups_recomputed == 12
    assert not any(PART_DIR.search(k) for k in LocalStore(tmp_path / "one").list_keys("state/"))
    parts = {m.group(1) for k in LocalStore(tmp_path / "fan").list_keys("state/") if (m := PART_DIR.search(k))}
    assert parts == {"0", "1", "2"}  # the keyed files each part wrote, adopted by the committed state
    assert (fan.daily, fan.category) == (one.daily, one.category)
    assert fan.merge.state_rows == one.merge.state_rows and fan.merge.conflicts == one.merge.conflicts
    assert [k.public() for k in fan.daily] == reference_kpis(files)["daily"]
    # Not a first load any more: the next delivery is merged by one task, onto the fanned-out state.
    more = [write_csv("orders_more.csv", [order(1, 101, "2025-03-03T08:00:00")], folder="more")]
    assert (
        process_local(more, tmp_path / "fan", fan_settings).daily
        == process_local(more, tmp_path / "one", three_buckets).daily
    )


def test_no_plan_for_one_part_a_small_load_or_a_state_that_is_not_empty(
    write_csv: WriteCsv, tmp_path: Path, three_buckets: Settings
) -> None:
    _, store = staged_shop(write_csv, tmp_path, three_buckets)
    kw: dict[str, Any] = {"generation": 0, "scratch": tmp_path / "s", "buckets": 3, "rows_per_pass": 5}
    assert fanout.plan(store, parts=1, min_rows=1, **kw) is None
    assert fanout.plan(store, parts=3, min_rows=10_000, **kw) is None
    merge(store, generation=0, scratch=tmp_path / "m")
    stage_local([write_csv("orders2.csv", [order(99, 1, "2025-03-01T08:00:00")] * 1)], store, three_buckets, tmp_path)
    assert fanout.plan(store, parts=3, min_rows=1, **kw) is None


def test_a_retried_part_answers_its_result_and_a_missing_part_stops_the_final_step(
    write_csv: WriteCsv, tmp_path: Path, three_buckets: Settings
) -> None:
    _, store = staged_shop(write_csv, tmp_path, three_buckets)
    plan = fanout.plan(store, generation=0, scratch=tmp_path / "s", buckets=3, parts=3, min_rows=1, rows_per_pass=5)
    assert plan is not None and len(plan.parts) >= 2
    first = fanout.run_part(store, plan, 0, tmp_path / "p0")
    assert fanout.run_part(store, plan, 0, tmp_path / "again") == first
    with pytest.raises(StalePlan, match=r"part 1 .* did not finish"):
        fanout.finish(store, plan, tmp_path / "f")
    assert load_head(store).generation == 0  # nothing committed


def test_an_abandoned_fan_out_is_swept_and_merged_by_the_next_merge(
    write_csv: WriteCsv, tmp_path: Path, three_buckets: Settings
) -> None:
    files, store = staged_shop(write_csv, tmp_path, three_buckets)
    plan = fanout.plan(store, generation=0, scratch=tmp_path / "s", buckets=3, parts=3, min_rows=1, rows_per_pass=5)
    assert plan is not None
    fanout.run_part(store, plan, 0, tmp_path / "p0")  # then the task dies, the lease runs out
    merge(store, generation=0, scratch=tmp_path / "m")
    assert [k.public() for k in current_kpis(store)[0]] == reference_kpis(files)["daily"]
    assert not [k for k in store.list_keys("state/") if PART_FILE.search(k)]
    with pytest.raises(StalePlan, match="made from generation 0"):
        fanout.run_part(store, plan, 1, tmp_path / "p1")  # a late part of the abandoned plan changes nothing


def test_a_publication_of_a_fanned_out_merge_holds_every_kpi(
    write_csv: WriteCsv, tmp_path: Path, three_buckets: Settings
) -> None:
    files, store = staged_shop(write_csv, tmp_path, three_buckets)
    published: list[Publication] = []

    def publish(pub: Publication, generation: int) -> int:
        published.append(pub)
        return 0

    result = fanned_out(store, tmp_path, 3, publish)
    assert result is not None and result.dates == ["2025-03-01", "2025-03-02"]
    [pub] = published
    expected = reference_kpis(files)
    assert [k.public() for k in pub.daily] == expected["daily"]
    assert [c.public() for c in pub.category] == expected["category"]
