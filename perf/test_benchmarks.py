"""pytest-benchmark regression suite: ``./dev bench`` (``pytest perf --benchmark-enable``).

Not part of the default test run. Compare runs with ``--benchmark-autosave`` and ``--benchmark-compare``; a
regression shows up as a slower median for the same generated data. No assertion here is about time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loadgen.generate import generate
from processor.ingest import ingest, open_local
from processor.merge import HEAD_KEY, merge
from processor.pipeline import process_local
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
    staging = tmp_path / "staging"
    process_local(sorted(shop.glob("*.csv")), staging, settings)
    store = LocalStore(staging)

    def run() -> int:
        store.delete(HEAD_KEY)  # every round recomputes every bucket
        _, daily, _ = merge(store, generation=0, scratch=tmp_path / "m")
        return len(daily)

    assert benchmark(run) == 30


def test_process_end_to_end(benchmark, shop: Path, tmp_path: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    staging = tmp_path / "staging"

    def setup() -> tuple[tuple[()], dict[str, object]]:
        shutil.rmtree(staging, ignore_errors=True)
        return (), {}

    def run() -> int:
        return len(process_local(sorted(shop.glob("*.csv")), staging, settings).daily)

    assert benchmark.pedantic(run, setup=setup, rounds=3) == 30
