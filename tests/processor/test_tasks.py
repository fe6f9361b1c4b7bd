"""The ECS task entry points end to end against moto: S3 in, DynamoDB out, the same code path as on AWS."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from processor import merge_task, tasks
from processor.aws import make_clients
from processor.aws.dynamo import KpiTables, Ledger, MergeLock
from processor.settings import Settings
from processor.tasks import main
from tests.builders import WriteCsv, item, order, product
from tests.conftest import TASK_BUCKET

BUCKET = TASK_BUCKET


@pytest.fixture
def stack(task_stack: Settings) -> Settings:
    return task_stack


def land(path: Path, key: str) -> str:
    boto3.client("s3").upload_file(str(path), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


def task(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main(list(argv))
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    return code, next(x for x in reversed(lines) if x.get("event") == "task.result")


def keys(prefix: str) -> list[str]:
    got = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in got.get("Contents", []))


def test_files_flow_from_s3_to_dynamodb_and_originals_are_archived(
    stack: Settings, write_csv: WriteCsv, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = [
        land(write_csv("products.csv", [product(1, "Books")]), "incoming/products/products.csv"),
        land(write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]), "incoming/orders/o1.csv"),
        land(
            write_csv("order_items.csv", [item(1, 10, 100, 1, "4.00"), item(2, 10, 100, 1, "6.50")]),
            "incoming/order_items/i1.csv",
        ),
    ]
    for src in sources:
        code, result = task(capsys, "validate", src)
        assert code == 0 and result["outcome"] == "accepted"
        code, done = task(capsys, "transform", str(result["file_id"]))
        assert code == 0 and done["committed"] is True
    code, merged = task(capsys, "merge")
    assert code == 0 and merged["dates"] == ["2025-03-01"] and merged["published"] == 2

    assert keys("incoming/") == []
    assert keys("archive/orders/") and keys("archive/order_items/") and keys("archive/products/")
    clients = make_clients(stack)
    assert stack.order_table and stack.category_table and stack.ledger_table
    tables = KpiTables(clients.dynamodb, stack.order_table, stack.category_table)
    [day] = tables.daily("2025-03-01", "2025-03-01")
    assert (day.total_orders, day.total_revenue, day.unique_customers) == (1, Decimal("10.50"), 1)
    [books] = tables.category("Books", "2025-03-01", "2025-03-31")
    assert books.avg_order_value == Decimal("10.50")
    ledger = Ledger(clients.dynamodb, stack.ledger_table)
    assert {f.outcome for f in ledger.files()} == {"accepted"} and len(ledger.files()) == 3
    assert ledger.runs()[0].execution_id == "exec-1"


def test_rejected_file_is_quarantined_with_its_report(
    stack: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "orders.csv"
    bad.write_text("order_id,status,created_at,num_of_item\n1,complete,2025-03-01T00:00:00,1\n")
    src = land(bad, "incoming/orders/bad.csv")
    code, result = task(capsys, "validate", src)
    assert code == 0 and result["outcome"] == "rejected" and result["reason"] == "missing_column"
    code, _ = task(capsys, "quarantine", str(result["file_id"]))
    assert code == 0
    assert keys("rejected/orders/") == [
        k for k in keys("rejected/orders/") if k.endswith(("bad.csv", "bad.csv.report.json"))
    ]
    report = json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key=keys("rejected/")[-1])["Body"].read())
    assert report["reason"] == "missing_column" and "user_id" in report["message"]
    assert keys("incoming/") == []


def test_gzip_object_is_streamed_and_bad_rows_are_kept_with_reasons(
    stack: Settings, write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [order(i, 100, "2025-03-01T08:00:00") for i in range(1, 60)]
    rows.append(order(60, 100, "2025-03-01T08:00:00", status="lost"))
    plain = write_csv("orders.csv", rows)
    gz = tmp_path / "orders.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    code, result = task(capsys, "validate", land(gz, "incoming/orders/part.csv.gz"))
    assert code == 0 and result["outcome"] == "accepted" and result["rejects_by_reason"] == {"unknown_status": 1}
    fid = result["file_id"]
    body = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"reports/{fid}/rejected_rows.csv")["Body"].read()
    assert b"unknown_status" in body and b",lost," in body


def test_same_object_delivered_twice_is_staged_once(
    stack: Settings, write_csv: WriteCsv, capsys: pytest.CaptureFixture[str]
) -> None:
    land(write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]), "incoming/orders/o.csv")
    etag = boto3.client("s3").head_object(Bucket=BUCKET, Key="incoming/orders/o.csv")["ETag"].strip('"')
    delivered = event("incoming/orders/o.csv", etag)
    _, first = task(capsys, "validate", "--event", delivered)
    task(
        capsys, "validate", "--event", delivered
    )  # the second event for the same object, before the first is committed
    _, committed = task(capsys, "transform", str(first["file_id"]))
    _, again = task(capsys, "validate", "--event", delivered)  # ... and after it was archived
    assert committed["committed"] is True
    assert again["outcome"] == "skipped" and again["duplicate"] is True
    assert len(keys("staging/manifest/")) == 1


def test_a_reprocess_that_finds_the_lock_held_is_a_retryable_failure(
    stack: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    MergeLock(make_clients(stack).dynamodb, stack.ledger_table).acquire("other-run", 600)
    code, result = task(capsys, "merge", "--from", "2025-03-01", "--to", "2025-03-02")
    assert code == 1 and result["error"]["code"] == "ShopKpi.LockBusy"  # type: ignore[index]


def test_a_merge_that_finds_another_running_hands_its_files_over_and_succeeds(
    stack: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = MergeLock(make_clients(stack).dynamodb, stack.ledger_table)
    generation = lock.acquire("other-run", 600)
    code, result = task(capsys, "merge")
    assert code == 0 and result["handed_over_to"] == "other-run"
    # The running merge may not let go of the lock before it has merged once more.
    assert not lock.release("other-run", generation, unless_pending=True)
    assert lock.take_pending("other-run", generation)
    assert lock.release("other-run", generation, unless_pending=True)


def test_a_merge_retried_while_its_own_timed_out_attempt_holds_the_lock_waits_instead_of_handing_over(
    stack: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # The earlier attempt of this state is stopping (its token is dead): handing over to it would lose the delivery.
    lock = MergeLock(make_clients(stack).dynamodb, stack.ledger_table)
    generation = lock.acquire(f"{stack.execution_id}/0a1b2c3d", 600)
    code, result = task(capsys, "merge")
    assert code == 1 and result["error"]["code"] == "ShopKpi.LockBusy"  # type: ignore[index]  # retried, later
    assert not lock.take_pending(f"{stack.execution_id}/0a1b2c3d", generation)  # nothing was handed over


def test_the_running_merge_merges_again_what_was_handed_over_while_it_ran(
    stack: Settings, write_csv: WriteCsv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = MergeLock(make_clients(stack).dynamodb, stack.ledger_table)
    real_merge = merge_task.merge
    calls: list[int] = []

    def merge_while_a_late_file_lands(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:  # during the first round: a file is committed and its execution hands over
            src = land(write_csv("orders.csv", [order(11, 101, "2025-03-02T08:00:00")]), "incoming/orders/late.csv")
            _, late = task(capsys, "validate", src)
            task(capsys, "transform", str(late["file_id"]))
            assert lock.hand_over("late-run") is not None
        return real_merge(*args, **kwargs)  # type: ignore[arg-type]

    src = land(write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]), "incoming/orders/first.csv")
    _, first = task(capsys, "validate", src)
    task(capsys, "transform", str(first["file_id"]))
    monkeypatch.setattr(merge_task, "merge", merge_while_a_late_file_lands)
    code, result = task(capsys, "merge")
    assert code == 0 and result["rounds"] == 2
    tables = KpiTables(make_clients(stack).dynamodb, stack.order_table, stack.category_table)
    assert [k.order_date for k in tables.daily(None, None)] == ["2025-03-01", "2025-03-02"], "the late file counted"
    assert lock.holder() is None, "and the lock was let go"


def test_local_paths_work_without_aws(write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    staging = str(tmp_path / "st")
    p = write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")])
    code, result = task(capsys, "--staging", staging, "validate", str(p))
    assert code == 0 and result["outcome"] == "accepted"
    code, refused = task(capsys, "--staging", staging, "quarantine", str(result["file_id"]))
    assert code == 2 and refused["error"]["code"] == "ShopKpi.ConfigError"  # type: ignore[index]
    assert "was accepted by validation; nothing to quarantine" in refused["error"]["message"]  # type: ignore[index]
    assert task(capsys, "--staging", staging, "transform", str(result["file_id"]))[0] == 0
    code, merged = task(capsys, "--staging", staging, "merge")
    assert merged["kpis"]["daily"][0]["total_orders"] == 1  # type: ignore[index]


def test_a_local_rejected_file_keeps_its_report_where_s3_would_and_stays_in_place(
    stack: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One code path per step: the same report keys under the local staging directory as in the landing bucket.
    bad = tmp_path / "orders.csv"
    bad.write_text("order_id,user_id,status,created_at,num_of_item\n1,7,complete,not a time,1\n")
    staging = tmp_path / "st"
    code, local = task(capsys, "--staging", str(staging), "validate", str(bad))
    assert code == 0 and local["outcome"] == "rejected"
    code, remote = task(capsys, "validate", land(bad, "incoming/orders/orders.csv"))
    assert code == 0 and remote["outcome"] == "rejected"
    local_report = Path(str(local["report"]))
    assert local_report == staging / "reports" / str(local["file_id"]) / "report.json"
    assert str(remote["report"]).endswith(f"/reports/{remote['file_id']}/report.json")
    assert Path(str(local["rejects"])).name == str(remote["rejects"]).rsplit("/", 1)[-1] == "rejected_rows.csv"
    assert json.loads(local_report.read_text())["reason"] == remote["reason"]

    code, moved = task(capsys, "--staging", str(staging), "quarantine", str(local["file_id"]))
    assert code == 0 and moved["quarantined"] is None and bad.exists()  # the user's own file is never moved


def test_options_are_accepted_after_the_command(
    write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    staging = str(tmp_path / "st")
    p = write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")])
    code, result = task(capsys, "validate", str(p), "--staging", staging)
    assert code == 0 and result["outcome"] == "accepted"
    assert (tmp_path / "st" / "reports" / str(result["file_id"]) / "report.json").exists()
    assert task(capsys, "transform", str(result["file_id"]), "--staging", staging)[0] == 0


class StrictStepFunctions:
    """Step Functions' callback API with the limits AWS enforces and moto does not (output at most 256 KiB)."""

    def __init__(self, refuse: str | None = None) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.refuse = refuse

    def _error(self, code: str, op: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "refused"}}, op)

    def send_task_success(self, **kw: str) -> None:
        self.calls.append(("success", kw))
        if self.refuse:
            raise self._error(self.refuse, "SendTaskSuccess")
        if len(kw["output"].encode()) > 256 * 1024:
            raise self._error("InvalidOutput", "SendTaskSuccess")

    def send_task_failure(self, **kw: str) -> None:
        self.calls.append(("failure", kw))

    def send_task_heartbeat(self, **kw: str) -> None:
        self.calls.append(("heartbeat", kw))
        if self.refuse:
            raise self._error(self.refuse, "SendTaskHeartbeat")


