"""The benchmark gate's suite: ``./dev bench`` (``python -m perf.gate``, which runs this file under pytest-benchmark).

Not part of the default test run (pytest's testpaths is ``tests/``). Every benchmark works on one generated shop
(:data:`ORDERS` orders over 30 days, seed :data:`SEED`, cached under ``data/bench/``) and runs a fixed number of
rounds, so that two runs measure the same work the same number of times. The calibration, a bare polars parse of
the same files, is a benchmark of its own and also runs (untimed) right before every round of the others:
:mod:`perf.gate` divides each round by the calibration beside it, which keeps the figures comparable across
machines and across the load of a shared one. The gate runs it on CPU time with one polars thread (see
:mod:`perf.gate`). No assertion here is about time: the assertions check that each round did the work it claims to
measure."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import duckdb
import polars as pl
import pytest

from loadgen.generate import generate
from perf.compare import KPI_QUERY
from perf.incremental import write_delivery
from processor.pipeline import merge_local, process_local, stage_local
from processor.settings import Settings
from processor.store import LocalStore

ORDERS = 300_000
SEED = 3
DAYS = 30
DATA = Path(__file__).resolve().parents[1] / "data" / "bench" / f"gate-{ORDERS}-seed{SEED}"

# The DuckDB one-shot query of the load tests: a reference the first load is compared to, not a gated figure.
DUCKDB_KPIS = KPI_QUERY


T = TypeVar("T")


Setup = Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]


class BenchmarkFixture(Protocol):
    """What these benchmarks use of pytest-benchmark's fixture (its own is untyped)."""

    extra_info: dict[str, Any]

    def pedantic(
        self, target: Callable[..., T], *, setup: Setup | None = None, rounds: int, warmup_rounds: int = 0
    ) -> T: ...


