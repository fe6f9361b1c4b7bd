"""The benchmark gate: run the suite, save the results, compare them with the committed baseline.

    python -m perf.gate                       (./dev bench)                  run, save, print medians and ratios
    python -m perf.gate --check               (./dev bench --check)          ... and fail on a regression
    python -m perf.gate --update-baseline     (./dev bench --update-baseline) ... and rewrite perf/baseline.json
    python -m perf.gate --check --results .benchmarks/gate/<run>.json         judge a saved run, measure nothing

The suite is ``perf/test_benchmarks.py`` under pytest-benchmark; each run is saved as pytest-benchmark JSON under
``.benchmarks/gate/``. Each benchmark is measured in calibrations: the calibration (a bare polars parse of the same
files) runs right before each of its rounds, each round is divided by its own calibration, and the benchmark's
ratio is the median of those quotients (without paired calibrations, its median over the calibration benchmark's).
That ratio, not seconds, is what the baseline holds and the gate compares, so a slower machine, or one whose load
changes during the run, which slows the calibration as much as the rest, does not fail the gate. Times are CPU
seconds of the process (:data:`TIMER`), which do not count the wait for a core on a machine shared with others,
with one polars thread (:data:`THREADS`).

A benchmark regresses when its ratio grew by more than ``--threshold`` percent over the baseline's. The gate also
fails when a benchmark of the baseline did not run (it cannot vouch for what it did not measure); a benchmark the
baseline does not know yet is reported and passes. The DuckDB query is a reference, reported and not gated: it
is not our code. Arguments the gate does not know go to pytest (``./dev bench -k merge``).

Exit status: 0 passed (or no ``--check``), 1 a regression or a benchmark not run, 2 the gate could not judge
(the benchmarks failed, no calibration in the run, no or a broken baseline, a baseline measured with another timer
or another number of threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CALIBRATION = "test_calibration_polars_parse"
FIRST_LOAD = "test_first_load"
DUCKDB = "test_duckdb_kpi_query"
REFERENCES = frozenset({CALIBRATION, DUCKDB})  # measured for the ratios, not gated
MEASURED_WITH = ("timer", "threads")  # a run measured otherwise than its baseline cannot be compared with it
SUITE = Path(__file__).with_name("test_benchmarks.py")
BASELINE = Path(__file__).with_name("baseline.json")
RESULTS = Path(__file__).resolve().parents[1] / ".benchmarks" / "gate"
THRESHOLD_PCT = 30.0  # above the largest change seen between runs on a shared 2-core machine (docs/performance.md)
# CPU seconds of the process (all its threads), not wall seconds: on a shared machine the wall clock also counts
# the time spent waiting for a core, which is the other sessions' load, not our code's cost.
TIMER = "time.process_time"
# One polars (and DuckDB) thread: CPU seconds of several threads on a busy machine also count their spinning while
# a sibling waits for a core, which moved the multi-threaded calibration against the rest by up to a third.
THREADS = "1"

ABOUT = (
    "ratio: each benchmark of perf/test_benchmarks.py in calibrations (median over its rounds of the round's CPU "
    "seconds over the calibration's run beside it); rewrite with ./dev bench --update-baseline "
    "(docs/performance.md#benchmark-gate)"
)

console = Console(soft_wrap=True)  # messages stay one line each when piped; tables keep their layout


class GateError(Exception):
    """The gate cannot judge (exit 2): the message names what is missing."""


@dataclass(frozen=True)
class Measured:
    median_s: float
    iqr_s: float
    rounds: int
    calibration_s: float | None = None  # median of the calibrations run beside this benchmark's rounds
    paired_ratio: float | None = None  # median over rounds of round seconds / that round's calibration seconds


@dataclass(frozen=True)
class Run:
    """One run of the suite: each benchmark's figures by name, and what it was measured on."""

    benchmarks: dict[str, Measured]
    machine: dict[str, Any]
    date: str
    data: dict[str, Any]

    def ratios(self) -> dict[str, float]:
        """Each benchmark's time in calibrations: its paired ratio, else its median over the calibration's."""
        calibration = self.benchmarks.get(CALIBRATION)
        out = {}
        for name, m in self.benchmarks.items():
            if m.paired_ratio is not None:
                out[name] = m.paired_ratio
            elif calibration is not None and calibration.median_s > 0:
                out[name] = m.median_s / calibration.median_s
            else:
                raise GateError(f"{name} has no calibration to be divided by: run the whole suite ({CALIBRATION})")
        return out


