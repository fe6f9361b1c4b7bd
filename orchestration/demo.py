"""``shopkpi demo``: the main job on the embedded default, from nothing to KPIs in DynamoDB.

Brings the embedded stack up, generates a realistic shop (many files over many days, a few bad rows, one bad file),
lands the files in S3 in random order at random moments as producers would, waits for the event-driven pipeline to
process them, prints the KPIs read back from DynamoDB and a run summary: outcomes, executions, and the latency from
a file landing to its KPIs being visible. Finally it recomputes the KPIs of the same files in one process
(``shopkpi process``'s code) and checks that DynamoDB holds exactly those.
"""

from __future__ import annotations

import logging
import random
import statistics
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from loadgen.generate import generate
from orchestration import operations
from orchestration.local.stack import EmbeddedStack
from processor.pipeline import process_local
from processor.settings import Settings
from shopkpi.render import print_category, print_daily, print_outcomes

console = Console(stderr=False)


def run_demo(settings: Settings, *, orders: int = 60_000, port: int = 0, keep: bool = False, seed: int = 7) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shopkpi-demo-") as tmp:
        root = Path(tmp)
        local = Settings.load(env={}, stack=settings.stack, work_dir=root / "work")
        with console.status("starting the embedded AWS stack (moto) and deploying infra/template.yaml ..."):
            stack = EmbeddedStack(local, port=port, work_dir=root / "local").start()
        try:
            return _demo(stack, root, orders, seed, started, keep)
        finally:
            if keep:
                console.print(f"stack left running at {stack.endpoint}; Ctrl-C to stop")
                try:
                    while True:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
            stack.stop()


def _demo(stack: EmbeddedStack, root: Path, orders: int, seed: int, started: float, keep: bool) -> int:
    assert stack.outputs
    console.print(f"[bold]embedded stack up[/] at {stack.endpoint} ({time.monotonic() - started:.1f} s)")
    data = root / "data"
    with console.status(f"generating a shop of {orders:,} orders over 30 days ..."):
        gen = generate(data, orders=orders, days=30, parts=6, seed=seed, bad_rows=12, bad_file=True)
    files = list(gen.paths)
    rows = sum(gen.rows.values())
    console.print(
        f"generated {len(files)} files, {rows:,} rows, {gen.csv_bytes / 1e6:.1f} MB, "
        f"{len(gen.bad_rows)} bad rows and 1 bad file"
    )

    op = operations.Stack(stack.settings, stack.clients, stack.outputs)  # type: ignore[arg-type]
    rng = random.Random(seed)
    rng.shuffle(files)  # any arrival order: items before their orders and products, parts out of order
    landed: list[operations.Landed] = []
    landed_at: dict[str, float] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("landing files in s3://.../incoming/ at random moments", total=len(files))
        for path in files:
            time.sleep(rng.uniform(0.0, 1.5))
            item = operations.ingest(op, [path])[0]
            landed.append(item)
            landed_at[item.file_id] = time.time()
            progress.advance(task)
        wait = progress.add_task(
            "waiting for the pipeline (trigger -> Step Functions -> ECS tasks -> DynamoDB)", total=len(files)
        )
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                progress.update(wait, completed=sum(op.ledger.get_file(f.file_id) is not None for f in landed))
                time.sleep(1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        finished = operations.wait(op, timeout_s=600, files=landed)
        done.set()
        watcher.join()
        progress.update(wait, completed=len(files))
    if not finished:
        console.print("[red]the pipeline did not finish within 10 minutes[/]")
        return 4

    results = operations.outcomes(op, landed)
    print_outcomes(results)
    daily = operations.daily(op, None, None)
    print_daily(daily)
    category = operations.category(op, None, daily[0].order_date, daily[0].order_date) if daily else []
    console.print(
        f"(category KPIs of {daily[0].order_date if daily else '-'} shown; "
        "`shopkpi kpis category --from D --to D` for any range)"
    )
    print_category(category)

    executions = op.workflow.executions(limit=100)
    latency = _latencies(op, landed, landed_at, executions)
    quiet = logging.getLogger("shopkpi")
    level, quiet.level = quiet.level, logging.ERROR  # the check re-validates the bad file: no need to log it again
    try:
        expected = process_local([data / Path(f.key).name for f in landed], root / "check", stack.settings)
    finally:
        quiet.setLevel(level)
    stored_all = operations.category(op, None, None, None)
    exact = (
        daily == expected.daily and sorted(stored_all, key=lambda k: (k.order_date, k.category)) == expected.category
    )
    by_status: dict[str, int] = {}
    for e in executions:
        by_status[e["status"]] = by_status.get(e["status"], 0) + 1
    accepted = sum(r.get("outcome") == "accepted" for r in results)
    console.print(
        f"\n[bold]run summary[/]: {len(files)} files ({accepted} accepted, {len(files) - accepted} rejected), "
        f"{len(executions)} executions {by_status}, {len(daily)} days and {len(stored_all)} category-days in "
        f"DynamoDB.\nlatency from landing to KPIs visible: p50 {statistics.median(latency):.1f} s, "
        f"max {max(latency):.1f} s. wall time {time.monotonic() - started:.1f} s.\n"
        f"DynamoDB equals a one-process recomputation of the same files: "
        f"{'[green]yes, exactly[/]' if exact else '[red]NO[/]'}"
    )
    if keep:
        console.print(
            f"export AWS_ENDPOINT_URL={stack.endpoint} AWS_ACCESS_KEY_ID=testing "
            "AWS_SECRET_ACCESS_KEY=testing  # then: shopkpi kpis daily, shopkpi runs, shopkpi rejects"
        )
    return 0 if exact else 1


def _latencies(
    op: operations.Stack, landed: list[operations.Landed], landed_at: dict[str, float], executions: list[dict[str, Any]]
) -> list[float]:
    """Seconds from each file landing to the end of the execution that merged it (its KPIs visible)."""
    stop = {e["name"]: e.get("stopDate") for e in executions}
    out = []
    for item in landed:
        record = op.ledger.get_file(item.file_id) or {}
        end = stop.get(str(record.get("execution", "")))
        if isinstance(end, datetime):
            out.append(max(0.0, end.timestamp() - landed_at[item.file_id]))
    return out or [0.0]
