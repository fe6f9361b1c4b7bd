"""The benchmark gate's judgement (perf/gate.py) on synthetic pytest-benchmark result files: nothing is timed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from perf import gate
from perf.gate import CALIBRATION, DUCKDB, FIRST_LOAD, judge, load_run, main, read_baseline

MERGE = "test_late_delivery_merge"
#: Round seconds of the gated and reference benchmarks on the baseline's machine, calibration 0.5 s.
BASE = {FIRST_LOAD: 4.0, MERGE: 0.05, DUCKDB: 1.5}
THRESHOLD = gate.THRESHOLD_PCT / 100
PACKAGES = {"polars": "2.1.0", "duckdb": "2.0.1"}


def result(
    path: Path,
    seconds: dict[str, float],
    *,
    calibration: float = 0.5,
    paired: dict[str, float] | None = None,
    rounds: int = 5,
    timer: str = "time.process_time",
) -> Path:
    """A pytest-benchmark JSON file: ``rounds`` equal rounds of each benchmark, each paired with a calibration of
    ``paired[name]`` seconds (default ``calibration``), plus the standalone calibration of ``calibration`` s."""
    paired = paired or {}
    benchmarks = [_bench(CALIBRATION, [calibration] * rounds, None)] if calibration else []
    for name, s in seconds.items():
        benchmarks.append(_bench(name, [s] * rounds, [paired.get(name, calibration)] * rounds))
    doc = {
        "machine_info": {"python_version": "3.11.2", "packages": PACKAGES, "timer": timer, "threads": 1},
        "datetime": "2026-12-02T06:00:00+00:00",
        "benchmarks": benchmarks,
    }
    path.write_text(json.dumps(doc))
    return path


def _bench(name: str, data: list[float], calibrations: list[float] | None) -> dict[str, object]:
    extra = {"calibration_s": calibrations} if calibrations else {"data_bytes": 123}
    stats = {"median": sorted(data)[len(data) // 2], "iqr": 0.0, "rounds": len(data), "data": data}
    return {"name": name, "stats": stats, "extra_info": extra}


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    """A baseline written by ``--update-baseline`` from a run at :data:`BASE`."""
    path = tmp_path / "baseline.json"
    assert (
        main(["--update-baseline", "--results", str(result(tmp_path / "base.json", BASE)), "--baseline", str(path)])
        == 0
    )
    return path


def check(
    tmp_path: Path,
    baseline: Path,
    seconds: dict[str, float],
    *extra: str,
    calibration: float = 0.5,
    paired: dict[str, float] | None = None,
) -> int:
    """``./dev bench --check`` of a run at ``seconds`` against ``baseline``; its exit status."""
    now = result(tmp_path / "now.json", seconds, calibration=calibration, paired=paired)
    return main(["--check", "--results", str(now), "--baseline", str(baseline), *extra])


def test_regression_beyond_the_threshold_fails(
    tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grown = THRESHOLD + 0.05
    assert check(tmp_path, baseline, {**BASE, MERGE: 0.05 * (1 + grown)}) == 1
    out = capsys.readouterr().out
    assert "FAIL late_delivery_merge: regressed" in out
    assert f"{grown:+.1%}" in out


def test_change_within_the_threshold_passes(tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path, baseline, {**BASE, FIRST_LOAD: 4.0 * (1 + THRESHOLD - 0.05), MERGE: 0.05 * 0.9}) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_threshold_is_an_option_in_percent(tmp_path: Path, baseline: Path) -> None:
    slower = {**BASE, FIRST_LOAD: 4.0 * 1.3}
    assert check(tmp_path, baseline, slower, "--threshold", "25") == 1
    assert check(tmp_path, baseline, slower, "--threshold", "35") == 0
    assert check(tmp_path, baseline, {**BASE, FIRST_LOAD: 4.0 * 1.1}, "--threshold", "5") == 1


def test_uniformly_slower_machine_passes(tmp_path: Path, baseline: Path) -> None:
    """Everything twice as slow, the calibration too: the ratios do not move."""
    assert check(tmp_path, baseline, {name: 2 * s for name, s in BASE.items()}, calibration=1.0) == 0


def test_load_rising_within_a_run_is_divided_out_by_the_paired_calibration(tmp_path: Path, baseline: Path) -> None:
    """The standalone calibration ran on a quiet machine, the first load three times slower under load, and the
    calibrations run beside its rounds saw that load: not a regression."""
    assert check(tmp_path, baseline, {**BASE, FIRST_LOAD: 12.0}, paired={FIRST_LOAD: 1.5}) == 0


def test_benchmark_slower_than_its_paired_calibration_regresses(tmp_path: Path, baseline: Path) -> None:
    """The reverse: the standalone calibration ran under load, the first load's own calibrations did not."""
    assert check(tmp_path, baseline, {**BASE, FIRST_LOAD: 6.0}, calibration=1.0, paired={FIRST_LOAD: 0.5}) == 1


