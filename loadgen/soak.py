"""Soak test of the pipeline (``./dev soak N``): N files land at once on the embedded stack, among them the same
object delivered twice, copies under another name and bad files; then every file must have ended archived or
rejected, the ledger must agree, and the KPIs must equal those of the same files processed in one process.

The oracle is :func:`processor.pipeline.process_local` over the distinct files (itself tested against the brute-force
reference in ``tests/reference.py``): what the soak proves is that the distributed path (events, batches, parallel
tasks, retries, the merge lock) changes nothing.

Prints one JSON report (files, seconds, outcomes, executions) and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadgen.generate import generate
from orchestration import operations
from orchestration.local.stack import EmbeddedStack
from processor.model import CategoryKpi, OrderKpi, to_json
from processor.pipeline import process_local
from processor.settings import Settings


@dataclass
class Delivery:
    """One upload: a file, what it is, and the outcome it must end with."""

    path: Path
    kind: str  # "file", "same object again", "copy under another name", "bad file"
    expected: str  # "accepted" or "rejected"


@dataclass
class SoakReport:
    files: int
    distinct_files: int
    seconds_landing: float = 0.0
    seconds_to_idle: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    executions: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def plan(n: int, folder: Path, seed: int) -> list[Delivery]:
    """About 80 % distinct good files, 10 % repeated deliveries, 10 % bad files (at least one of each)."""
    if n < 6:
        raise ValueError("a soak needs at least 6 files (3 good ones, a repeat, a copy and a bad file)")
    rng = random.Random(seed)
    bad = max(1, n // 10)
    repeats = max(2, n // 10)
    parts = max(1, (n - bad - repeats - 1) // 2)
    gen = generate(folder / "shop", orders=max(200, parts * 60), days=10, parts=parts, seed=seed, bad_rows=parts)
    good = [Delivery(p, "file", "accepted") for p in gen.paths]
    deliveries = list(good)
    for i in range(repeats):
        original = rng.choice(good).path
        if i % 2 == 0:
            deliveries.append(Delivery(original, "same object again", "accepted"))
        else:
            copy = folder / "copies" / f"{original.stem}_copy{i}{original.suffix}"
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(original.read_bytes())
            deliveries.append(Delivery(copy, "copy under another name", "accepted"))
    for i in range(n - len(deliveries)):
        deliveries.append(Delivery(_bad_file(folder / "bad", i), "bad file", "rejected"))
    rng.shuffle(deliveries)
    return deliveries


def _bad_file(folder: Path, i: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"orders_bad{i}.csv"
    kinds = [
        b"order_id,status,created_at,num_of_item\n1,complete,2025-03-01T00:00:00,1\n",  # user_id missing
        b"order_id,user_id,status,created_at,num_of_item\n",  # a header and no rows
        b"\x00\x01binary\xff\xfe garbage\n" * 20,  # not a CSV
    ]
    path.write_bytes(kinds[i % len(kinds)])
    return path


def run(n: int, *, seed: int = 1, timeout_s: float | None = None) -> SoakReport:
    with tempfile.TemporaryDirectory(prefix="shopkpi-soak-") as tmp:
        root = Path(tmp)
        deliveries = plan(n, root / "files", seed)
        distinct = sorted({d.path for d in deliveries})
        report = SoakReport(files=len(deliveries), distinct_files=len(distinct))
        settings = Settings.load(env={}, stack=f"soak{seed}", work_dir=root / "work")
        with EmbeddedStack(settings, task_env={"SHOPKPI_BUCKETS": "8"}) as stack:
            assert stack.clients is not None and stack.outputs is not None
            op = operations.Stack(stack.settings, stack.clients, stack.outputs)
            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=16) as pool:  # all at once, as many producers would
                landed = [x for one in pool.map(lambda d: operations.ingest(op, [d.path]), deliveries) for x in one]
            report.seconds_landing = round(time.monotonic() - started, 1)
            done = operations.wait(op, timeout_s or 120 + 3.0 * n, landed, settle_s=2.0)
            report.seconds_to_idle = round(time.monotonic() - started, 1)
            if not done:
                report.failures.append("the pipeline was not idle before the timeout")
            _check(op, deliveries, landed, report)
            stored = _public(operations.daily(op, None, None), operations.category(op, None, None, None))
        good = [p for p in distinct if next(d.expected for d in deliveries if d.path == p) == "accepted"]
        oracle = process_local(good, root / "oracle", settings)
        if stored != _public(oracle.daily, oracle.category):
            report.failures.append("the stored KPIs differ from the same files processed in one process")
        return report


def _public(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi]) -> dict[str, list[dict[str, Any]]]:
    return {"daily": [k.public() for k in daily], "category": [k.public() for k in category]}


def _check(
    op: operations.Stack, deliveries: list[Delivery], landed: list[operations.Landed], report: SoakReport
) -> None:
    """Every file ended archived or rejected, and the ledger agrees; no execution failed."""
    left = list(op.s3.list_keys("incoming/"))
    if left:
        report.failures.append(f"{len(left)} files left in incoming/: {left[:5]}")
    ended = {
        area: {
            k.rsplit("/", 1)[-1]
            for k in op.s3.list_keys(f"{area}/")
            if not k.endswith((".report.json", ".rejected_rows.csv"))
        }
        for area in ("archive", "rejected")
    }
    outcomes: Counter[str] = Counter()
    distinct = {x.file_id: (d, x) for d, x in zip(deliveries, landed, strict=True)}
    results = operations.outcomes(op, [x for _, x in distinct.values()])
    for (delivery, item), result in zip(distinct.values(), results, strict=True):
        outcome = "none" if result.record is None else result.outcome
        outcomes[outcome] += 1
        if outcome != delivery.expected:
            report.failures.append(f"{item.key} ({delivery.kind}): ledger says {outcome}, expected {delivery.expected}")
        area = "archive" if delivery.expected == "accepted" else "rejected"
        if delivery.path.name not in ended[area]:
            report.failures.append(f"{item.key} ({delivery.kind}) is not in {area}/")
    report.outcomes = dict(sorted(outcomes.items()))
    executions = op.workflow.executions(limit=1000)
    statuses = Counter(str(e["status"]) for e in executions)
    report.executions = dict(sorted(statuses.items()))
    for e in executions:
        if e["status"] != "SUCCEEDED":
            described = op.workflow.describe(e["executionArn"])
            report.failures.append(
                f"execution {e['name']} {e['status']}: {described.get('error')}: {str(described.get('cause'))[:500]}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=int, nargs="?", default=200, help="how many files land at once (default 200)")
    p.add_argument("--seed", type=int, default=1, help="data and arrival order (default 1)")
    p.add_argument("--timeout", type=float, help="seconds to wait for the pipeline (default 120 + 3 per file)")
    args = p.parse_args(argv)
    if args.files < 6:
        p.error(
            f"files: {args.files} is too few: a soak needs at least 6 (3 good ones, a repeat, a copy and a bad file)"
        )
    report = run(args.files, seed=args.seed, timeout_s=args.timeout)
    sys.stdout.buffer.write(to_json({**asdict(report), "ok": report.ok}, indent=2) + b"\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