@dataclass(frozen=True)
class Verdict:
    name: str
    baseline: float | None
    now: float | None
    verdict: str  # ok, faster, regressed, new, not run, reference

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.now is None:
            return None
        return self.now / self.baseline - 1

    @property
    def fails(self) -> bool:
        return self.verdict in ("regressed", "not run")


def _measured(bench: dict[str, Any]) -> Measured:
    stats = bench["stats"]
    rounds = stats.get("data") or []
    calibrations = bench.get("extra_info", {}).get("calibration_s") or []
    paired = len(rounds) == len(calibrations) > 0 and min(calibrations) > 0
    return Measured(
        stats["median"],
        stats["iqr"],
        stats["rounds"],
        statistics.median(calibrations) if paired else None,
        statistics.median(r / c for r, c in zip(rounds, calibrations, strict=True)) if paired else None,
    )


def load_run(path: Path) -> Run:
    """Read a pytest-benchmark JSON file."""
    try:
        doc = json.loads(path.read_text())
        benchmarks = {b["name"]: _measured(b) for b in doc["benchmarks"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GateError(f"{path} is not a pytest-benchmark result file ({e!r})") from e
    data: dict[str, Any] = next((b.get("extra_info", {}) for b in doc["benchmarks"] if b["name"] == CALIBRATION), {})
    return Run(benchmarks, doc.get("machine_info", {}), doc.get("datetime", ""), data)


def judge(baseline: dict[str, float], now: dict[str, float], threshold: float) -> list[Verdict]:
    """Each benchmark's verdict, ``threshold`` a fraction (0.25: a ratio may grow by 25 %)."""
    out = []
    for name in sorted(baseline.keys() | now.keys()):
        base, current = baseline.get(name), now.get(name)
        if name in REFERENCES:
            verdict = "reference"
        elif current is None:
            verdict = "not run"
        elif base is None:
            verdict = "new"
        elif current > base * (1 + threshold):
            verdict = "regressed"
        elif current < base * (1 - threshold):
            verdict = "faster"
        else:
            verdict = "ok"
        out.append(Verdict(name, base, current, verdict))
    return out


def read_baseline(path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        doc["ratios"] = {name: float(b["ratio"]) for name, b in doc["benchmarks"].items()}
    except FileNotFoundError as e:
        raise GateError(f"no baseline at {path}: make one with ./dev bench --update-baseline") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GateError(f"{path} is not a baseline file ({e!r}): rewrite it with ./dev bench --update-baseline") from e
    return doc


def baseline_doc(run: Run) -> dict[str, Any]:
    """The baseline file's content for ``run``: ratios, with the medians and the setting they were measured in."""
    ratios = run.ratios()
    m = run.machine
    return {
        "about": ABOUT,
        "date": run.date,
        **{key: run.machine.get(key) for key in MEASURED_WITH},
        "machine": {
            "system": f"{m.get('system', '?')} {m.get('release', '')}".strip(),
            "arch": m.get("machine"),
            "cpu": (m.get("cpu") or {}).get("brand_raw"),
            "cpu_count": m.get("cpu_count"),
        },
        "versions": {"python": m.get("python_version"), **m.get("packages", {})},
        "data": run.data,
        "benchmarks": {
            name: {
                "ratio": round(ratios[name], 4),
                "median_s": round(b.median_s, 4),
                "calibration_s": None if b.calibration_s is None else round(b.calibration_s, 4),
                "rounds": b.rounds,
            }
            for name, b in sorted(run.benchmarks.items())
        },
    }


def run_suite(pytest_args: list[str]) -> Path:
    """Run the suite under pytest-benchmark; the path of its saved JSON."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    argv = [sys.executable, "-m", "pytest", str(SUITE), "--benchmark-enable", "--benchmark-only",
            f"--benchmark-json={out}", f"--benchmark-timer={TIMER}", "--benchmark-sort=name",
            "--benchmark-columns=median,iqr,min,max,rounds", "-p", "no:cacheprovider", *pytest_args]  # fmt: skip
    env = {**os.environ, "POLARS_MAX_THREADS": THREADS}
    status = subprocess.run(argv, check=False, env=env).returncode
    if status != 0:
        out.unlink(missing_ok=True)  # .benchmarks/gate/ keeps only whole runs
        raise GateError(f"the benchmarks failed (pytest exit status {status}); nothing was judged")
    return out


def _x(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _short(name: str) -> str:
    """A benchmark's name without pytest's ``test_``, so that the tables fit 80 columns when piped."""
    return name.removeprefix("test_")


def print_run(run: Run, path: Path) -> None:
    ratios = run.ratios()
    t = Table(title=f"benchmarks ({path})", title_justify="left")
    for col in ("benchmark", "rounds", "median s", "IQR s", "calib. s", "x calib."):
        t.add_column(col, justify="left" if col == "benchmark" else "right")
    for name, m in sorted(run.benchmarks.items()):
        calibration = "-" if m.calibration_s is None else f"{m.calibration_s:.3f}"
        t.add_row(_short(name), str(m.rounds), f"{m.median_s:.3f}", f"{m.iqr_s:.3f}", calibration, _x(ratios[name]))
    console.print(t)
    if FIRST_LOAD in ratios:
        duck = f"{ratios[FIRST_LOAD] / ratios[DUCKDB]:.2f}x the DuckDB one-shot query" if DUCKDB in ratios else ""
        console.print(f"first load: {ratios[FIRST_LOAD]:.2f}x the bare polars parse, {duck}".rstrip(", "))


def print_verdicts(verdicts: list[Verdict], threshold: float, baseline: dict[str, Any], run: Run) -> None:
    t = Table(title=f"gate: a ratio may grow by at most {threshold:.0%}", title_justify="left")
    for col in ("benchmark", "baseline ratio", "now ratio", "change", "verdict"):
        t.add_column(col, justify="left" if col in ("benchmark", "verdict") else "right")
    for v in verdicts:
        change = "-" if v.change is None else f"{v.change:+.1%}"
        style = "bold red" if v.fails else "green" if v.verdict in ("ok", "faster") else ""
        t.add_row(_short(v.name), _x(v.baseline), _x(v.now), change, f"[{style}]{v.verdict}[/]" if style else v.verdict)
    console.print(t)
    now_versions = {"python": run.machine.get("python_version"), **run.machine.get("packages", {})}
    moved = {k: f"{baseline.get('versions', {}).get(k)} -> {v}" for k, v in now_versions.items()
             if baseline.get("versions", {}).get(k) != v}  # fmt: skip
    if moved:
        console.print(f"measured with other versions than the baseline ({baseline.get('date')}): {moved}")
    if baseline.get("data") and run.data and baseline["data"] != run.data:
        console.print(f"other data than the baseline's: {baseline['data']} -> {run.data}")
    if any(v.verdict == "new" for v in verdicts):
        console.print("new benchmarks are not gated until ./dev bench --update-baseline records them")
    for v in verdicts:
        if v.fails:
            console.print(f"[bold red]FAIL[/] {_short(v.name)}: {v.verdict}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="perf.gate",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="Other arguments go to pytest (-k merge). See docs/performance.md#benchmark-gate.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compare with the baseline; exit 1 on a regression")
    mode.add_argument("--update-baseline", action="store_true", help="write this run's ratios as the baseline")
    p.add_argument("--threshold", type=float, default=THRESHOLD_PCT, metavar="PCT",
                   help=f"largest allowed growth of a ratio, in percent (default {THRESHOLD_PCT:g})")  # fmt: skip
    p.add_argument("--results", type=Path, metavar="FILE", help="judge this saved run instead of running the suite")
    p.add_argument("--baseline", type=Path, default=BASELINE, metavar="FILE", help="default perf/baseline.json")
    args, pytest_args = p.parse_known_args(argv)
    if args.results and pytest_args:
        p.error(f"--results measures nothing, so pytest arguments make no sense: {' '.join(pytest_args)}")
    if args.update_baseline and pytest_args:
        p.error(f"the baseline is written from a whole run of the suite, without {' '.join(pytest_args)}")
    try:
        path = args.results or run_suite(pytest_args)
        run = load_run(path)
        print_run(run, path)
        if args.update_baseline:
            args.baseline.write_text(json.dumps(baseline_doc(run), indent=2) + "\n")
            console.print(f"baseline written to {args.baseline}")
        if not args.check:
            return 0
        baseline = read_baseline(args.baseline)
        for key in MEASURED_WITH:
            if baseline.get(key) != run.machine.get(key):
                raise GateError(f"the run's {key} is {run.machine.get(key)}, the baseline's {baseline.get(key)}")
        verdicts = judge(baseline["ratios"], run.ratios(), args.threshold / 100)
    except GateError as e:
        console.print(f"[bold red]gate error:[/] {e}")
        return 2
    print_verdicts(verdicts, args.threshold / 100, baseline, run)
    return 1 if any(v.fails for v in verdicts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
