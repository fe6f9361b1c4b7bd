"""``python -m shopkpi.loadtest`` end to end on the embedded stack, on a tiny shop: the reports it writes, and its
exit status when a stored KPI disagrees with DuckDB."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from loadgen import loadtest as engine
from orchestration import operations
from shopkpi import loadtest
from shopkpi.cli import ExitCode

pytestmark = pytest.mark.slow

#: Three files (products, orders, items) of a shop of 2 days, landing within a second from three producers.
TINY = [
    "--orders", "1500", "--parts", "1", "--days", "2", "--window", "1", "--uploaders", "3", "--timeout", "120",
    "--batch-window", "1", "--max-concurrency", "4",
]  # fmt: skip


def test_a_tiny_load_test_writes_json_and_html_reports_with_agreeing_kpis(tmp_path: Path) -> None:
    out = tmp_path / "report"
    status = loadtest.main([*TINY, "--cache", str(tmp_path / "cache"), "--out", str(out)])

    report = json.loads((out / "report.json").read_text())
    assert status == ExitCode.OK, report["failures"]
    assert report["finished"] and report["outcomes"] == {"accepted": 3}
    assert report["kpi_check"] == {
        **report["kpi_check"],
        "agrees": True,
        "daily_items": 2,
        "differences": 0,
        "first_differences": [],
    }
    assert report["kpi_check"]["category_items"] > 20
    assert report["latency"]["files"] == 3 and report["latency"]["p50_s"] <= report["latency"]["max_s"]
    assert {"Validate", "Transform", "Merge"} <= set(report["stages"])
    assert report["stages"]["Validate"]["mb"] == pytest.approx(report["data"]["mb"], abs=0.1)
    memory = report["memory"]
    assert memory["measured"] and {"validate", "transform", "merge"} <= set(memory["by_stage"])
    assert memory["largest_task_peak_mib"] == max(s["peak_rss_mib"] for s in memory["by_stage"].values()) > 50
    assert report["series"]["visible"][-1][1] == pytest.approx(report["data"]["mb"], abs=0.1)

    page = (out / "report.html").read_text()
    assert "Chart.js v4" in page and "<script src" not in page  # Chart.js inlined: the page works offline
    assert json.dumps(report["kpi_check"]["category_items"]) in page and "__REPORT_JSON__" not in page
    assert not (tmp_path / "cache" / engine.cache_key(None, 1500, 1, 1, 2)).exists()  # generated here, not kept


def test_a_stored_kpi_that_disagrees_with_duckdb_fails_the_load_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_check = engine.check_kpis

    def tamper_then_check(op: operations.Stack, files: list[Path]) -> engine.Check:
        # One stored item changed through the KPI store, as a faulty merge would leave it.
        day = operations.daily(op, None, None)[0]
        wrong = msgspec.structs.replace(day, total_orders=day.total_orders + 1)
        op.tables.publish([wrong], [], 10**9, "2026-01-01T00:00:00+00:00", "tampered")
        return real_check(op, files)

    monkeypatch.setattr(engine, "check_kpis", tamper_then_check)
    out = tmp_path / "report"
    status = loadtest.main([*TINY, "--cache", str(tmp_path / "cache"), "--out", str(out), "--seed", "2"])

    assert status == ExitCode.NOT_EXACT
    check = json.loads((out / "report.json").read_text())["kpi_check"]
    assert not check["agrees"] and check["differences"] == 1
    assert check["first_differences"][0]["field"] == "total_orders"
    assert check["first_differences"][0]["stored"] == check["first_differences"][0]["duckdb"] + 1


def _outcome(**changes: object) -> dict[str, object]:
    failures = {"files_failed": [], "executions_not_succeeded": [], "not_uploaded": [], "files_rejected": []}
    report: dict[str, object] = {"finished": True, "failures": failures, "kpi_check": {"agrees": True}}
    for key, value in changes.items():
        if key in failures:
            failures[key] = value  # type: ignore[assignment]
        else:
            report[key] = value
    return report


def test_the_exit_status_names_the_first_problem_that_applies() -> None:
    differs = {"agrees": False}
    assert loadtest.exit_code(_outcome()) == ExitCode.OK
    assert loadtest.exit_code(_outcome(files_rejected=["a"])) == ExitCode.REJECTED
    assert loadtest.exit_code(_outcome(files_rejected=["a"], kpi_check=differs)) == ExitCode.NOT_EXACT
    assert loadtest.exit_code(_outcome(not_uploaded=["a"], kpi_check=differs)) == ExitCode.FAILED
    assert loadtest.exit_code(_outcome(finished=False, files_failed=["a"])) == ExitCode.TIMED_OUT


def test_the_html_page_keeps_a_file_name_from_closing_its_script() -> None:
    page = loadtest.render_html({"files": [{"file": "incoming/orders/</script><b>x.csv"}]})
    assert "</script><b>" not in page and "<\\/script><b>x.csv" in page
