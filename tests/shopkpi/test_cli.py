"""A new user's mistakes on the command line: each prints one line on stderr naming the problem and the fix, with no
traceback, and exits with a documented status (argument and configuration errors: 2) (issue 11, item 4)."""

from __future__ import annotations

import argparse
import socket
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import boto3
import orjson
import pytest

from orchestration import operations
from orchestration.local.stack import check_port_free
from processor.aws.dynamo import KpiTables, create_tables
from processor.errors import ConfigError
from processor.model import CategoryKpi, OrderKpi
from shopkpi import cli
from shopkpi.cli import build_parser, main
from tests.builders import WriteCsv, order


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
    monkeypatch.setattr(operations, "ingest", lambda stack, given: landed if given == paths else [])
    monkeypatch.setattr(operations, "wait", lambda stack, timeout, files: done)
    results = [{"file": f.key, "outcome": o} for f, o in zip(landed, outcomes, strict=True)]
    monkeypatch.setattr(operations, "outcomes", lambda stack, files: results)
    monkeypatch.setattr(operations, "failed_executions", lambda stack, records: failed)
    assert main(["ingest", *map(str, paths), "--wait", "--timeout", "7"]) == expected
    out = capsys.readouterr()
    assert "uploaded 2 files to s3://landing/incoming/" in out.err
    assert "incoming/x/orders.csv" in out.out
    assert ("timed out after 7 s" in out.err) == (not done)
    assert ("batch-1" in out.out) == bool(failed)


def test_ingest_without_wait_only_uploads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "orders.csv"
    path.write_text("x\n")
    stub_stack(monkeypatch)
    monkeypatch.setattr(operations, "ingest", lambda stack, paths: [operations.Landed(path, "incoming/o", "1")])
    monkeypatch.setattr(operations, "wait", lambda *a: pytest.fail("waited without --wait"))
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


@pytest.mark.parametrize(
    ("argv", "idle", "status", "expected"),
    [
        ([], True, "RUNNING", cli.ExitCode.OK),
        (["--wait"], True, "SUCCEEDED", cli.ExitCode.OK),
        (["--wait"], True, "FAILED", cli.ExitCode.FAILED),
        (["--wait"], False, "RUNNING", cli.ExitCode.TIMED_OUT),
    ],
    ids=["started", "succeeded", "failed", "timed-out"],
)
def test_reprocess(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    idle: bool,
    status: str,
    expected: cli.ExitCode,
) -> None:
    started: list[object] = []

    def start(payload: object, name_hint: str) -> str:
        started.append(payload)
        return "arn:reprocess-1"

    stub_stack(monkeypatch, workflow=SimpleNamespace(start=start, describe=lambda arn: {"status": status}))
    monkeypatch.setattr(operations, "wait", lambda stack, timeout: idle)
    assert main(["reprocess", "--from", "2025-03-01", "--to", "2025-03-02", *argv]) == expected
    assert started == [{"reprocess": {"from": "2025-03-01", "to": "2025-03-02"}}]
    out = capsys.readouterr()
    assert out.out == "arn:reprocess-1\n"
    if argv and idle:
        assert out.err == f"reprocessing {status.lower()}\n"


EXECUTION = {"name": "batch-20250301", "status": "SUCCEEDED", "startDate": "2025-03-01", "stopDate": "2025-03-01"}


@pytest.mark.parametrize("json", [False, True], ids=["table", "json"])
def test_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], json: bool) -> None:
    stub_stack(monkeypatch)
    monkeypatch.setattr(operations, "runs", lambda stack, limit: ([EXECUTION], []) if limit == 3 else ([], []))
    assert main(["runs", "--limit", "3", *(["--json"] if json else [])]) == cli.ExitCode.OK
    out = capsys.readouterr().out
    assert "batch-20250301" in out
    assert ('"executions"' in out) == json


@pytest.mark.parametrize("json", [False, True], ids=["table", "json"])
def test_rejects(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], json: bool) -> None:
    stub_stack(monkeypatch)
    monkeypatch.setattr(operations, "rejects", lambda stack, limit: [])
    late = {"user_mismatch": 2, "rows": ["s3://landing/rejected/merge/1.csv"]}
    monkeypatch.setattr(operations, "merge_rejects", lambda stack: late)
    assert main(["rejects", *(["--json"] if json else [])]) == cli.ExitCode.OK
    out = capsys.readouterr().out
    if json:
        assert out == "[]\n"
    else:
        assert "Rejected files" in out
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

    def make_server(host: str, port: int, daily: dashboard.DailyReader, category: dashboard.CategoryReader) -> Server:
        assert (host, port) == ("127.0.0.1", 8050)
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