def test_each_round_is_divided_by_its_own_calibration(tmp_path: Path) -> None:
    """A load spike hits rounds 2 and 3 and their calibrations alike: every round is 8 calibrations."""
    doc = {"benchmarks": [_bench(FIRST_LOAD, [4.0, 12.0, 16.0, 4.0, 4.0], [0.5, 1.5, 2.0, 0.5, 0.5])]}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert load_run(tmp_path / "r.json").ratios() == {FIRST_LOAD: 8.0}


def test_benchmark_missing_from_the_baseline_is_reported_and_passes(
    tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check(tmp_path, baseline, {**BASE, "test_validate_stage_items": 1.6}) == 0
    out = capsys.readouterr().out
    assert "validate_stage_items" in out
    assert "new benchmarks are not gated until ./dev bench --update-baseline" in out


def test_baseline_benchmark_that_did_not_run_fails(
    tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check(tmp_path, baseline, {FIRST_LOAD: 4.0, DUCKDB: 1.5}) == 1
    assert "FAIL late_delivery_merge: not run" in capsys.readouterr().out


def test_references_are_reported_not_gated() -> None:
    verdicts = {
        v.name: v.verdict for v in judge({DUCKDB: 3.0, CALIBRATION: 1.0}, {DUCKDB: 9.0, CALIBRATION: 1.0}, 0.25)
    }
    assert verdicts == {DUCKDB: "reference", CALIBRATION: "reference"}


def test_much_faster_passes_and_says_so() -> None:
    (verdict,) = judge({FIRST_LOAD: 8.0}, {FIRST_LOAD: 4.0}, 0.25)
    assert (verdict.verdict, verdict.fails, verdict.change) == ("faster", False, -0.5)


def test_run_without_any_calibration_cannot_be_judged(
    tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": [_bench(FIRST_LOAD, [4.0], None)]}))
    assert main(["--check", "--results", str(path), "--baseline", str(baseline)]) == 2
    assert "has no calibration" in capsys.readouterr().out


def test_missing_baseline_says_how_to_make_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path, tmp_path / "nowhere.json", BASE) == 2
    assert "./dev bench --update-baseline" in capsys.readouterr().out


def test_run_on_another_clock_than_the_baseline_cannot_be_judged(
    tmp_path: Path, baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = result(tmp_path / "now.json", BASE, timer="time.perf_counter")
    assert main(["--check", "--results", str(now), "--baseline", str(baseline)]) == 2
    assert "the run's timer is time.perf_counter, the baseline's time.process_time" in capsys.readouterr().out


def test_update_baseline_records_ratios_versions_and_date(baseline: Path) -> None:
    doc = read_baseline(baseline)
    assert doc["ratios"] == {CALIBRATION: 1.0, FIRST_LOAD: 8.0, MERGE: 0.1, DUCKDB: 3.0}
    assert doc["versions"] == {"python": "3.11.2", "polars": "2.1.0", "duckdb": "2.0.1"}
    assert (doc["date"], doc["timer"], doc["threads"]) == ("2026-12-02T06:00:00+00:00", "time.process_time", 1)


def test_first_load_ratios_to_the_parse_and_to_duckdb_are_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--results", str(result(tmp_path / "r.json", BASE))]) == 0
    assert "first load: 8.00x the bare polars parse, 2.67x the DuckDB one-shot query" in capsys.readouterr().out


def test_committed_baseline_covers_every_benchmark_of_the_suite() -> None:
    suite = ast.parse(gate.SUITE.read_text())
    names = {f.name for f in suite.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}
    assert set(read_baseline(gate.BASELINE)["ratios"]) == names
