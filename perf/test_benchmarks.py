"""pytest-benchmark regression suite: ``./dev bench`` (``pytest perf --benchmark-enable``).

Not part of the default test run. Compare runs with ``--benchmark-autosave`` and ``--benchmark-compare``; a
regression shows up as a slower median for the same generated data. No assertion here is about time.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from loadgen.generate import generate
from perf.incremental import write_delivery
from processor.ingest import ingest, open_local
from processor.merge import merge
from processor.pipeline import process_local, stage_local
from processor.schema import ORDER_ITEMS
from processor.settings import Settings
from processor.store import LocalStore

ORDERS = 150_000


@pytest.fixture(scope="session")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shop")
    generate(folder, orders=ORDERS, days=30, parts=1, seed=3)
    return folder


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.load(env={}, work_dir=tmp_path / "work")


def test_validate_items_file(benchmark, shop: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = next(shop.glob("order_items_*.csv"))

    def run() -> int:
        with open_local(path) as stream:
            out = ingest(stream, ORDER_ITEMS, tmp_path / "w", buckets=32, chunk_bytes=16 << 20, max_invalid_share=0.05)
        return out.valid_rows

    assert benchmark(run) > ORDERS


def test_full_merge(benchmark, shop: Path, tmp_path: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """The first load's merge alone: the shop staged, then merged into empty state (every round stages anew, since a
    merge consumes the segments it applies)."""
    staging = tmp_path / "staging"

    def setup() -> tuple[tuple[()], dict[str, object]]:
        shutil.rmtree(staging, ignore_errors=True)
        stage_local(sorted(shop.glob("*.csv")), LocalStore(staging), settings, tmp_path / "w")
        return (), {}

    def run() -> int:
        _, daily, _ = merge(LocalStore(staging), generation=0, scratch=tmp_path / "m")
        return len(daily)

    assert benchmark.pedantic(run, setup=setup, rounds=3) == 30


def test_process_end_to_end(benchmark, shop: Path, tmp_path: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    staging = tmp_path / "staging"

    def setup() -> tuple[tuple[()], dict[str, object]]:
        shutil.rmtree(staging, ignore_errors=True)
        return (), {}

    def run() -> int:
        return len(process_local(sorted(shop.glob("*.csv")), staging, settings).daily)

    assert benchmark.pedantic(run, setup=setup, rounds=3) == 30


@pytest.fixture(scope="session")
def history(shop: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shop staged and merged once: the history a late delivery lands on."""
    staging = tmp_path_factory.mktemp("history") / "staging"
    process_local(sorted(shop.glob("*.csv")), staging, Settings.load(env={}, work_dir=staging.parent / "work"))
    return staging


def test_late_delivery_merge(benchmark, history: Path, tmp_path: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """2,000 late orders (about 4,000 items over all 30 days) staged and merged onto the history: the cost of a
    steady delivery. ``./dev bench-incremental`` measures the same against 0.5 and 2 GB histories."""
    files = write_delivery(tmp_path / "late")
    staging = tmp_path / "staging"

    def setup() -> tuple[tuple[()], dict[str, object]]:
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run(["cp", "-al", str(history), str(staging)], check=True)  # state files are immutable
        return (), {}

    def run() -> int:
        return process_local(files, staging, settings).merge.groups_recomputed

    assert benchmark.pedantic(run, setup=setup, rounds=5) == 2000
