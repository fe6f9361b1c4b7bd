"""The ``shopkpi`` console script (SPEC section 5). Thin: each command parses its arguments and calls one function.

Logs go to stderr as JSON lines so that stdout holds only the command's answer (a table, or JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import orjson

from processor.errors import ShopKpiError
from processor.log import configure
from processor.model import CategoryKpi, OrderKpi
from processor.settings import Settings


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        # Exact for 2-decimal amounts: the shortest float repr of such a value is its decimal text.
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def kpis_json(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi]) -> bytes:
    return orjson.dumps(
        {"daily": [k.public() for k in daily], "category": [k.public() for k in category]},
        default=_json_default,
        option=orjson.OPT_INDENT_2,
    )


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
