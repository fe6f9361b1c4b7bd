"""Benchmark: what one late delivery costs the merge, against the size of the history already staged.

    python -m perf.incremental --sizes 0 0.5 2          (just bench-incremental)

For each history size (GB of generated CSV; 0 means products only), it stages and merges the history once (kept
under ``data/bench/history-<size>gb`` for the next run), then, in a fresh process on a hard-linked copy of that
staging area, stages and merges one *delivery*: 2,000 new orders with about 4,000 items, spread over all the dates
of the history, like a late file. It reports the merge's own seconds (from its result) and the process's peak RSS,
and the same figures as ratios to the smallest history, since the machine is shared and noisy.

A second delivery, ``--revisions``, re-sends 2,000 *existing* orders picked at random over the whole history with a
new status (and one item each with a new price): keys spread over the entire key space, the case that no key order
helps.

A benchmark, not a test: it asserts nothing about time. ``--out FILE`` keeps the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from loadgen.generate import generate
from perf.compare import ensure_data

console = Console()
ORDERS = 2_000
ID_OFFSET = 10**12  # new orders and items get ids beyond any history's


def history(size_gb: float, root: Path) -> Path:
    """A staging area holding a merged history of about ``size_gb`` GB of CSV (made once, then reused)."""
    staging = root / "bench" / f"history-{size_gb:g}gb"
    if (staging / "state" / "head.json").exists():
        return staging
    shutil.rmtree(staging, ignore_errors=True)
    if size_gb > 0:
        source = ensure_data(size_gb, root)
    else:
        source = root / "bench" / "products-only"
        generate(source, orders=1, days=1, seed=1)
        for f in source.glob("order*.csv"):
            f.unlink()
    console.print(f"staging and merging the {size_gb:g} GB history into {staging} ...")
    subprocess.run(
        [sys.executable, "-m", "shopkpi.cli", "process", str(source), "--staging", str(staging), "--json"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return staging


def delivery(root: Path, *, revisions: bool) -> Path:
    """The late delivery: new orders (or revisions of existing ones) spread over the 30 days of the histories."""
    folder = root / "bench" / ("revisions" if revisions else "late-orders")
    if not (folder / "orders_late.csv").exists():
        write_delivery(folder, revisions=revisions)
    return folder


def write_delivery(folder: Path, *, revisions: bool = False) -> list[Path]:
    """Write the delivery's ``orders_late.csv`` and ``order_items_late.csv`` into ``folder``."""
    raw = folder.parent / f"{folder.name}-raw"
    shutil.rmtree(raw, ignore_errors=True)
    generate(raw, orders=ORDERS, days=30, seed=11)
    orders = pl.read_csv(raw / "orders_part1.csv", infer_schema=False)
    items = pl.read_csv(raw / "order_items_part1.csv", infer_schema=False)
    if revisions:
        # Existing orders of the 2 GB history (ids 1..~7.9M), picked at random, re-sent with a new status, and
        # one existing item each at a new price: every key is old, and they are spread over the whole key space.
        picked = pl.Series("order_id", [str(x) for x in range(1, 7_800_000, 7_800_000 // ORDERS)][:ORDERS])
        orders = orders.with_columns(picked.alias("order_id"), pl.lit("returned").alias("status"))
        items = items.unique(subset="order_id", keep="first").head(ORDERS)
        items = items.with_columns(
            pl.Series("id", [str(int(x) * 2) for x in picked[: items.height]]),
            picked[: items.height].alias("order_id"),
            pl.lit("1.00").alias("sale_price"),
        )
    else:
        for frame_id in ("order_id",):
            orders = orders.with_columns((pl.col(frame_id).cast(pl.Int64) + ID_OFFSET).cast(pl.String))
        items = items.with_columns(
            (pl.col("id").cast(pl.Int64) + ID_OFFSET).cast(pl.String),
            (pl.col("order_id").cast(pl.Int64) + ID_OFFSET).cast(pl.String),
        )
    folder.mkdir(parents=True, exist_ok=True)
    orders.write_csv(folder / "orders_late.csv")
    items.write_csv(folder / "order_items_late.csv")
    shutil.rmtree(raw, ignore_errors=True)
    return [folder / "orders_late.csv", folder / "order_items_late.csv"]


MERGE_ONE = """
import json, sys
from pathlib import Path
from processor.pipeline import process_local
from processor.settings import Settings
run = process_local([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]), Settings.load())
m = run.merge
print(json.dumps({"merge_seconds": m.seconds, "groups": m.groups_recomputed, "dates": len(m.dates),
                  "state_rows": m.state_rows}))
"""


def run_child(argv: list[str]) -> tuple[bytes, int]:
    """Run ``argv``; its stdout and its own peak RSS in MiB (os.wait4 reports the child's own maximum)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:3]} failed with status {status}")
    return out, round(usage.ru_maxrss / 1024)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="perf.incremental", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sizes", type=float, nargs="+", default=[0, 0.5, 2], help="history sizes in GB (0: products)")
    p.add_argument("--data-root", type=Path, default=Path("data"))
    p.add_argument("--rounds", type=int, default=3, help="merges per size; the median is reported")
    p.add_argument("--revisions", action="store_true", help="deliver revisions of random existing orders instead")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)

    files = sorted(delivery(args.data_root, revisions=args.revisions).glob("*.csv"))
    results: dict[str, Any] = {"delivery": [str(f) for f in files], "sizes": {}}
    for size in args.sizes:
        staging = history(size, args.data_root)
        rounds = []
        for _ in range(args.rounds):
            scratch = args.data_root / "bench" / "scratch"
            shutil.rmtree(scratch, ignore_errors=True)
            subprocess.run(["cp", "-al", str(staging), str(scratch)], check=True)
            out, rss = run_child([sys.executable, "-c", MERGE_ONE, str(scratch), *map(str, files)])
            shutil.rmtree(scratch, ignore_errors=True)
            rounds.append({**json.loads(out), "peak_rss_mib": rss})
        rounds.sort(key=lambda r: r["merge_seconds"])
        results["sizes"][f"{size:g}"] = {
            **rounds[len(rounds) // 2],
            "all_seconds": [r["merge_seconds"] for r in rounds],
        }

    base = results["sizes"][f"{args.sizes[0]:g}"]["merge_seconds"]
    t = Table(title=f"merge of one delivery ({'revisions' if args.revisions else 'late orders'}) vs history size")
    for col in ("history GB", "items staged", "merge s (median)", "x smallest", "orders recomputed", "peak RSS MiB"):
        t.add_column(col, justify="right")
    for size, r in results["sizes"].items():
        t.add_row(
            size,
            f"{r['state_rows'].get('order_items', 0):,}",
            f"{r['merge_seconds']:.3f}",
            f"{r['merge_seconds'] / base:.2f}" if base else "-",
            f"{r['groups']:,}",
            str(r["peak_rss_mib"]),
        )
    console.print(t)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
