"""The one-process comparison (perf/compare.py) on a tiny generated set: what it reports, not how fast anything is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perf import compare
from perf.compare import fastest


def test_a_programs_fastest_round_counts_and_every_round_is_kept() -> None:
    rounds = [
        {"seconds": 7.0, "cpu_seconds": 12.1, "peak_rss_mib": 2900},
        {"seconds": 3.4, "cpu_seconds": 6.3, "peak_rss_mib": 2950},
        {"seconds": 3.6, "cpu_seconds": 6.4, "peak_rss_mib": 2940},
    ]
    assert fastest(rounds) == {"seconds": 3.4, "cpu_seconds": 6.3, "peak_rss_mib": 2950, "rounds": [7.0, 3.4, 3.6]}


def test_comparison_runs_each_program_every_round_and_checks_duckdb_agrees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "compare.json"
    assert compare.main(["--size-gb", "0.002", "--data-root", str(tmp_path), "--rounds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("bare", "shopkpi", "duckdb"):
        assert len(report[name]["rounds"]) == 2
        assert report[name]["seconds"] == min(report[name]["rounds"])
        assert report[name]["cpu_seconds"] > 0
        assert report[name]["peak_rss_mib"] > 0
    assert report["duckdb_agrees"] is True
    printed = capsys.readouterr().out
    assert "2 round(s)" in printed and "CPU s" in printed and "x DuckDB" in printed
    assert "DuckDB's KPIs equal shopkpi's: True" in printed


def test_rounds_below_one_are_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stop:
        compare.main(["--data-root", str(tmp_path), "--rounds", "0"])
    assert stop.value.code == 2
    assert not any(tmp_path.iterdir())
