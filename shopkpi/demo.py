"""``shopkpi demo``: the main job on the embedded default, from nothing to KPIs in DynamoDB.

Brings the embedded stack up, generates a realistic shop (many files over many days, a few bad rows, one bad file),
lands the files in S3 in random order at random moments as producers would, waits for the event-driven pipeline to
process them, prints the KPIs read back from DynamoDB and a run summary: outcomes, executions, and the latency from
a file landing to its KPIs being visible. Finally it recomputes the KPIs of the same files in one process
(``shopkpi process``'s code) and checks that DynamoDB holds exactly those. The steps that touch the stack are in
``orchestration/demo.py``; this module shows them.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console

from loadgen.generate import generate
from orchestration import demo, operations
from orchestration.local.stack import EmbeddedStack
from processor.model import OrderKpi
from processor.settings import Settings
from shopkpi.cli import ExitCode
from shopkpi.render import WaitProgress, print_category, print_daily, print_outcomes

console = Console(stderr=False)
#: Spinners and progress go to stderr: stdout holds the demo's answer (tables and the run summary).
stderr = Console(stderr=True)


def run_demo(settings: Settings, *, orders: int = 60_000, port: int = 0, keep: bool = False, seed: int = 7) -> ExitCode:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shopkpi-demo-") as tmp:
        root = Path(tmp)
        local = Settings.load(env={}, stack=settings.stack, work_dir=root / "work")
        with stderr.status("starting the embedded AWS stack (moto) and deploying infra/template.yaml ..."):
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


def _demo(stack: EmbeddedStack, root: Path, orders: int, seed: int, started: float, keep: bool) -> ExitCode:
    """Generate, land and wait; then show the KPIs and the run summary."""
    assert stack.outputs
    console.print(f"[bold]embedded stack up[/] at {stack.endpoint} ({time.monotonic() - started:.1f} s)")
    data = root / "data"
    files = _generate(data, orders, seed)
    op = operations.Stack(stack.settings, stack.clients, stack.outputs)  # type: ignore[arg-type]
    rng = random.Random(seed)
    rng.shuffle(files)  # any arrival order: items before their orders and products, parts out of order
    finished, landed, landed_at = _land_and_wait(op, files, rng)
    if not finished:
        console.print("[red]the pipeline did not finish within 10 minutes[/]")
        return ExitCode.TIMED_OUT
    results = operations.outcomes(op, landed)
    print_outcomes(results)
    daily = _show_kpis(op)
    sources = [data / Path(f.key).name for f in landed]
    exact, stored = demo.recomputation_matches(op, daily, sources, root / "check", stack.settings)
    executions = op.workflow.executions(limit=100)
    latency = demo.latencies(op, landed, landed_at, executions)
    accepted = sum(r.outcome == "accepted" for r in results)
    by_status = dict(Counter(str(e["status"]) for e in executions))
    console.print(
        f"\n[bold]run summary[/]: {len(files)} files ({accepted} accepted, {len(files) - accepted} rejected), "
        f"{len(executions)} executions {by_status}, {len(daily)} days and {len(stored)} category-days in "
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
    return ExitCode.OK if exact else ExitCode.NOT_EXACT


def _generate(data: Path, orders: int, seed: int) -> list[Path]:
    """A shop of ``orders`` orders over 30 days, in parts, with a few bad rows and one bad file."""
    with stderr.status(f"generating a shop of {orders:,} orders over 30 days ..."):
        gen = generate(data, orders=orders, days=30, parts=6, seed=seed, bad_rows=12, bad_file=True)
    console.print(
        f"generated {len(gen.paths)} files, {sum(gen.rows.values()):,} rows, {gen.csv_bytes / 1e6:.1f} MB, "
        f"{len(gen.bad_rows)} bad rows and 1 bad file"
    )
    return list(gen.paths)


def _show_kpis(op: operations.Stack) -> list[OrderKpi]:
    """Print the daily KPIs and the first day's category KPIs; the daily KPIs."""
    daily = operations.daily(op, None, None)
    print_daily(daily)
    first = daily[0].order_date if daily else None
    print_category(operations.category(op, None, first, first) if first else [])
    console.print(f"(category KPIs of {first or '-'} shown; `shopkpi kpis category --from D --to D` for any range)")
    return daily


def _land_and_wait(
    op: operations.Stack, files: list[Path], rng: random.Random
) -> tuple[bool, list[operations.Landed], dict[str, float]]:
    """Land the files at random moments and wait for the pipeline (at most 10 minutes), with progress on stderr:
    files landed, validated and merged, while they land and after."""
    watch = operations.Watch(op, expected=len(files))
    with WaitProgress("demo: trigger -> Step Functions -> ECS tasks -> DynamoDB") as progress:

        def landed(item: operations.Landed) -> None:
            watch.add(item)
            progress(watch.poll())

        items, landed_at = demo.land_at_random(op, files, rng, landed)
        finished = watch.until_idle(600, on_status=progress)
    return finished, items, landed_at