@pytest.fixture(scope="session")
def shop() -> Path:
    """The generated shop, made once and reused by later runs (written aside, then renamed: never half made)."""
    if not (DATA / "products.csv").exists():
        partial = DATA.with_name(DATA.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        generate(partial, orders=ORDERS, days=DAYS, parts=1, seed=SEED)
        partial.rename(DATA)
    return DATA


@pytest.fixture(scope="session")
def csv_files(shop: Path) -> list[Path]:
    return sorted(shop.glob("*.csv"))


@pytest.fixture(scope="session")
def parse(csv_files: list[Path]) -> Callable[[], int]:
    """The calibration's work: a bare polars parse of every file, nothing checked or kept; the rows parsed."""

    def run() -> int:
        return sum(pl.scan_csv(f).collect().height for f in csv_files)

    return run


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.load(env={}, work_dir=tmp_path / "work")


@pytest.fixture(scope="session")
def clock(request: pytest.FixtureRequest) -> Callable[[], float]:
    """pytest-benchmark's own timer (``--benchmark-timer``): the calibration is read on the same clock."""
    module, _, name = str(request.config.getoption("benchmark_timer")).rpartition(".")
    timer: Callable[[], float] = getattr(importlib.import_module(module), name)
    return timer


class Paired:
    """``benchmark.pedantic``, with the calibration run (untimed by pytest-benchmark) right before each round.

    On a shared machine the load changes within a run: a calibration measured once, minutes away, would not see
    the load a benchmark ran under. Each round's calibration seconds go to ``extra_info["calibration_s"]``, aligned
    with pytest-benchmark's round times, and :mod:`perf.gate` divides each round by its own calibration.
    """

    def __init__(self, benchmark: BenchmarkFixture, calibrate: Callable[[], object], clock: Callable[[], float]):
        self.benchmark, self.calibrate, self.clock = benchmark, calibrate, clock

    def __call__(
        self, target: Callable[..., T], *, rounds: int, setup: Setup | None = None, warmup_rounds: int = 0
    ) -> T:
        seconds: list[float] = []

        def before() -> tuple[tuple[Any, ...], dict[str, Any]]:
            args = setup() if setup else ((), {})
            started = self.clock()
            self.calibrate()
            seconds.append(self.clock() - started)
            return args

        result = self.benchmark.pedantic(target, setup=before, rounds=rounds, warmup_rounds=warmup_rounds)
        self.benchmark.extra_info["calibration_s"] = seconds[warmup_rounds:]
        return result


@pytest.fixture
def paired(benchmark: BenchmarkFixture, parse: Callable[[], int], clock: Callable[[], float]) -> Paired:
    return Paired(benchmark, parse, clock)


def _empty(folder: Path) -> Setup:
    def setup() -> tuple[tuple[()], dict[str, Any]]:
        shutil.rmtree(folder, ignore_errors=True)
        return (), {}

    return setup


def test_calibration_polars_parse(benchmark: BenchmarkFixture, csv_files: list[Path], parse: Callable[[], int]) -> None:
    """The calibration on its own (the others also run it before each of their rounds)."""
    benchmark.extra_info["data_bytes"] = sum(f.stat().st_size for f in csv_files)
    benchmark.extra_info["data"] = f"loadgen orders={ORDERS} days={DAYS} seed={SEED}"
    assert benchmark.pedantic(parse, rounds=21, warmup_rounds=2) > 2 * ORDERS


def _bench_stage(paired: Paired, path: Path, tmp_path: Path, settings: Settings, rounds: int) -> int:
    """Validate one file and commit its staged segment to an empty staging area; the valid rows it staged."""
    staging = tmp_path / "staging"

    def run() -> int:
        return stage_local([path], LocalStore(staging), settings, tmp_path / "w")[0].valid_rows

    return paired(run, setup=_empty(staging), rounds=rounds)


def test_validate_stage_orders(paired: Paired, shop: Path, tmp_path: Path, settings: Settings) -> None:
    # The shorter of the two (about 0.35 s of CPU a round), and the noisier: more rounds for a stable median.
    assert _bench_stage(paired, shop / "orders_part1.csv", tmp_path, settings, rounds=21) == ORDERS


def test_validate_stage_items(paired: Paired, shop: Path, tmp_path: Path, settings: Settings) -> None:
    assert _bench_stage(paired, shop / "order_items_part1.csv", tmp_path, settings, rounds=11) > ORDERS


def test_first_load(paired: Paired, csv_files: list[Path], tmp_path: Path, settings: Settings) -> None:
    """What ``shopkpi process DIR --staging EMPTY`` does, in process: validate, stage and merge every file."""
    staging = tmp_path / "staging"

    def run() -> int:
        return len(process_local(csv_files, staging, settings).daily)

    assert paired(run, setup=_empty(staging), rounds=7) == DAYS


def test_duckdb_kpi_query(paired: Paired, shop: Path) -> None:
    """The reference: DuckDB computing the same KPIs in one query over the raw files, on as many threads as polars."""

    def run() -> int:
        con = duckdb.connect()
        try:
            con.execute(f"SET threads TO {pl.thread_pool_size()}")
            con.execute("SET enable_progress_bar = false")
            return len(con.execute(DUCKDB_KPIS.format(d=shop)).fetchall())
        finally:
            con.close()

    assert paired(run, rounds=9, warmup_rounds=1) > DAYS


@pytest.fixture(scope="session")
def history(csv_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shop staged and merged once: the history a late delivery lands on."""
    staging = tmp_path_factory.mktemp("history") / "staging"
    process_local(csv_files, staging, Settings.load(env={}, work_dir=staging.parent / "work"))
    return staging


def test_late_delivery_merge(paired: Paired, history: Path, tmp_path: Path, settings: Settings) -> None:
    """The incremental merge alone: 2,000 late orders (about 4,000 items over all 30 days), already staged, merged
    onto the history. ``./dev bench-incremental`` measures the same against 0.5 and 2 GB histories."""
    files = write_delivery(tmp_path / "late")
    staging = tmp_path / "staging"

    def setup() -> tuple[tuple[LocalStore], dict[str, Any]]:
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run(["cp", "-al", str(history), str(staging)], check=True)  # state files are never rewritten
        store = LocalStore(staging)
        stage_local(files, store, settings, tmp_path / "w")
        return (store,), {}

    def run(store: LocalStore) -> int:
        return merge_local(store, settings, tmp_path / "m").groups_recomputed

    # About 70 ms of CPU a round, the shortest and noisiest benchmark: 31 rounds keep its median within a few %.
    assert paired(run, setup=setup, rounds=31) == 2000
