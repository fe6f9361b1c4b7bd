"""The ``shopkpi`` console script: land shop CSV files on the KPI pipeline (``ingest``, ``wait``), read its KPIs
(``kpis``, ``dashboard``), follow it (``runs``, ``rejects``), recompute a date range (``reprocess``), run it on this
machine (``local up``, ``demo``) or deploy it to AWS (``deploy``), or process files with no AWS at all (``process``).

Thin: each command parses its arguments and calls one function. Logs go to stderr as JSON lines so that stdout holds
only the command's answer (a table, or JSON with ``--json``). A mistake prints one line on stderr naming the problem
and the fix, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from processor.errors import ShopKpiError
from processor.log import configure
from processor.model import CategoryKpi, OrderKpi, to_json
from processor.settings import Settings

if TYPE_CHECKING:
    from orchestration.deploy import Plan


def kpis_json(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi]) -> bytes:
    return to_json({"daily": [k.public() for k in daily], "category": [k.public() for k in category]}, indent=2)


EXIT_CODES = "0 ok, 2 usage or configuration error, 3 a file was rejected, 4 timed out, 5 a file or an execution failed"


def _missing(paths: Sequence[str]) -> bool:
    """Say which paths do not exist (one line on stderr); True when some do not."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"no such file or directory: {', '.join(missing)}", file=sys.stderr)
    return bool(missing)


def cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    from processor.pipeline import process_local
    from shopkpi.render import print_files, print_kpis

    if _missing(args.paths):
        return 2
    with tempfile.TemporaryDirectory(prefix="shopkpi-staging-") as tmp:
        staging = Path(args.staging) if args.staging else Path(tmp)
        run = process_local([Path(p) for p in args.paths], staging, settings)
    if args.json:
        sys.stdout.buffer.write(kpis_json(run.daily, run.category) + b"\n")
    else:
        print_files(run.files, run.merge)
        print_kpis(run.daily, run.category)
    return 0 if all(f.outcome == "accepted" for f in run.files) else 3


def _stack(settings: Settings) -> Any:
    from orchestration.operations import Stack

    return Stack.connect(settings)


def _print_json(value: object) -> None:
    sys.stdout.buffer.write(to_json(value, indent=2) + b"\n")


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from orchestration import operations
    from shopkpi.render import print_failed_executions, print_outcomes

    if _missing(args.paths):
        return 2  # before connecting, so nothing is uploaded
    stack = _stack(settings)
    landed = operations.ingest(stack, [Path(p) for p in args.paths])
    print(f"uploaded {len(landed)} files to s3://{stack.outputs.bucket}/incoming/", file=sys.stderr)
    if not args.wait:
        return 0
    done = operations.wait(stack, args.timeout, landed)
    results = operations.outcomes(stack, landed)
    print_outcomes(results)
    # A file can be accepted while its execution failed later (the merge, after its retries): say so.
    failed = operations.failed_executions(stack, results)
    print_failed_executions(failed)
    if not done:
        print(f"timed out after {args.timeout:.0f} s", file=sys.stderr)
        return 4
    if failed or any(r.get("outcome") not in ("accepted", "rejected") for r in results):
        return 5
    return 0 if all(r.get("outcome") == "accepted" for r in results) else 3


def cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    from orchestration import operations

    if operations.wait(_stack(settings), args.timeout):
        return 0
    print(f"still busy after {args.timeout:.0f} s", file=sys.stderr)
    return 4


def cmd_kpis(args: argparse.Namespace, settings: Settings) -> int:
    from orchestration import operations
    from shopkpi.render import print_category, print_daily

    stack = _stack(settings)
    daily: list[OrderKpi] = []
    category: list[CategoryKpi] = []
    if args.kind == "daily":
        daily = operations.daily(stack, args.date_from, args.date_to)
    else:
        category = operations.category(stack, args.category, args.date_from, args.date_to)
    rows: list[OrderKpi | CategoryKpi] = [*daily, *category]
    hint, code = _why_empty(stack, args) if not rows else (None, 0)
    if code == 0 and args.json:
        _print_json([k.public() for k in rows])
    elif code == 0:
        print_daily(daily) if args.kind == "daily" else print_category(category)
    if hint:
        print(hint, file=sys.stderr)
    return code


