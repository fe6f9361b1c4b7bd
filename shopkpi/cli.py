"""The ``shopkpi`` console script (SPEC section 5). Thin: each command parses its arguments and calls one function.

Logs go to stderr as JSON lines so that stdout holds only the command's answer (a table, or JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from processor.errors import ShopKpiError
from processor.log import configure
from processor.model import CategoryKpi, OrderKpi, to_json
from processor.settings import Settings

if TYPE_CHECKING:
    from orchestration.deploy import Plan


def kpis_json(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi]) -> bytes:
    return to_json({"daily": [k.public() for k in daily], "category": [k.public() for k in category]}, indent=2)


def cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    from processor.pipeline import process_local
    from shopkpi.render import print_files, print_kpis

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
    if args.kind == "daily":
        daily = operations.daily(stack, args.date_from, args.date_to)
        _print_json([k.public() for k in daily]) if args.json else print_daily(daily)
    else:
        category = operations.category(stack, args.category, args.date_from, args.date_to)
        _print_json([k.public() for k in category]) if args.json else print_category(category)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shopkpi", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--stack", help="deployed stack name (SHOPKPI_STACK, default shopkpi)")
    p.add_argument("--log-level", help="JSON log level on stderr (SHOPKPI_LOG_LEVEL, default WARNING here)")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("process", help="validate and transform local files with no AWS; print the KPIs")
    pr.add_argument("paths", nargs="+", help="files or directories, in arrival order")
    pr.add_argument("--staging", help="keep the staged data in this directory (reused across runs)")
    pr.add_argument("--json", action="store_true", help='print {"daily": [...], "category": [...]}')
    pr.add_argument("--buckets", type=int, help="staging buckets (SHOPKPI_BUCKETS)")
    pr.set_defaults(func=cmd_process)

    local = sub.add_parser("local", help="the embedded AWS stack (moto server) on this machine")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    up = local_sub.add_parser("up", help="start moto on 127.0.0.1, deploy the stack, run trigger and tasks")
    up.add_argument("--port", type=int, default=4566)
    up.set_defaults(func=cmd_local_up)

    ing = sub.add_parser("ingest", help="upload files or directories to incoming/ as a producer would")
    ing.add_argument("paths", nargs="+")
    ing.add_argument("--wait", action="store_true", help="block until processed; print each file's outcome")
    ing.add_argument("--timeout", type=float, default=900)
    ing.set_defaults(func=cmd_ingest)

    w = sub.add_parser("wait", help="block until no event is queued and no execution runs")
    w.add_argument("--timeout", type=float, default=900)
    w.set_defaults(func=cmd_wait)

    k = sub.add_parser("kpis", help="read KPIs from DynamoDB")
    k_sub = k.add_subparsers(dest="kind", required=True)
    for kind in ("daily", "category"):
        kp = k_sub.add_parser(kind, help=f"{'order' if kind == 'daily' else 'category'}-level KPIs")
        if kind == "category":
            kp.add_argument("--category")
        kp.add_argument("--from", dest="date_from")
        kp.add_argument("--to", dest="date_to")
        kp.add_argument("--json", action="store_true", help="a JSON array with the brief's field names")
        kp.set_defaults(func=cmd_kpis)

    rp = sub.add_parser("reprocess", help="recompute the KPIs of a date range through the same workflow")
    rp.add_argument("--from", dest="date_from", required=True)
    rp.add_argument("--to", dest="date_to", required=True)
    rp.add_argument("--wait", action="store_true")
    rp.add_argument("--timeout", type=float, default=900)
    rp.set_defaults(func=cmd_reprocess)

    for name, func, what in (
        ("runs", cmd_runs, "recent executions and file outcomes"),
        ("rejects", cmd_rejects, "rejected files and their rows by reason"),
    ):
        r = sub.add_parser(name, help=what)
        r.add_argument("--limit", type=int, default=20)
        r.add_argument("--json", action="store_true")
        r.set_defaults(func=func)

    db = sub.add_parser("dashboard", help="serve the KPI dashboard (read-only, from DynamoDB)")
    db.add_argument("--port", type=int, default=8050)
    db.set_defaults(func=cmd_dashboard)

    d = sub.add_parser("demo", help="the main job on the embedded stack: up, generate, ingest, wait, show KPIs")
    d.add_argument("--orders", type=int, default=60_000, help="orders in the generated sample")
    d.add_argument("--port", type=int, default=0, help="moto port (0: a free one)")
    d.add_argument("--keep", action="store_true", help="keep the stack running after the demo")
    d.set_defaults(func=cmd_demo)

    dp = sub.add_parser("deploy", help="build and push the image, then create or update the stack via a change set")
    dp.add_argument("--dry-run", action="store_true", help="show the plan (change set) and change nothing")
    dp.add_argument("--image-uri", help="deploy this image; nothing is built")
    dp.add_argument(
        "--skip-image", action="store_true", help="build nothing: use --image-uri, or keep the stack's current image"
    )
    dp.add_argument("--alert-email", help="e-mail address subscribed to the alert topic (empty string: none)")
    dp.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="another template parameter (repeatable)"
    )
    dp.set_defaults(func=cmd_deploy)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.load(stack=args.stack, buckets=getattr(args, "buckets", None))
    configure(args.log_level or "WARNING", sys.stderr)
    try:
        code: int = args.func(args, settings)
        return code
    except ShopKpiError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