@pytest.fixture
def callback(monkeypatch: pytest.MonkeyPatch) -> Iterator[StrictStepFunctions]:
    from processor.aws.callback import Callback

    sfn = StrictStepFunctions()
    monkeypatch.setattr(tasks, "_callback", lambda env, settings: Callback(sfn, "token-1"))
    yield sfn


def test_a_result_too_big_for_step_functions_is_cut_and_still_reported(
    tmp_path: Path, callback: StrictStepFunctions, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = [f"unexpected_column_{i:06d}" for i in range(20_000)]
    p = tmp_path / "orders.csv"
    p.write_text(
        ",".join(["order_id", "user_id", "status", "created_at", "num_of_item", *extra])
        + "\n10,100,complete,2025-03-01T08:00:00,1"
        + "," * len(extra)
        + "\n"
    )
    code, printed = task(capsys, "validate", str(p), "--staging", str(tmp_path / "st"))
    assert code == 0 and printed["outcome"] == "accepted"
    [(kind, sent)] = [c for c in callback.calls if c[0] != "heartbeat"]
    assert kind == "success"
    output = json.loads(sent["output"])
    assert output["outcome"] == "accepted" and output["file_id"] == printed["file_id"]
    assert len(sent["output"].encode()) <= 8 * 1024


def test_a_result_step_functions_refuses_fails_the_task_instead_of_hanging(
    write_csv: WriteCsv, tmp_path: Path, callback: StrictStepFunctions, capsys: pytest.CaptureFixture[str]
) -> None:
    callback.refuse = "ValidationException"
    p = write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")])
    code, _ = task(capsys, "validate", str(p), "--staging", str(tmp_path / "st"))
    assert code == 2
    failures = [kw for kind, kw in callback.calls if kind == "failure"]
    assert failures and "not accepted" in failures[0]["cause"]


def test_a_task_whose_token_is_dead_stops_itself(
    stack: Settings, monkeypatch: pytest.MonkeyPatch, callback: StrictStepFunctions, tmp_path: Path
) -> None:
    from processor.aws.callback import Callback

    callback.refuse = "TaskTimedOut"
    exited = threading.Event()
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    monkeypatch.setattr(tasks.os, "_exit", fake_exit)
    ws = tasks.Workspace.local(tmp_path)
    released: list[int] = []
    ws.on_abandon = lambda: released.append(len(codes))  # a merge lets go of its lock before it stops
    with tasks._heartbeat(ws, Callback(callback, "token-1"), stack):
        assert exited.wait(10), "the task kept working for a token nobody waits on"
    assert codes == [tasks.EXIT_ABANDONED] and released[:1] == [0]
    assert callback.calls[0][0] == "heartbeat"  # the first beat goes at once, not after a heartbeat interval


def test_scratch_left_by_a_killed_task_is_removed_by_the_next_task(
    write_csv: WriteCsv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = work / f"validate-{dead.pid}-k1ll3d"
    left.mkdir(parents=True)
    (left / "segment.parquet").write_bytes(b"x" * 1000)
    mine = work / f"merge-{os.getpid()}-running"  # a live process's scratch is not touched
    mine.mkdir()
    monkeypatch.setenv("SHOPKPI_WORK_DIR", str(work))
    p = write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")])
    assert task(capsys, "validate", str(p), "--staging", str(tmp_path / "st"))[0] == 0
    assert not left.exists() and mine.exists()
    assert sorted(x.name for x in work.iterdir()) == [mine.name]  # and the task removed its own


def event(key: str, etag: str | None = None) -> str:
    """The workflow's input for one landed file: the key URL-encoded as S3 writes it in its events."""
    from processor.aws.s3 import event_key

    return json.dumps({"bucket": BUCKET, "key": event_key(key), "etag": etag})


def test_an_event_key_is_decoded_before_the_object_is_read(
    stack: Settings, write_csv: WriteCsv, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "incoming/orders/orders red flower+1=2:3.csv"
    land(write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]), key)
    code, result = task(capsys, "validate", "--event", event(key))
    assert code == 0 and result["outcome"] == "accepted" and result["source"] == f"s3://{BUCKET}/{key}"


def test_an_event_whose_object_never_existed_is_a_failure_not_a_skip(
    stack: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = task(capsys, "validate", "--event", event("incoming/orders/never landed.csv", "0" * 32))
    assert code == 2 and result["error"]["code"] == "ShopKpi.NotFound"  # type: ignore[index]


def test_an_event_delivered_again_after_its_file_was_archived_is_skipped(
    stack: Settings, write_csv: WriteCsv, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "incoming/orders/orders_again.csv"
    land(write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")]), key)
    etag = boto3.client("s3").head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
    code, first = task(capsys, "validate", "--event", event(key, etag))
    assert task(capsys, "transform", str(first["file_id"]))[0] == 0  # archived: gone from incoming/
    code, again = task(capsys, "validate", "--event", event(key, etag))
    assert code == 0 and again["outcome"] == "skipped"


def test_a_local_file_name_that_is_not_utf8_is_validated_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / os.fsdecode(b"orders_\xff.csv")
    path.write_text("order_id,user_id,status,created_at,num_of_item\n10,100,complete,2025-03-01T08:00:00,1\n")
    code, result = task(capsys, "validate", str(path), "--staging", str(tmp_path / "st"))
    assert code == 0 and result["outcome"] == "accepted"
    assert str(result["source"]).endswith("orders_\\xff.csv")  # the byte shown escaped, the report valid JSON


def test_a_task_stuck_past_its_deadline_stops_itself(tmp_path: Path) -> None:
    # Reading a FIFO nobody writes to blocks forever: the work hangs, the heartbeat thread keeps the deadline.
    fifo = tmp_path / "orders.csv"
    os.mkfifo(fifo)
    env = {**os.environ, "SHOPKPI_TASK_DEADLINE": "2", "SHOPKPI_WORK_DIR": str(tmp_path / "work")}
    env.pop("SHOPKPI_TASK_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "processor.tasks", "validate", str(fifo), "--staging", str(tmp_path / "st")],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == tasks.EXIT_ABANDONED
    assert b'"event":"task.deadline"' in done.stdout


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["--from", "2025/03/01", "--to", "2025-03-02"],
            "argument --from: '2025/03/01' is not a date: write YYYY-MM-DD",
        ),
        (["--from", "2025-03-01", "--to", "20250302"], "argument --to: '20250302' is not a date: write YYYY-MM-DD"),
        (["--from", "2025-03-01"], "merge: --from and --to go together (a range of days, both inclusive)"),
        (["--to", "2025-03-01"], "merge: --from and --to go together (a range of days, both inclusive)"),
        (
            ["--from", "2025-03-05", "--to", "2025-03-01"],
            "merge: --from 2025-03-05 is after --to 2025-03-01: swap them",
        ),
    ],
)
def test_a_merge_range_written_wrong_is_an_argument_error_not_a_task_crash(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--staging", "unused", "merge", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr()
    assert err.err.strip().splitlines()[-1].endswith(said)
    assert "task.crashed" not in err.out


def test_a_folder_to_validate_or_a_file_as_staging_is_a_config_error_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write_csv: WriteCsv
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    code, result = task(capsys, "--staging", str(tmp_path / "st"), "validate", str(folder))
    assert code == 2 and result["error"]["code"] == "ShopKpi.ConfigError"  # type: ignore[index]
    assert result["error"]["message"] == f"{folder} is a folder: a task validates one file at a time"  # type: ignore[index]
    not_a_dir = tmp_path / "staging-file"
    not_a_dir.write_text("x")
    p = write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")])
    code, result = task(capsys, "--staging", str(not_a_dir), "validate", str(p))
    assert code == 2 and "is a file: give a directory" in result["error"]["message"]  # type: ignore[index]
