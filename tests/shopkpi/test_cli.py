"""A new user's mistakes on the command line: each prints one line on stderr naming the problem and the fix, with no
traceback, and exits with a documented status (argument and configuration errors: 2) (issue 11, item 4)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import boto3
import msgspec
import orjson
import pytest

from orchestration import operations
from orchestration.local.stack import check_port_free
from processor import tasks
from processor.aws import make_clients
from processor.aws.cloudformation import StackOutputs
from processor.aws.dynamo import FileRecord, KpiTables, create_tables
from processor.errors import ConfigError
from processor.model import CategoryKpi, OrderKpi
from processor.settings import Settings
from shopkpi import cli
from shopkpi.cli import build_parser, main
from tests.builders import WriteCsv, item, order, product
from tests.conftest import TASK_BUCKET


def one_line(text: str) -> str:
    """The one line a person reads; fails on a traceback or a usage block."""
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def no_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command refused before it reaches AWS never connects to a stack."""

    def refuse(settings: object) -> object:
        raise AssertionError("the command connected to a stack")

    monkeypatch.setattr(cli, "_stack", refuse)


@pytest.fixture
def tables(aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[KpiTables]:
    """Empty KPI tables in moto, read by the CLI's commands as a deployed stack's."""
    client = boto3.client("dynamodb", region_name="us-east-1")
    names = create_tables(client, "cli")
    kpi_tables = KpiTables(client, names.order, names.category, threads=1)
    monkeypatch.setattr(cli, "_stack", lambda settings: SimpleNamespace(tables=kpi_tables))
    yield kpi_tables


def publish(tables: KpiTables, categories: dict[str, list[str]]) -> None:
    """Order and category KPIs of the given categories on the given dates."""
    dates = sorted({d for days in categories.values() for d in days})
    daily = [
        OrderKpi(
            order_date=d,
            total_orders=1,
            returned_orders=0,
            total_items_sold=1,
            revenue_cents=100,
            unique_customers=1,
        )
        for d in dates
    ]
    category = [
        CategoryKpi(category=c, order_date=d, orders=1, returned_orders=0, items=1, revenue_cents=100)
        for c, days in categories.items()
        for d in days
    ]
    tables.publish(daily, category, generation=1, computed_at="2025-03-31T00:00:00Z", run_id="test")


# --- dates -------------------------------------------------------------------------------------------------------
DATE_COMMANDS = [["kpis", "daily"], ["kpis", "category"], ["reprocess", "--to", "2025-03-31"]]


@pytest.mark.parametrize("command", DATE_COMMANDS, ids=["daily", "category", "reprocess"])
@pytest.mark.parametrize("value", ["yesterday", "2025/03/10", "2025-13-01", "2025-02-30", "20250310"])
def test_a_date_not_written_yyyy_mm_dd_is_refused_at_parse_time(
    no_stack: None, capsys: pytest.CaptureFixture[str], command: list[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--from", value])
    assert exit_.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert f"--from: '{value}' is not a date: write YYYY-MM-DD" in line


@pytest.mark.parametrize("command", DATE_COMMANDS[:2], ids=["daily", "category"])
def test_a_bad_to_date_is_named_as_such(no_stack: None, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--to", "31.03.2025"])
    assert exit_.value.code == 2
    assert "--to: '31.03.2025' is not a date: write YYYY-MM-DD" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["kpis", "daily"], ["kpis", "category"], ["reprocess"]])
def test_a_reversed_range_is_refused(no_stack: None, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--from", "2025-03-10", "--to", "2025-03-01"])
    assert exit_.value.code == 2
    assert "--from 2025-03-10 is after --to 2025-03-01: swap them" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("given", [["--from", "2025-03-01"], ["--to", "2025-03-01"], []])
def test_reprocess_needs_both_bounds(no_stack: None, capsys: pytest.CaptureFixture[str], given: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["reprocess", *given])
    assert exit_.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert "the following arguments are required" in line
    assert "shopkpi reprocess --help" in line


@pytest.mark.parametrize(
    ("date_from", "date_to", "message"),
    [
        ("xx", "2025-03-01", "--from: 'xx' is not a date: write YYYY-MM-DD"),
        ("2025-03-01", "yy", "--to: 'yy' is not a date: write YYYY-MM-DD"),
        ("2025-03-10", "2025-03-01", "--from 2025-03-10 is after --to 2025-03-01: swap them"),
    ],
)
def test_reprocess_starts_no_execution_with_bad_dates(date_from: str, date_to: str, message: str) -> None:
    stack = SimpleNamespace()  # no workflow: starting an execution would fail with AttributeError
    with pytest.raises(ConfigError) as e:
        operations.reprocess(stack, date_from, date_to)  # type: ignore[arg-type]
    assert e.value.message == message


def test_valid_dates_reach_the_command(tables: KpiTables, capsys: pytest.CaptureFixture[str]) -> None:
    publish(tables, {"Books": ["2025-03-01", "2025-03-02"]})
    assert main(["kpis", "daily", "--from", "2025-03-02", "--to", "2025-03-02", "--json"]) == 0
    out = capsys.readouterr()
    assert '"order_date": "2025-03-02"' in out.out
    assert "2025-03-01" not in out.out
    assert out.err == ""


# --- categories and an empty stack -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        ("books", "no category 'books'; did you mean 'Books'? known: 'Books', 'Garden'"),
        ("Bookz", "no category 'Bookz'; did you mean 'Books'? known: 'Books', 'Garden'"),
        ("Toys", "no category 'Toys'; known: 'Books', 'Garden'"),
    ],
)
@pytest.mark.parametrize("json", [[], ["--json"]], ids=["table", "json"])
def test_an_unknown_category_is_answered_with_the_known_ones(
    tables: KpiTables, capsys: pytest.CaptureFixture[str], asked: str, expected: str, json: list[str]
) -> None:
    publish(tables, {"Books": ["2025-03-01", "2025-03-02"], "Garden": ["2025-03-02"]})
    assert main(["kpis", "category", "--category", asked, *json]) == 2
    out = capsys.readouterr()
    assert one_line(out.err) == expected
    assert out.out == ""


def test_a_known_category_with_nothing_in_the_range_says_so(
    tables: KpiTables, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(tables, {"Books": ["2025-03-01"]})
    assert main(["kpis", "category", "--category", "Books", "--from", "2024-01-01", "--to", "2024-01-31"]) == 0
    line = one_line(capsys.readouterr().err)
    assert line == "no KPIs of category 'Books' from 2024-01-01 to 2024-01-31; stored years: 2025: widen --from/--to"


def test_a_category_older_than_the_names_offered_still_counts(
    tables: KpiTables, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(tables, {"Books": ["2025-03-01"], "Garden": ["2025-03-02"]})
    monkeypatch.setattr(operations, "category_names", lambda stack: stack.tables.category_names(dates=1))
    assert main(["kpis", "category", "--category", "Books", "--from", "2025-03-02"]) == 0
    assert "no KPIs of category 'Books' from 2025-03-02 to the last" in one_line(capsys.readouterr().err)


def test_category_names_come_from_the_newest_dates(tables: KpiTables) -> None:
    publish(tables, {"Books": ["2024-12-31"], "Garden": ["2025-01-01", "2025-01-02"], "Toys": ["2025-01-02"]})
    assert tables.category_names() == ["Books", "Garden", "Toys"]
    assert tables.category_names(dates=1) == ["Garden", "Toys"]
    assert tables.category_names(dates=3) == ["Books", "Garden", "Toys"]  # across the year partitions


@pytest.mark.parametrize(
    "command", [["kpis", "daily"], ["kpis", "category"], ["kpis", "category", "--category", "Books"]]
)
def test_an_empty_stack_says_how_to_land_files(
    tables: KpiTables, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    assert main(command) == 0
    assert one_line(capsys.readouterr().err) == "no KPIs yet: land files with `shopkpi ingest PATH --wait`"


def test_an_empty_range_names_the_stored_years(tables: KpiTables, capsys: pytest.CaptureFixture[str]) -> None:
    publish(tables, {"Books": ["2025-03-01"]})
    assert main(["kpis", "daily", "--from", "2030-01-01"]) == 0
    line = one_line(capsys.readouterr().err)
    assert line == "no KPIs from 2030-01-01 to the last; stored years: 2025: widen --from/--to"


# --- paths, endpoint, port ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["ingest", "process"])
def test_a_missing_path_is_named_before_anything_is_uploaded(
    no_stack: None, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    missing = tmp_path / "no-such.csv"
    assert main([command, str(missing)]) == 2
    assert one_line(capsys.readouterr().err) == f"no such file or directory: {missing}"


def test_ingest_of_an_empty_folder_is_a_usage_error_as_for_process(
    no_stack: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["ingest", str(tmp_path), "--wait"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"no files to ingest in {tmp_path} (directories are searched recursively)"
    )


def test_ingest_refuses_two_files_that_would_replace_each_other_before_connecting(
    no_stack: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    first, second = tmp_path / "a" / "orders.csv", tmp_path / "b" / "orders.csv"
    for f in (first, second):
        f.parent.mkdir()
        f.write_text("order_id\n1\n")
    assert main(["ingest", str(first), str(second)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error [ShopKpi.ConfigError]: {first} and {second} would both land at incoming/orders/orders.csv, the "
        "second replacing the first: rename one, or pass the folder that holds both"
    )


@pytest.mark.parametrize("endpoint", ["127.0.0.1:4566", "localhost:4566", "ftp://127.0.0.1"])
def test_an_endpoint_without_a_scheme_is_one_line(
    no_stack: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert main(["kpis", "daily"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error [ShopKpi.ConfigError]: AWS_ENDPOINT_URL must start with http:// or https://, got '{endpoint}'"
    )


def test_a_bad_setting_is_one_line(
    no_stack: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOPKPI_BUCKETS", "0")
    assert main(["wait"]) == 2
    assert one_line(capsys.readouterr().err) == "error [ShopKpi.ConfigError]: SHOPKPI_BUCKETS must be 1..4096, got 0"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("SHOPKPI_CHUNK_MB", "0", "SHOPKPI_CHUNK_MB must be a positive number of megabytes, got 0"),
        ("SHOPKPI_CHUNK_MB", "8MB", "SHOPKPI_CHUNK_MB='8MB' is not a whole number"),
        ("SHOPKPI_MERGE_ROWS", "-1", "SHOPKPI_MERGE_ROWS must be a positive number of rows, got -1"),
        ("SHOPKPI_SPLIT_MB", "lots", "SHOPKPI_SPLIT_MB='lots' is not a number"),
        ("SHOPKPI_LOCK_TTL", "1 day", "SHOPKPI_LOCK_TTL: not a duration: '1 day' (use e.g. 3600, 90m, 24h, 2d)"),
    ],
)
def test_a_bad_setting_names_its_variable_and_value(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    var: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(var, value)
    assert main(["process", str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err) == f"error [ShopKpi.ConfigError]: {message}"


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_the_port_check_tells_a_busy_port_from_a_free_one(busy_port: int) -> None:
    with pytest.raises(ConfigError, match=f"port {busy_port} is in use: pick another with --port"):
        check_port_free(busy_port)
    check_port_free(0)  # any free one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    check_port_free(free)


def test_local_up_on_a_busy_port_exits_at_once(
    busy_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOPKPI_WORK_DIR", str(tmp_path))
    result: list[int] = []
    # In a thread so that a regression (moto waiting forever for its server) fails the test instead of hanging it.
    runner = threading.Thread(
        target=lambda: result.append(main(["local", "up", "--port", str(busy_port)])), daemon=True
    )
    runner.start()
    runner.join(timeout=120)
    assert result == [2], "shopkpi local up did not return on a busy port"
    assert one_line(capsys.readouterr().err) == (
        f"error [ShopKpi.ConfigError]: port {busy_port} is in use: pick another with --port"
    )


# --- numbers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["local", "up", "--port", "70000"], "--port: '70000' is not a port: write 1-65535, or 0 for a free one"),
        (["dashboard", "--port", "http"], "--port: 'http' is not a port"),
        (["wait", "--timeout", "0"], "--timeout: '0' is not a number of seconds above 0"),
        (["ingest", "x.csv", "--timeout", "5m"], "--timeout: '5m' is not a number of seconds above 0"),
        (["runs", "--limit", "0"], "--limit: '0' is not a count: write a whole number from 1"),
        (["process", "x.csv", "--buckets", "0"], "--buckets: '0' is not a bucket count: write a whole number from 1"),
    ],
)
def test_a_bad_number_is_refused_at_parse_time(
    no_stack: None, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in one_line(capsys.readouterr().err)


# --- help --------------------------------------------------------------------------------------------------------
def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_has_help() -> None:
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog} {'/'.join(action.option_strings) or action.dest} has no help"


@pytest.mark.parametrize("option", ["--from", "--to"])
def test_date_options_say_their_format(option: str) -> None:
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if option in action.option_strings:
                assert "YYYY-MM-DD" in str(action.help)


def test_help_names_the_commands_not_documents_outside_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    for parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "SPEC" not in text
        assert "brief" not in text
    text = build_parser().format_help()
    assert "examples:" in text
    assert "exit status: 0 ok, 2 usage or configuration error" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"shopkpi {metadata.version('shopkpi')}"


# --- every command through main (issue 10, item 4) ---------------------------------------------------------------
def test_every_command_is_registered_in_the_order_of_the_help() -> None:
    paths = [" ".join(c.path) for c in cli._COMMANDS]
    assert paths == [
        "process",
        "local up",
        "ingest",
        "wait",
        "kpis daily",
        "kpis category",
        "reprocess",
        "runs",
        "rejects",
        "dashboard",
        "demo",
        "deploy",
    ]


@pytest.mark.parametrize("path", [c.path for c in cli._COMMANDS], ids=lambda p: " ".join(p))
def test_every_command_has_help_that_exits_0(
    no_stack: None, capsys: pytest.CaptureFixture[str], path: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == cli.ExitCode.OK
    assert f"usage: shopkpi {' '.join(path)}" in capsys.readouterr().out


def test_exit_codes_are_the_documented_numbers() -> None:
    assert {c.name: c.value for c in cli.ExitCode} == {
        "OK": 0,
        "NOT_EXACT": 1,
        "USAGE": 2,
        "REJECTED": 3,
        "TIMED_OUT": 4,
        "FAILED": 5,
    }
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for code in cli.ExitCode:
        assert f"\n| {code.value} | " in readme, f"exit status {code.value} is not in the README's table"


def stub_stack(monkeypatch: pytest.MonkeyPatch, **attributes: object) -> SimpleNamespace:
    stack = SimpleNamespace(outputs=SimpleNamespace(bucket="landing"), **attributes)
    monkeypatch.setattr(cli, "_stack", lambda settings: stack)
    return stack


def outcome(f: operations.Landed, name: str) -> operations.FileOutcome:
    return operations.FileOutcome(
        file=f.key, file_id=f.file_id, record=None if name == "unknown" else FileRecord(outcome=name)
    )


def status(elapsed_s: float, validated: int = 0) -> operations.WaitStatus:
    return operations.WaitStatus(
        elapsed_s=elapsed_s, files=2, landed=2, validated=validated, merged=0, running=1, queued=0
    )


@pytest.mark.parametrize(
    ("done", "outcomes", "failed", "expected"),
    [
        (True, ["accepted", "accepted"], [], cli.ExitCode.OK),
        (True, ["accepted", "rejected"], [], cli.ExitCode.REJECTED),
        (True, ["accepted", "failed"], [], cli.ExitCode.FAILED),
        (True, ["accepted", "accepted"], [{"name": "batch-1", "status": "FAILED"}], cli.ExitCode.FAILED),
        (False, ["accepted", "unknown"], [], cli.ExitCode.TIMED_OUT),
    ],
    ids=["accepted", "rejected", "failed-file", "failed-execution", "timed-out"],
)
def test_ingest_wait_exits_with_the_worst_outcome(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    done: bool,
    outcomes: list[str],
    failed: list[dict[str, str]],
    expected: cli.ExitCode,
) -> None:
    paths = [tmp_path / "orders.csv", tmp_path / "products.csv"]
    for p in paths:
        p.write_text("x\n")
    stub_stack(monkeypatch)
    landed = [operations.Landed(p, f"incoming/x/{p.name}", f"id-{p.name}") for p in paths]
    monkeypatch.setattr(operations, "upload", lambda stack, planned: landed if [p for p, _ in planned] == paths else [])
    monkeypatch.setattr(operations, "wait", lambda stack, timeout, files, on_status: done)
    results = [outcome(f, o) for f, o in zip(landed, outcomes, strict=True)]
    monkeypatch.setattr(operations, "outcomes", lambda stack, files: results)
    monkeypatch.setattr(operations, "failed_executions", lambda stack, records: failed)
    assert main(["ingest", *map(str, paths), "--wait", "--timeout", "7"]) == expected
    out = capsys.readouterr()
    assert "uploaded 2 files to s3://landing/incoming/" in out.err
    assert "incoming/x/orders.csv" in out.out
    assert ("timed out after 7 s" in out.err) == (not done)
    assert ("batch-1" in out.out) == bool(failed)


def one_file_on_a_stub_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "orders.csv"
    path.write_text("x\n")
    stub_stack(monkeypatch)
    return path


def test_ingest_wait_shows_progress_on_stderr_every_few_seconds_when_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = one_file_on_a_stub_stack(tmp_path, monkeypatch)
    landed = [operations.Landed(path, "incoming/orders/orders.csv", "1")]
    monkeypatch.setattr(operations, "upload", lambda stack, planned: landed)

    def wait(stack: object, timeout: float, files: object, on_status: operations.OnStatus) -> bool:
        for elapsed in (0.0, 0.5, 1.0, 5.2, 5.7, 10.1, 11.0):  # polls: a line at 0, 5 and 10 s, and the last one
            on_status(status(elapsed, validated=int(elapsed > 5)))
        return True

    monkeypatch.setattr(operations, "wait", wait)
    monkeypatch.setattr(operations, "outcomes", lambda stack, files: [outcome(landed[0], "accepted")])
    monkeypatch.setattr(operations, "failed_executions", lambda stack, records: [])
    assert main(["ingest", str(path), "--wait"]) == cli.ExitCode.OK
    out = capsys.readouterr()
    lines = [x for x in out.err.splitlines() if x.startswith("waiting for the pipeline")]
    assert [x.split(": ")[1].split(",")[0] for x in lines] == ["0 s", "5 s", "10 s", "11 s"]
    assert lines[-1] == (
        "waiting for the pipeline: 11 s, 2/2 files landed, 1 validated, 0 merged; 1 executions running, 0 events queued"
    )
    assert "waiting" not in out.out and "File outcomes" in out.out


def test_ingest_without_wait_only_uploads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = one_file_on_a_stub_stack(tmp_path, monkeypatch)
    monkeypatch.setattr(operations, "upload", lambda stack, planned: [operations.Landed(path, "incoming/o", "1")])
    monkeypatch.setattr(operations, "wait", lambda *a, **k: pytest.fail("waited without --wait"))
    assert main(["ingest", str(path)]) == cli.ExitCode.OK
    assert capsys.readouterr().err == "uploaded 1 files to s3://landing/incoming/\n"


@pytest.mark.parametrize(("idle", "expected"), [(True, cli.ExitCode.OK), (False, cli.ExitCode.TIMED_OUT)])
def test_wait(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], idle: bool, expected: cli.ExitCode
) -> None:
    stub_stack(monkeypatch)
    monkeypatch.setattr(operations, "wait", lambda stack, timeout: idle)
    assert main(["wait", "--timeout", "5"]) == expected
    assert capsys.readouterr().err == ("" if idle else "still busy after 5 s\n")


# --- runs, rejects and reprocess against moto: files validated and merged by the real tasks -----------------------
@pytest.fixture
def pipeline(task_stack: Settings, monkeypatch: pytest.MonkeyPatch) -> operations.Stack:
    """The stack the CLI reads, on moto: the tasks' bucket and tables, a state machine whose executions stand for
    the workflow's, and the buffer queue."""
    clients = make_clients(task_stack)
    machine = clients.stepfunctions.create_state_machine(
        name="cli",
        definition='{"StartAt": "P", "States": {"P": {"Type": "Pass", "End": true}}}',
        roleArn="arn:aws:iam::123456789012:role/cli",
    )["stateMachineArn"]
    assert task_stack.order_table and task_stack.category_table and task_stack.ledger_table
    outputs = StackOutputs(
        bucket=TASK_BUCKET,
        order_table=task_stack.order_table,
        category_table=task_stack.category_table,
        ledger_table=task_stack.ledger_table,
        state_machine_arn=machine,
        buffer_queue_url=clients.sqs.create_queue(QueueName="buffer")["QueueUrl"],
        buffer_dlq_url="",
        workflow_dlq_url="",
        alert_topic_arn="",
        cluster_arn="",
        task_family="",
    )
    stack = operations.Stack(task_stack, clients, outputs)
    monkeypatch.setattr(cli, "_stack", lambda settings: stack)
    return stack


def end(stack: operations.Stack, arn: str, status: str) -> None:
    """End a moto execution with ``status`` (moto's executions only run when stopped, as ABORTED)."""
    from moto.stepfunctions.models import stepfunctions_backends

    stack.clients.stepfunctions.stop_execution(executionArn=arn)
    backend = stepfunctions_backends["123456789012"]["us-east-1"]
    machine = backend._get_state_machine_for_execution(arn)
    next(e for e in machine.executions if e.execution_arn == arn).status = status


def run_tasks(
    stack: operations.Stack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    execution: str,
    files: Sequence[Path],
    *merge_range: str,
) -> str:
    """One execution as the workflow runs it: each file landed, validated, transformed or quarantined, then the
    merge (of ``merge_range``, when given, as a reprocess does); its ARN. The tasks' output is discarded."""
    arn = stack.clients.stepfunctions.start_execution(stateMachineArn=stack.outputs.state_machine_arn, name=execution)[
        "executionArn"
    ]
    monkeypatch.setenv("SHOPKPI_EXECUTION_ID", arn.rsplit(":", 1)[-1])
    for path in files:
        key = f"incoming/{path.stem.split('_part')[0]}/{path.name}"
        stack.s3.upload(path, key)
        assert tasks.main(["validate", stack.s3.uri(key)]) == 0
        result = [orjson.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1]
        step = "transform" if result["outcome"] == "accepted" else "quarantine"
        assert tasks.main([step, result["file_id"]]) == 0
    merge = ["--from", merge_range[0], "--to", merge_range[1]] if merge_range else []
    assert tasks.main(["merge", *merge]) == 0
    capsys.readouterr()
    return str(arn)


def shop(write_csv: WriteCsv) -> list[Path]:
    """Products, 30 orders of which one has an unknown status (rejected, the file accepted without it), order
    items, and an orders file missing a column (rejected whole)."""
    orders = [order(i, 100 + i, "2025-03-01T08:00:00") for i in range(1, 30)]
    orders.append(order(30, 130, "2025-03-02T08:00:00", status="lost"))
    bad = write_csv("orders_bad.csv", [order(99, 1, "2025-03-01T08:00:00")])
    bad.write_text("\n".join(line.rsplit(",", 1)[0] for line in bad.read_text().splitlines()) + "\n")
    return [
        write_csv("products.csv", [product(1, "Books")]),
        write_csv("orders_part1.csv", orders),
        write_csv("order_items.csv", [item(i, i, 100 + i, 1, "10.00") for i in range(1, 30)]),
        bad,
    ]


def test_rejects_lists_rows_rejected_inside_accepted_files_with_where_they_are_kept(
    pipeline: operations.Stack,
    write_csv: WriteCsv,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_tasks(pipeline, monkeypatch, capsys, "batch-1", shop(write_csv))
    assert main(["rejects", "--json"]) == cli.ExitCode.OK
    listed = {Path(f["source"]).name: f for f in orjson.loads(capsys.readouterr().out)}
    assert set(listed) == {"orders_part1.csv", "orders_bad.csv"}  # the clean files are not listed
    partly = listed["orders_part1.csv"]
    assert partly["outcome"] == "accepted" and partly["rows"] == 30 and partly["rejected_rows"] == 1
    assert partly["rejects_by_reason"] == {"unknown_status": 1}
    whole = listed["orders_bad.csv"]
    assert whole["outcome"] == "rejected" and whole["reason"] == "missing_column" and "message" in whole
    for f in (partly, whole):
        assert f["report"] == f"s3://{TASK_BUCKET}/reports/{f['file_id']}/report.json"
        assert pipeline.s3.exists(f["report"].split("/", 3)[3])
    rows_key = partly["rejects"].split("/", 3)[3]
    kept = pipeline.s3.get_bytes(rows_key).decode()
    assert "lost" in kept and "unknown_status" in kept  # the rejected row itself, with its reason

    assert main(["rejects"]) == cli.ExitCode.OK
    table = capsys.readouterr().out
    assert "Files with rejected rows" in table and "unknown_status=1" in table
    assert partly["rejects"] in table and whole["report"] in table and whole["message"][:30] in table


def test_runs_show_each_executions_duration_and_files_by_outcome(
    pipeline: operations.Stack,
    write_csv: WriteCsv,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = shop(write_csv)
    first = run_tasks(pipeline, monkeypatch, capsys, "batch-1", files[:2])
    end(pipeline, first, "SUCCEEDED")
    run_tasks(pipeline, monkeypatch, capsys, "batch-2", files[2:])  # still running
    assert main(["runs", "--json"]) == cli.ExitCode.OK
    data = orjson.loads(capsys.readouterr().out)
    runs = {r["name"]: r for r in data["executions"]}
    assert (runs["batch-1"]["accepted"], runs["batch-1"]["rejected"], runs["batch-1"]["failed"]) == (2, 0, 0)
    assert (runs["batch-2"]["accepted"], runs["batch-2"]["rejected"]) == (1, 1)
    assert runs["batch-1"]["status"] == "SUCCEEDED" and runs["batch-1"]["seconds"] >= 0
    assert runs["batch-1"]["stopped_at"] >= runs["batch-1"]["started_at"]
    assert runs["batch-2"]["seconds"] is None and runs["batch-2"]["stopped_at"] is None
    assert runs["batch-1"]["files_merged"] == 2 and runs["batch-1"]["dates"] == 1  # orders count without items
    assert runs["batch-2"]["files_merged"] == 1 and runs["batch-2"]["dates"] == 1
    assert len(data["files"]) == 4

    assert main(["runs"]) == cli.ExitCode.OK
    table = capsys.readouterr().out
    row = cells(table, "batch-2")  # name, status, started, stopped, seconds, accepted, rejected, failed, merged, dates
    assert row[1] == "RUNNING" and row[3:5] == ["", ""] and row[5:] == ["1", "1", "0", "1", "1"]


def reprocess(stack: operations.Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``operations.wait`` as the workflow would answer it: the reprocess execution runs its merge and succeeds."""

    def wait(stack_: object, timeout: float, files: object = (), on_status: operations.OnStatus | None = None) -> bool:
        [running] = stack.workflow.executions("RUNNING")
        monkeypatch.setenv("SHOPKPI_EXECUTION_ID", running["name"])
        payload = orjson.loads(stack.workflow.describe(running["executionArn"])["input"])["reprocess"]
        assert tasks.main(["merge", "--from", payload["from"], "--to", payload["to"]]) == 0
        end(stack, running["executionArn"], "SUCCEEDED")
        assert on_status is not None
        on_status(operations.WaitStatus(elapsed_s=0.0, files=0, landed=0, validated=0, merged=0, running=0, queued=0))
        return True

    monkeypatch.setattr(operations, "wait", wait)


def cells(table: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    rows = ([c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines())
    return next(row for row in rows if row and row[0] == first)


def answer(stdout: str) -> list[str]:
    """The command's lines, without the JSON log lines the tasks run by the test wrote to stdout."""
    return [line for line in stdout.splitlines() if not line.startswith("{")]


def test_reprocess_of_unchanged_inputs_says_nothing_changed(
    pipeline: operations.Stack,
    write_csv: WriteCsv,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    end(pipeline, run_tasks(pipeline, monkeypatch, capsys, "batch-1", shop(write_csv)), "SUCCEEDED")
    reprocess(pipeline, monkeypatch, capsys)
    assert main(["reprocess", "--from", "2025-03-01", "--to", "2025-03-31", "--wait"]) == cli.ExitCode.OK
    out = capsys.readouterr()
    arn, summary, *rest = answer(out.out)
    assert arn.startswith("arn:aws:states:") and summary.startswith(f"reprocess {arn.rsplit(':', 1)[-1]}: succeeded")
    assert rest == ["nothing changed: the 2 KPI items of the range already held these values"]
    assert "reprocessing 2025-03-01..2025-03-31: 0 s, 0 executions running" in out.err


def test_reprocess_says_which_kpi_items_it_rewrote_and_removed(
    pipeline: operations.Stack,
    write_csv: WriteCsv,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    end(pipeline, run_tasks(pipeline, monkeypatch, capsys, "batch-1", shop(write_csv)), "SUCCEEDED")
    [day] = pipeline.tables.daily("2025-03-01", "2025-03-01")
    # Items the store should not hold: a day with wrong values and a category no file ever had, written with the
    # generation of the merge that wrote the day (as a bug would have left them; a reprocess's merge is newer).
    wrong = msgspec.structs.replace(day, revenue_cents=day.revenue_cents + 1)
    ghost = CategoryKpi(
        category="Ghost", order_date="2025-03-01", orders=1, returned_orders=0, items=1, revenue_cents=1
    )
    pipeline.tables.publish([wrong], [ghost], generation=1, computed_at="2025-03-01T00:00:00Z", run_id="stale")
    assert operations.daily(pipeline, "2025-03-01", "2025-03-01") == [wrong]
    reprocess(pipeline, monkeypatch, capsys)
    assert main(["reprocess", "--from", "2025-03-01", "--to", "2025-03-31", "--wait"]) == cli.ExitCode.OK
    out = "\n".join(answer(capsys.readouterr().out))
    assert "KPI items changed" in out
    assert cells(out, "order KPIs (per day)")[1:] == ["1", "0", "0"]  # rewritten, added, removed
    assert cells(out, "category KPIs (per day)")[1:] == ["0", "0", "1"]
    assert "1 dates changed: 2025-03-01; 1 items unchanged" in out
    assert [k.revenue_cents for k in pipeline.tables.daily("2025-03-01", "2025-03-01")] == [day.revenue_cents]


def test_reprocess_wait_exits_5_when_the_execution_failed(
    pipeline: operations.Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def wait(stack_: object, timeout: float, files: object = (), on_status: object = None) -> bool:
        [running] = pipeline.workflow.executions("RUNNING")
        end(pipeline, running["executionArn"], "FAILED")
        return True

    monkeypatch.setattr(operations, "wait", wait)
    assert main(["reprocess", "--from", "2025-03-01", "--to", "2025-03-02", "--wait"]) == cli.ExitCode.FAILED
    assert ": failed" in capsys.readouterr().out


def test_reprocess_without_wait_prints_the_execution_and_returns(
    pipeline: operations.Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(operations, "wait", lambda *a, **k: pytest.fail("waited without --wait"))
    assert main(["reprocess", "--from", "2025-03-01", "--to", "2025-03-02"]) == cli.ExitCode.OK
    [running] = pipeline.workflow.executions("RUNNING")
    assert capsys.readouterr().out == running["executionArn"] + "\n"
    payload = orjson.loads(pipeline.workflow.describe(running["executionArn"])["input"])
    assert payload == {"reprocess": {"from": "2025-03-01", "to": "2025-03-02"}}


def test_rejects_tells_the_rows_rejected_at_merge_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stub_stack(monkeypatch)
    monkeypatch.setattr(operations, "rejects", lambda stack, limit: [])
    late = {"user_mismatch": 2, "rows": ["s3://landing/rejected/merge/1.csv"]}
    monkeypatch.setattr(operations, "merge_rejects", lambda stack: late)
    assert main(["rejects"]) == cli.ExitCode.OK
    out = capsys.readouterr().out
    assert "rejected at merge time: 2 items whose user_id differs from their order's" in out
    assert "s3://landing/rejected/merge/1.csv" in out


def test_local_up_serves_the_embedded_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestration.local import stack

    served: list[int] = []

    def serve_forever(settings: object, port: int) -> int:
        served.append(port)
        return 0

    monkeypatch.setattr(stack, "serve_forever", serve_forever)
    assert main(["local", "up", "--port", "0"]) == cli.ExitCode.OK
    assert served == [0]


def test_demo_passes_its_options_and_its_exit_status(no_stack: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from shopkpi import demo

    asked: list[dict[str, object]] = []

    def run_demo(settings: object, **options: object) -> cli.ExitCode:
        asked.append(options)
        return cli.ExitCode.NOT_EXACT

    monkeypatch.setattr(demo, "run_demo", run_demo)
    assert main(["demo", "--orders", "2000", "--keep"]) == cli.ExitCode.NOT_EXACT
    assert asked == [{"orders": 2000, "port": 0, "keep": True}]


def test_dashboard_serves_the_stack_until_interrupted(
    tables: KpiTables, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shopkpi import dashboard

    publish(tables, {"Books": ["2025-03-01"]})
    closed: list[bool] = []

    class Server:
        server_address = ("127.0.0.1", 8123)

        def __init__(self, daily: dashboard.DailyReader, category: dashboard.CategoryReader) -> None:
            self.daily, self.category = daily, category

        def serve_forever(self) -> None:
            assert [k.order_date for k in self.daily(None, None)] == ["2025-03-01"]
            assert [k.category for k in self.category(None, "2025-03-01", "2025-03-01")] == ["Books"]
            raise KeyboardInterrupt

        def server_close(self) -> None:
            closed.append(True)

    def make_server(
        host: str,
        port: int,
        daily: dashboard.DailyReader,
        category: dashboard.CategoryReader,
        health: dashboard.HealthReader | None = None,
    ) -> Server:
        assert (host, port) == ("127.0.0.1", 8050)
        assert health is not None  # the page's pipeline-health panel has a source
        return Server(daily, category)

    monkeypatch.setattr(dashboard, "make_server", make_server)
    assert main(["dashboard"]) == cli.ExitCode.OK
    assert closed == [True]
    assert capsys.readouterr().out == "shopkpi dashboard on http://127.0.0.1:8123/ (Ctrl-C stops)\n"


# --- the log level -----------------------------------------------------------------------------------------------
@pytest.fixture
def logged(
    write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., list[str]]:
    """``logged(*global_options)``: run ``process`` on one valid file; the levels of the JSON log lines on stderr."""
    monkeypatch.setenv("SHOPKPI_WORK_DIR", str(tmp_path / "work"))
    orders = write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")])

    def run(*options: str) -> list[str]:
        code = main([*options, "process", str(orders), "--staging", str(tmp_path / "staging"), "--json"])
        assert code == cli.ExitCode.OK
        return [orjson.loads(line)["level"] for line in capsys.readouterr().err.splitlines()]

    return run


def test_the_cli_logs_warnings_only_by_default(
    logged: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOPKPI_LOG_LEVEL", raising=False)
    assert "INFO" not in logged()


def test_shopkpi_log_level_is_honoured(logged: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPKPI_LOG_LEVEL", "INFO")
    assert "INFO" in logged()


def test_the_log_level_option_beats_the_environment(
    logged: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOPKPI_LOG_LEVEL", "INFO")
    assert logged("--log-level", "ERROR") == []
    monkeypatch.setenv("SHOPKPI_LOG_LEVEL", "ERROR")
    assert "INFO" in logged("--log-level", "info")


@pytest.mark.parametrize(
    ("argv", "env"), [(["--log-level", "LOUD"], None), ([], "LOUD")], ids=["option", "environment"]
)
def test_an_unknown_log_level_is_one_line(
    no_stack: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: str | None,
) -> None:
    if env:
        monkeypatch.setenv("SHOPKPI_LOG_LEVEL", env)
    assert main([*argv, "wait"]) == cli.ExitCode.USAGE
    assert one_line(capsys.readouterr().err) == (
        "error [ShopKpi.ConfigError]: log level 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL: "
        "fix --log-level or SHOPKPI_LOG_LEVEL"
    )


# --- process: what a second run and a wrong directory say ---------------------------------------------------------
def test_process_of_files_staged_before_says_so_and_shows_the_same_kpis(
    write_csv: WriteCsv, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOPKPI_WORK_DIR", str(tmp_path / "work"))
    orders = write_csv("orders.csv", [order(10, 100, "2025-03-01T08:00:00")])
    command = ["process", str(orders), "--staging", str(tmp_path / "staging")]
    assert main(command) == cli.ExitCode.OK
    first = capsys.readouterr().out
    assert main(command) == cli.ExitCode.OK
    again = capsys.readouterr().out
    assert "orders.csv" in first and "staged before" not in first
    assert "nothing new to validate" in again and "staged before" in again
    assert again.split("Order KPIs per day")[1] == first.split("Order KPIs per day")[1]


def test_process_shows_the_first_rejected_rows_with_line_rule_and_value_and_where_all_are_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOPKPI_WORK_DIR", str(tmp_path / "work"))
    rules = Path("tests/cases/validation/orders_rules.csv")  # 8 of 11 rows break a rule
    assert main(["process", str(rules)]) == cli.ExitCode.REJECTED
    out = capsys.readouterr().out
    shown = [line.strip() for line in out.splitlines() if line.startswith("  orders_rules.csv line")]
    assert shown == [
        "orders_rules.csv line 3: missing_required, column order_id (empty)",
        "orders_rules.csv line 4: bad_type, column user_id = 'abc'",
        "orders_rules.csv line 5: unknown_status, column status = 'lost'",
    ]
    assert "run again with --staging DIR" in out  # the temporary staging directory is gone

    staging = tmp_path / "staging"
    assert main(["process", str(rules), "--staging", str(staging)]) == cli.ExitCode.REJECTED
    kept = next(line for line in capsys.readouterr().out.splitlines() if "all 8 of orders_rules.csv" in line)
    csv_path = Path(kept.split(": ", 1)[1])
    assert csv_path.is_relative_to(staging) and len(csv_path.read_text().splitlines()) == 1 + 8


def test_process_of_an_empty_directory_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["process", str(tmp_path / "empty")]) == cli.ExitCode.USAGE
    assert (
        capsys.readouterr().err
        == f"no files to process in {tmp_path / 'empty'} (directories are searched recursively)\n"
    )


def test_dashboard_on_a_busy_port_is_one_line_and_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stub_stack(monkeypatch)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--port", str(port)]) == cli.ExitCode.USAGE
    assert one_line(capsys.readouterr().err).startswith(f"port {port} is in use: pick another with --port (")


def test_process_with_a_file_as_its_staging_directory_is_a_usage_error(
    no_stack: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    staging = tmp_path / "not-a-dir"
    staging.write_text("x")
    data = tmp_path / "orders.csv"
    data.write_text("order_id\n1\n")
    assert main(["process", str(data), "--staging", str(staging)]) == cli.ExitCode.USAGE
    assert one_line(capsys.readouterr().err) == (
        f"error [ShopKpi.ConfigError]: the staging directory {staging} is a file: give a directory (it is created if "
        "missing)"
    )


def test_a_path_the_command_cannot_use_is_one_line_not_a_traceback(
    no_stack: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("x")
    data = tmp_path / "orders.csv"
    data.write_text("order_id\n1\n")
    staging = tmp_path / "file" / "below-a-file"  # its parent is a file: cannot be created
    assert main(["process", str(data), "--staging", str(staging)]) == cli.ExitCode.USAGE
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and str(tmp_path / "file") in line


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path: Path) -> None:
    # `shopkpi process DIR --json | head -1`: the reader closes the pipe; no traceback, no error, status 0.
    data = Path("tests/cases/validation/orders_minimal.csv")
    env = {**os.environ, "SHOPKPI_WORK_DIR": str(tmp_path / "work")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shopkpi.cli", "process", str(data), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "error" not in err.lower()
