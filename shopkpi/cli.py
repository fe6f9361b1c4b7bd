"""The ``shopkpi`` console script: land shop CSV files on the KPI pipeline (``ingest``, ``wait``), read its KPIs
(``kpis``, ``dashboard``), follow it (``runs``, ``rejects``), recompute a date range (``reprocess``), run it on this
machine (``local up``, ``demo``) or deploy it to AWS (``deploy``), or process files with no AWS at all (``process``).

Thin, and read top to bottom: the exit statuses, how a command is declared, then each command, its arguments
(``@arg``, as argparse's ``add_argument``) written above the handler that calls one function, and finally the parser
and ``main``. Logs go to stderr as JSON lines so that stdout holds only the command's answer (a table, or JSON with
``--json``); their level is ``--log-level``, else ``SHOPKPI_LOG_LEVEL``, else WARNING (the tasks' default is INFO: a
person at a terminal wants answers, not progress lines). A mistake prints one line on stderr naming the problem and
the fix, and exits 2.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from processor.errors import ConfigError, ShopKpiError
from processor.log import configure
from processor.model import CategoryKpi, OrderKpi, to_json
from processor.settings import Settings

if TYPE_CHECKING:
    from orchestration.deploy import Plan


class ExitCode(IntEnum):
    """The exit status of every ``shopkpi`` command (the README's table)."""

    OK = 0  # done (an empty answer too)
    NOT_EXACT = 1  # demo only: DynamoDB differs from the one-process recomputation
    USAGE = 2  # a usage or configuration error (argparse's own status), or an AWS error, in one line
    REJECTED = 3  # a file was rejected
    TIMED_OUT = 4  # still busy when --timeout ran out
    FAILED = 5  # a file or an execution failed


EXIT_CODES = "0 ok, 2 usage or configuration error, 3 a file was rejected, 4 timed out, 5 a file or an execution failed"

#: The CLI's log level when neither ``--log-level`` nor ``SHOPKPI_LOG_LEVEL`` names one.
LOG_LEVEL = "WARNING"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# --- how a command is declared -----------------------------------------------------------------------------------
Handler = Callable[[argparse.Namespace, Settings], ExitCode]
Decorator = Callable[[Handler], Handler]


@dataclass
class _Command:
    path: tuple[str, ...]  # ("ingest",) or, under a group, ("kpis", "daily")
    help: str
    handler: Handler
    arguments: list[tuple[tuple[str, ...], dict[str, Any]]] = field(default_factory=list)


_COMMANDS: list[_Command] = []  # in the order written: the order of `shopkpi --help`
_GROUPS: dict[str, tuple[str, str, str]] = {}  # group -> help, dest, metavar
_ARGUMENTS: dict[Handler, list[tuple[tuple[str, ...], dict[str, Any]]]] = {}


def group(name: str, help: str, *, dest: str, metavar: str = "COMMAND") -> None:
    """A command that only holds subcommands (``local up``, ``kpis daily``)."""
    _GROUPS[name] = (help, dest, metavar)


def command(*path: str, help: str) -> Decorator:
    """Register a handler as ``shopkpi PATH...``, with the ``@arg``s written below this decorator."""

    def register(handler: Handler) -> Handler:
        _COMMANDS.append(_Command(path, help, handler, _ARGUMENTS.pop(handler, [])))
        return handler

    return register


def arg(*flags: str, **options: Any) -> Decorator:
    """One argument of the command below, as ``ArgumentParser.add_argument(*flags, **options)``."""

    def add(handler: Handler) -> Handler:
        _ARGUMENTS.setdefault(handler, []).insert(0, (flags, options))  # decorators apply bottom-up
        return handler

    return add


def options(*decorators: Decorator) -> Decorator:
    """Several ``@arg``s as one, in the order written: options that several commands share."""

    def add(handler: Handler) -> Handler:
        for decorate in reversed(decorators):
            decorate(handler)
        return handler

    return add


# --- argument types ----------------------------------------------------------------------------------------------
def _date(text: str) -> str:
    from orchestration.operations import check_date

    try:
        return check_date(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _number(kind: type[int] | type[float], low: float, high: float, what: str) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_PORT = _number(int, 0, 65535, "a port: write 1-65535, or 0 for a free one")
_SECONDS = _number(float, 0.001, float("inf"), "a number of seconds above 0")
_COUNT = _number(int, 1, 1_000_000, "a count: write a whole number from 1")
_BUCKETS = _number(int, 1, 4096, "a bucket count: write a whole number from 1 to 4096")
_FROM = "first order date, inclusive, YYYY-MM-DD"
_TO = "last order date, inclusive, YYYY-MM-DD"
_TIMEOUT = "give up after SECONDS (default: %(default)s) and exit 4"


def _timeout(help: str) -> Decorator:
    return arg("--timeout", type=_SECONDS, default=900.0, metavar="SECONDS", help=help)


def _port(default: int, help: str = "port on 127.0.0.1 (default: %(default)s; 0: a free one)") -> Decorator:
    return arg("--port", type=_PORT, default=default, help=help)


# --- helpers of the handlers -------------------------------------------------------------------------------------
def kpis_json(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi]) -> bytes:
    return to_json({"daily": [k.public() for k in daily], "category": [k.public() for k in category]}, indent=2)


def _missing(paths: Sequence[str]) -> bool:
    """Say which paths do not exist (one line on stderr); True when some do not."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"no such file or directory: {', '.join(missing)}", file=sys.stderr)
    return bool(missing)


def _first_rejected(staging: Path, file_id: str) -> list[dict[str, str]]:
    """The first rejected rows of a file, read from the rejected-rows CSV that ``process`` kept in ``staging``."""
    from processor.pipeline import rejects_key
    from shopkpi.render import REJECTED_SHOWN

    path = staging / rejects_key(file_id)
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        return list(itertools.islice(csv.DictReader(f), REJECTED_SHOWN))


def _stack(settings: Settings) -> Any:
    from orchestration.operations import Stack

    return Stack.connect(settings)


def _print_json(value: object) -> None:
    sys.stdout.buffer.write(to_json(value, indent=2) + b"\n")


# --- the commands ------------------------------------------------------------------------------------------------
@command("process", help="validate and transform local files with no AWS; print the KPIs")
@arg("paths", nargs="+", metavar="PATH", help="files or directories (read recursively), in arrival order")
@arg("--staging", metavar="DIR", help="keep the staged data in DIR and reuse it next time (default: a temporary one)")
@arg("--json", action="store_true", help='print {"daily": [...], "category": [...]} instead of tables')
@arg("--buckets", type=_BUCKETS, metavar="N", help="staging hash buckets, 1-4096 (default: $SHOPKPI_BUCKETS, else 32)")
def cmd_process(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from processor.pipeline import expand, process_local
    from shopkpi.render import print_files, print_kpis, print_rejected_rows

    if _missing(args.paths):
        return ExitCode.USAGE
    files = expand([Path(p) for p in args.paths])  # directories read once, here
    if not files:  # an empty directory: most likely the wrong one
        print(f"no files to process in {', '.join(args.paths)} (directories are searched recursively)", file=sys.stderr)
        return ExitCode.USAGE
    with tempfile.TemporaryDirectory(prefix="shopkpi-staging-") as tmp:
        staging = Path(args.staging) if args.staging else Path(tmp)
        run = process_local(files, staging, settings)
        first_rejected = {f.file_id: _first_rejected(staging, f.file_id) for f in run.files if f.rejected_rows}
    if args.json:
        sys.stdout.buffer.write(kpis_json(run.daily, run.category) + b"\n")
    else:
        print_files(run.files, run.merge)
        print_rejected_rows(run.files, first_rejected, Path(args.staging) if args.staging else None)
        print_kpis(run.daily, run.category)
    return ExitCode.OK if all(f.outcome == "accepted" for f in run.files) else ExitCode.REJECTED


group("local", "the embedded AWS stack (moto server) on this machine", dest="local_command")


@command("local", "up", help="start moto on 127.0.0.1, deploy the stack, run trigger and tasks")
@_port(4566)
def cmd_local_up(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from orchestration.local.stack import serve_forever

    return ExitCode(serve_forever(settings, port=args.port))


@command("ingest", help="upload files or directories to incoming/ as a producer would")
@arg("paths", nargs="+", metavar="PATH", help="files or directories (read recursively) to upload")
@arg("--wait", action="store_true", help="block until processed, with progress on stderr; print each file's outcome")
@_timeout("with --wait: " + _TIMEOUT)
def cmd_ingest(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from orchestration import operations
    from shopkpi.render import WaitProgress, print_failed_executions, print_outcomes

    if _missing(args.paths):
        return ExitCode.USAGE  # before connecting, so nothing is uploaded
    # Before connecting, so nothing is uploaded: an empty directory (most likely the wrong one), or two files that
    # would land at one key (landing_keys raises a ConfigError, printed as a one-line error).
    planned = operations.landing_keys([Path(p) for p in args.paths])
    if not planned:
        print(f"no files to ingest in {', '.join(args.paths)} (directories are searched recursively)", file=sys.stderr)
        return ExitCode.USAGE
    stack = _stack(settings)
    landed = operations.upload(stack, planned)
    print(f"uploaded {len(landed)} files to s3://{stack.outputs.bucket}/incoming/", file=sys.stderr)
    if not args.wait:
        return ExitCode.OK
    with WaitProgress("waiting for the pipeline") as progress:
        done = operations.wait(stack, args.timeout, landed, on_status=progress)
    results = operations.outcomes(stack, landed)
    print_outcomes(results)
    # A file can be accepted while its execution failed later (the merge, after its retries): say so.
    failed = operations.failed_executions(stack, results)
    print_failed_executions(failed)
    if not done:
        print(f"timed out after {args.timeout:g} s", file=sys.stderr)
        return ExitCode.TIMED_OUT
    if failed or any(r.outcome not in ("accepted", "rejected") for r in results):
        return ExitCode.FAILED
    return ExitCode.OK if all(r.outcome == "accepted" for r in results) else ExitCode.REJECTED


@command("wait", help="block until no event is queued and no execution runs")
@_timeout(_TIMEOUT)
def cmd_wait(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from orchestration import operations

    if operations.wait(_stack(settings), args.timeout):
        return ExitCode.OK
    print(f"still busy after {args.timeout:g} s", file=sys.stderr)
    return ExitCode.TIMED_OUT


group("kpis", "read KPIs from DynamoDB", dest="kind", metavar="KIND")
_KPI_RANGE = options(
    arg("--from", dest="date_from", type=_date, metavar="DATE", help=_FROM + " (default: the first)"),
    arg("--to", dest="date_to", type=_date, metavar="DATE", help=_TO + " (default: the last)"),
)


@command("kpis", "daily", help="order-level KPIs per day")
@_KPI_RANGE
@arg(
    "--json",
    action="store_true",
    help="print a JSON array of objects with "
    "order_date, total_orders, total_revenue, total_items_sold, return_rate, unique_customers",
)
def cmd_kpis_daily(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from orchestration import operations
    from shopkpi.render import print_daily

    stack = _stack(settings)
    daily = operations.daily(stack, args.date_from, args.date_to)
    return _print_kpis(stack, args, daily, lambda: print_daily(daily))


@command("kpis", "category", help="category-level KPIs per day")
@arg("--category", metavar="NAME", help="one category, exact name (default: all)")
@_KPI_RANGE
@arg(
    "--json",
    action="store_true",
    help="print a JSON array of objects with category, order_date, daily_revenue, avg_order_value, avg_return_rate",
)
def cmd_kpis_category(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from orchestration import operations
    from shopkpi.render import print_category

    stack = _stack(settings)
    category = operations.category(stack, args.category, args.date_from, args.date_to)
    return _print_kpis(stack, args, category, lambda: print_category(category))


def _print_kpis(
    stack: Any, args: argparse.Namespace, rows: Sequence[OrderKpi | CategoryKpi], table: Callable[[], None]
) -> ExitCode:
    """The rows as JSON or as a table; when there are none, why, on stderr."""
    hint, code = _why_empty(stack, args) if not rows else (None, ExitCode.OK)
    if code == ExitCode.OK and args.json:
        _print_json([k.public() for k in rows])
    elif code == ExitCode.OK:
        table()
    if hint:
        print(hint, file=sys.stderr)
    return code


def _why_empty(stack: Any, args: argparse.Namespace) -> tuple[str | None, ExitCode]:
    """Why ``kpis`` found nothing, as one line, and the exit status: USAGE for a category that does not exist."""
    from orchestration import operations
    from shopkpi.render import category_hint

    years = operations.stored_years(stack)
    if not years:
        return "no KPIs yet: land files with `shopkpi ingest PATH --wait`", ExitCode.OK
    name = getattr(args, "category", None)
    bounded = args.date_from is not None or args.date_to is not None
    if name is not None:
        known = operations.category_names(stack)
        # The names come from the newest dates: an older category still counts if it has KPIs at all.
        if name not in known and not (bounded and operations.category(stack, name, None, None)):
            return category_hint(name, known), ExitCode.USAGE
    of = f" of category {name!r}" if name is not None else ""
    span = f"from {args.date_from or 'the first date'} to {args.date_to or 'the last'}"
    return f"no KPIs{of} {span}; stored years: {', '.join(years)}: widen --from/--to", ExitCode.OK


@command("reprocess", help="recompute the KPIs of a date range through the same workflow")
@arg("--from", dest="date_from", type=_date, metavar="DATE", required=True, help=_FROM)
@arg("--to", dest="date_to", type=_date, metavar="DATE", required=True, help=_TO)
@arg(
    "--wait",
    action="store_true",
    help="block until done, with progress on stderr; print what changed (KPI items rewritten, added, removed); "
    "exit 5 if the execution failed",
)
@_timeout("with --wait: " + _TIMEOUT)
def cmd_reprocess(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from orchestration import operations
    from shopkpi.render import WaitProgress, print_reprocess

    stack = _stack(settings)
    # The range as it stands before the execution starts: what it changed is the difference at the end.
    before = operations.snapshot(stack, args.date_from, args.date_to) if args.wait else None
    arn = operations.reprocess(stack, args.date_from, args.date_to)
    print(arn, flush=True)
    if before is None:
        return ExitCode.OK
    with WaitProgress(f"reprocessing {args.date_from}..{args.date_to}") as progress:
        done = operations.wait(stack, args.timeout, on_status=progress)
    if not done:
        print(f"still busy after {args.timeout:g} s", file=sys.stderr)
        return ExitCode.TIMED_OUT
    result = operations.reprocess_result(stack, arn, before, args.date_from, args.date_to)
    print_reprocess(result)
    return ExitCode.OK if result.status == "SUCCEEDED" else ExitCode.FAILED


_LIST = options(
    arg("--limit", type=_COUNT, default=20, metavar="N", help="show the newest N (default: %(default)s)"),
    arg("--json", action="store_true", help="print JSON instead of tables"),
)


@command("runs", help="recent executions (duration, files by outcome, merge) and file outcomes")
@_LIST
def cmd_runs(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from orchestration import operations
    from shopkpi.render import print_executions, print_ledger

    executions, files = operations.runs(_stack(settings), args.limit)
    if args.json:
        _print_json({"executions": executions, "files": files})
    else:
        print_executions(executions)
        print_ledger(files, "Recent files")
    return ExitCode.OK


@command("rejects", help="files with rejected rows: reasons, messages, and where the rows are kept")
@_LIST
def cmd_rejects(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from orchestration import operations
    from shopkpi.render import print_rejects

    stack = _stack(settings)
    files = operations.rejects(stack, args.limit)
    late = operations.merge_rejects(stack)
    if args.json:
        _print_json(files)  # the list tools already read; merge rejects are in the head (docs/storage.md)
        return ExitCode.OK
    print_rejects(files)
    if late["user_mismatch"] or late["rows"]:
        print(f"rejected at merge time: {late['user_mismatch']} items whose user_id differs from their order's")
        print("their rows, with file, line, rule and values: " + ", ".join(late["rows"]))
    return ExitCode.OK


@command("dashboard", help="serve the KPI dashboard (read-only, from DynamoDB)")
@_port(8050)
def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from orchestration import operations
    from shopkpi import health
    from shopkpi.dashboard import make_server

    stack = _stack(settings)
    try:
        server = make_server(
            "127.0.0.1",
            args.port,
            lambda f, t: operations.daily(stack, f, t),
            lambda c, f, t: operations.category(stack, c, f, t),
            health=lambda: health.snapshot(stack),
        )
    except OSError as e:  # the port is taken (or not ours to bind): the same one line as `local up` and `demo`
        print(f"port {args.port} is in use: pick another with --port ({e.strerror})", file=sys.stderr)
        return ExitCode.USAGE
    print(f"shopkpi dashboard on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return ExitCode.OK


@command("demo", help="the main job on the embedded stack: up, generate, ingest, wait, show KPIs")
@arg("--orders", type=_COUNT, default=60_000, metavar="N", help="orders in the sample (default: %(default)s)")
@_port(0, help="port of the embedded stack (default: 0, a free one)")
@arg("--keep", action="store_true", help="keep the stack running after the demo (Ctrl-C stops it)")
def cmd_demo(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from shopkpi.demo import run_demo

    return run_demo(settings, orders=args.orders, port=args.port, keep=args.keep)


@command("deploy", help="build and push the image, then create or update the stack via a change set")
@arg("--dry-run", action="store_true", help="show the plan (change set) and change nothing")
@arg("--image-uri", metavar="URI", help="deploy this image; nothing is built (default: build one)")
@arg("--skip-image", action="store_true", help="build nothing: use --image-uri, or keep the stack's current image")
@arg("--alert-email", metavar="ADDRESS", help="e-mail address subscribed to the alert topic (empty string: none)")
@arg("--param", action="append", default=[], metavar="KEY=VALUE", help="another template parameter (repeatable)")
def cmd_deploy(args: argparse.Namespace, settings: Settings) -> ExitCode:
    from rich.table import Table

    from orchestration import deploy
    from shopkpi.render import console, literal

    parameters = _key_values(args.param)
    if args.alert_email is not None:
        parameters["AlertEmail"] = args.alert_email
    result = deploy.deploy(
        settings,
        image_uri=args.image_uri,
        skip_image=args.skip_image,
        dry_run=args.dry_run,
        parameters=parameters,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        on_plan=_print_plan,
    )
    if result.status == "unchanged":
        console.print(literal(f"no changes: stack {result.plan.stack} is up to date"))
    if result.outputs:
        t = Table(title=literal(f"Outputs of stack {result.plan.stack}"), title_justify="left")
        t.add_column("output")
        t.add_column("value", overflow="fold")
        for key, value in sorted(result.outputs.items()):
            t.add_row(literal(key), literal(value))
        console.print(t)
    return ExitCode.OK


def _key_values(items: Sequence[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param wants KEY=VALUE, got {item!r}")
        found[key.strip()] = value
    return found


def _print_plan(plan: Plan) -> None:
    from rich.table import Table

    from shopkpi.render import console, literal

    t = Table(
        title=literal(f"Plan: {plan.kind} stack {plan.stack} ({plan.account}, {plan.region})"), title_justify="left"
    )
    for col in ("action", "resource", "type", "replacement"):
        t.add_column(col)
    styles = {"Add": "green", "Remove": "red", "Modify": "yellow"}
    for c in plan.changes:
        style = "red" if c.replacement in ("True", "Conditional") else styles.get(c.action)
        cells = (c.action, c.logical_id, c.resource_type, c.replacement or "")
        t.add_row(*map(literal, cells), style=style)
    console.print(t)
    kept = f" (kept from the stack: {', '.join(plan.kept)})" if plan.kept else ""
    console.print(literal("parameters: " + ", ".join(f"{k}={v}" for k, v in plan.parameters.items()) + kept))


# --- the parser and main -----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that reports an argument error in one line naming the problem and where the options are (instead
    of the usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


DESCRIPTION = (
    "Land shop CSV files on the KPI pipeline (the embedded AWS stack or one deployed on AWS), wait for them, read "
    "the KPIs it computes, reprocess a date range, deploy; or process files locally with no AWS at all."
)
EXAMPLES = f"""examples:
  shopkpi local up                       # the embedded AWS stack on 127.0.0.1:4566; keep it running
  shopkpi ingest data/sample --wait      # in another shell, after the export line `local up` prints
  shopkpi kpis daily --from 2025-03-01 --to 2025-03-31
  shopkpi process data/sample --json     # no AWS at all

exit status: {EXIT_CODES}"""


def _version() -> str:
    try:
        return metadata.version("shopkpi")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The global options, then every registered command in the order written, each with its arguments."""
    p = _Parser(
        prog="shopkpi",
        description=textwrap.fill(DESCRIPTION, 100),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--stack", metavar="NAME", help="deployed stack name (default: $SHOPKPI_STACK, else shopkpi)")
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="level of the JSON logs on stderr: DEBUG, INFO, WARNING or ERROR "
        f"(default: $SHOPKPI_LOG_LEVEL, else {LOG_LEVEL})",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for c in _COMMANDS:
        parent = sub
        if len(c.path) == 2:
            name = c.path[0]
            if name not in groups:
                help, dest, metavar = _GROUPS[name]
                groups[name] = sub.add_parser(name, help=help).add_subparsers(dest=dest, required=True, metavar=metavar)
            parent = groups[name]
        cp = parent.add_parser(c.path[-1], help=c.help)
        for flags, options in c.arguments:
            cp.add_argument(*flags, **options)
        cp.set_defaults(func=c.handler, command_parser=cp)
    return p


def _settings(args: argparse.Namespace) -> Settings:
    """Settings with the CLI's log level: ``--log-level`` beats ``SHOPKPI_LOG_LEVEL``, which beats WARNING."""
    env = dict(os.environ)
    if not env.get("SHOPKPI_LOG_LEVEL"):
        env["SHOPKPI_LOG_LEVEL"] = LOG_LEVEL
    settings = Settings.load(env, stack=args.stack, buckets=getattr(args, "buckets", None), log_level=args.log_level)
    if settings.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(
            f"log level {settings.log_level!r} is not one of {', '.join(LOG_LEVELS)}: "
            "fix --log-level or SHOPKPI_LOG_LEVEL"
        )
    return settings


def main(argv: Sequence[str] | None = None) -> ExitCode:
    args = build_parser().parse_args(argv)
    if "date_from" in vars(args):  # the commands with --from/--to: a reversed range is an argument error too
        from orchestration.operations import check_range

        try:
            check_range(args.date_from, args.date_to)
        except ShopKpiError as e:
            args.command_parser.error(e.message)
    try:
        settings = _settings(args)
        configure(settings.log_level, sys.stderr)
        code: ExitCode = args.func(args, settings)
        return code
    except ShopKpiError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return ExitCode.USAGE
    except BrokenPipeError:  # `shopkpi kpis daily | head`: the reader has what it wanted, nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return ExitCode.OK
    except OSError as e:  # a path or a port of this machine the command cannot use: the person can fix it
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return ExitCode.USAGE


if __name__ == "__main__":
    raise SystemExit(main())
