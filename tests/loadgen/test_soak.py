"""The soak command on a small N: files landing at once, repeats and bad files among them, all accounted for."""

from __future__ import annotations

from typing import Any

import pytest

from loadgen import soak
from orchestration import operations
from processor.aws.dynamo import FileRecord

pytestmark = pytest.mark.slow


def test_files_landing_at_once_all_end_archived_or_rejected_with_exact_kpis() -> None:
    report = soak.run(12, seed=3)
    assert report.failures == []
    assert report.files == 12 and report.distinct_files == 11  # the same object delivered twice is one file
    assert report.outcomes == {"accepted": 10, "rejected": 1}
    assert report.executions and set(report.executions) == {"SUCCEEDED"}


def test_a_file_the_ledger_lost_fails_the_soak(monkeypatch: pytest.MonkeyPatch) -> None:
    real_record, real_wait = operations.record, operations.wait
    idle: list[bool] = []

    def forgetful(op: operations.Stack, item: operations.Landed) -> FileRecord | None:
        # Once the pipeline is idle, the products file's record is gone from what the checks read.
        return None if idle and item.key.endswith("products.csv") else real_record(op, item)

    def wait(*args: Any, **kwargs: Any) -> bool:
        done = real_wait(*args, **kwargs)
        idle.append(True)
        return done

    monkeypatch.setattr(operations, "record", forgetful)
    monkeypatch.setattr(operations, "wait", wait)
    report = soak.run(6, seed=4)
    assert any("products.csv" in f and "ledger says none" in f for f in report.failures), report.failures


def test_too_few_files_is_an_argument_error_before_any_stack_starts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        soak.main(["5"])
    assert stop.value.code == 2
    assert "files: 5 is too few: a soak needs at least 6" in capsys.readouterr().err