def _why_empty(stack: Any, args: argparse.Namespace) -> tuple[str | None, int]:
    """Why ``kpis`` found nothing, as one line, and the exit status: 2 for a category that does not exist."""
    from orchestration import operations
    from shopkpi.render import category_hint

    years = operations.stored_years(stack)
    if not years:
        return "no KPIs yet: land files with `shopkpi ingest PATH --wait`", 0
    name = getattr(args, "category", None)
    bounded = args.date_from is not None or args.date_to is not None
    if name is not None:
        known = operations.category_names(stack)
        # The names come from the newest dates: an older category still counts if it has KPIs at all.
        if name not in known and not (bounded and operations.category(stack, name, None, None)):
            return category_hint(name, known), 2
    of = f" of category {name!r}" if name is not None else ""
    span = f"from {args.date_from or 'the first date'} to {args.date_to or 'the last'}"
    return f"no KPIs{of} {span}; stored years: {', '.join(years)}: widen --from/--to", 0


def cmd_reprocess(args: argparse.Namespace, settings: Settings) -> int:
    from orchestration import operations

    stack = _stack(settings)
    arn = operations.reprocess(stack, args.date_from, args.date_to)
    print(arn)
    if args.wait and not operations.wait(stack, args.timeout):
        print(f"still busy after {args.timeout:.0f} s", file=sys.stderr)
        return 4
    if args.wait:
        status = stack.workflow.describe(arn)["status"]
        print(f"reprocessing {status.lower()}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 5
    return 0


def cmd_runs(args: argparse.Namespace, settings: Settings) -> int:
    from orchestration import operations
    from shopkpi.render import print_executions, print_ledger

    executions, files = operations.runs(_stack(settings), args.limit)
    if args.json:
        _print_json({"executions": executions, "files": files})
    else:
        print_executions(executions)
        print_ledger(files, "Recent files")
    return 0


def cmd_rejects(args: argparse.Namespace, settings: Settings) -> int:
    from orchestration import operations
    from shopkpi.render import print_ledger

    stack = _stack(settings)
    files = operations.rejects(stack, args.limit)
    late = operations.merge_rejects(stack)
    if args.json:
        _print_json(files)  # the list tools already read; merge rejects are in the head (docs/storage.md)
        return 0
    print_ledger(files, "Rejected files")
    if late["user_mismatch"] or late["rows"]:
        print(f"rejected at merge time: {late['user_mismatch']} items whose user_id differs from their order's")
        print("their rows, with file, line, rule and values: " + ", ".join(late["rows"]))
    return 0


def cmd_local_up(args: argparse.Namespace, settings: Settings) -> int:
    from orchestration.local.stack import serve_forever

    return serve_forever(settings, port=args.port)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from orchestration.demo import run_demo

    return run_demo(settings, orders=args.orders, port=args.port, keep=args.keep)


def _key_values(items: Sequence[str]) -> dict[str, str]:
    from processor.errors import ConfigError

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


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> int:
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
    return 0


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from orchestration import operations
    from shopkpi.dashboard import make_server

    stack = _stack(settings)
    server = make_server(
        "127.0.0.1",
        args.port,
        lambda f, t: operations.daily(stack, f, t),
        lambda c, f, t: operations.category(stack, c, f, t),
    )
    print(f"shopkpi dashboard on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that reports an argument error in one line naming the problem and where the options are (instead
    of the usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _date(text: str) -> str:
    from orchestration.operations import check_date
    from processor.errors import ConfigError

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
_FROM = "first order date, inclusive, YYYY-MM-DD"
_TO = "last order date, inclusive, YYYY-MM-DD"
_TIMEOUT = "give up after SECONDS (default: %(default)s) and exit 4"

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
        help="level of the JSON logs on stderr: DEBUG, INFO, WARNING or ERROR (default: WARNING)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pr = sub.add_parser("process", help="validate and transform local files with no AWS; print the KPIs")
    pr.add_argument(
        "paths", nargs="+", metavar="PATH", help="files or directories (read recursively), in arrival order"
    )
    pr.add_argument(
        "--staging", metavar="DIR", help="keep the staged data in DIR and reuse it next time (default: a temporary one)"
    )
    pr.add_argument("--json", action="store_true", help='print {"daily": [...], "category": [...]} instead of tables')
    pr.add_argument(
        "--buckets", type=int, metavar="N", help="staging hash buckets, 1-4096 (default: $SHOPKPI_BUCKETS, else 32)"
    )
    pr.set_defaults(func=cmd_process)

    local = sub.add_parser("local", help="the embedded AWS stack (moto server) on this machine")
    local_sub = local.add_subparsers(dest="local_command", required=True, metavar="COMMAND")
    up = local_sub.add_parser("up", help="start moto on 127.0.0.1, deploy the stack, run trigger and tasks")
    up.add_argument("--port", type=_PORT, default=4566, help="port on 127.0.0.1 (default: %(default)s; 0: a free one)")
    up.set_defaults(func=cmd_local_up)

    ing = sub.add_parser("ingest", help="upload files or directories to incoming/ as a producer would")
    ing.add_argument("paths", nargs="+", metavar="PATH", help="files or directories (read recursively) to upload")
    ing.add_argument("--wait", action="store_true", help="block until processed; print each file's outcome")
    ing.add_argument("--timeout", type=_SECONDS, default=900.0, metavar="SECONDS", help="with --wait: " + _TIMEOUT)
    ing.set_defaults(func=cmd_ingest)

    w = sub.add_parser("wait", help="block until no event is queued and no execution runs")
    w.add_argument("--timeout", type=_SECONDS, default=900.0, metavar="SECONDS", help=_TIMEOUT)
    w.set_defaults(func=cmd_wait)

    k = sub.add_parser("kpis", help="read KPIs from DynamoDB")
    k_sub = k.add_subparsers(dest="kind", required=True, metavar="KIND")
    fields = {
        "daily": "order_date, total_orders, total_revenue, total_items_sold, return_rate, unique_customers",
        "category": "category, order_date, daily_revenue, avg_order_value, avg_return_rate",
    }
    for kind, names in fields.items():
        kp = k_sub.add_parser(kind, help=f"{'order' if kind == 'daily' else 'category'}-level KPIs per day")
        if kind == "category":
            kp.add_argument("--category", metavar="NAME", help="one category, exact name (default: all)")
        kp.add_argument("--from", dest="date_from", type=_date, metavar="DATE", help=_FROM + " (default: the first)")
        kp.add_argument("--to", dest="date_to", type=_date, metavar="DATE", help=_TO + " (default: the last)")
        kp.add_argument("--json", action="store_true", help=f"print a JSON array of objects with {names}")
        kp.set_defaults(func=cmd_kpis, command_parser=kp)

    rp = sub.add_parser("reprocess", help="recompute the KPIs of a date range through the same workflow")
    rp.add_argument("--from", dest="date_from", type=_date, metavar="DATE", required=True, help=_FROM)
    rp.add_argument("--to", dest="date_to", type=_date, metavar="DATE", required=True, help=_TO)
    rp.add_argument("--wait", action="store_true", help="block until done; exit 5 if the execution failed")
    rp.add_argument("--timeout", type=_SECONDS, default=900.0, metavar="SECONDS", help="with --wait: " + _TIMEOUT)
    rp.set_defaults(func=cmd_reprocess, command_parser=rp)

    for name, func, what in (
        ("runs", cmd_runs, "recent executions and file outcomes"),
        ("rejects", cmd_rejects, "rejected files and their rows by reason"),
    ):
        r = sub.add_parser(name, help=what)
        r.add_argument("--limit", type=_COUNT, default=20, metavar="N", help="show the newest N (default: %(default)s)")
        r.add_argument("--json", action="store_true", help="print JSON instead of tables")
        r.set_defaults(func=func)

    db = sub.add_parser("dashboard", help="serve the KPI dashboard (read-only, from DynamoDB)")
    db.add_argument("--port", type=_PORT, default=8050, help="port on 127.0.0.1 (default: %(default)s; 0: a free one)")
    db.set_defaults(func=cmd_dashboard)

    d = sub.add_parser("demo", help="the main job on the embedded stack: up, generate, ingest, wait, show KPIs")
    d.add_argument(
        "--orders", type=_COUNT, default=60_000, metavar="N", help="orders in the sample (default: %(default)s)"
    )
    d.add_argument("--port", type=_PORT, default=0, help="port of the embedded stack (default: 0, a free one)")
    d.add_argument("--keep", action="store_true", help="keep the stack running after the demo (Ctrl-C stops it)")
    d.set_defaults(func=cmd_demo)

    dp = sub.add_parser("deploy", help="build and push the image, then create or update the stack via a change set")
    dp.add_argument("--dry-run", action="store_true", help="show the plan (change set) and change nothing")
    dp.add_argument("--image-uri", metavar="URI", help="deploy this image; nothing is built (default: build one)")
    dp.add_argument(
        "--skip-image", action="store_true", help="build nothing: use --image-uri, or keep the stack's current image"
    )
    dp.add_argument(
        "--alert-email", metavar="ADDRESS", help="e-mail address subscribed to the alert topic (empty string: none)"
    )
    dp.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="another template parameter (repeatable)"
    )
    dp.set_defaults(func=cmd_deploy)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "command_parser"):  # the commands with --from/--to: a reversed range is an argument error too
        from orchestration.operations import check_range

        try:
            check_range(args.date_from, args.date_to)
        except ShopKpiError as e:
            args.command_parser.error(e.message)
    configure(args.log_level or "WARNING", sys.stderr)
    try:
        settings = Settings.load(stack=args.stack, buckets=getattr(args, "buckets", None))
        code: int = args.func(args, settings)
        return code
    except ShopKpiError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
