"""The steps of ``shopkpi demo`` that touch the stack, with no output of their own (the command, with its progress
and tables, is ``shopkpi/demo.py``): land files at random moments as producers would, measure the latency from
landing to KPIs visible, and check the stored KPIs against a one-process recomputation of the same files
(``shopkpi process``'s code).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestration import operations
from processor.model import CategoryKpi, OrderKpi
from processor.pipeline import process_local
from processor.settings import Settings


def land_at_random(
    op: operations.Stack,
    files: Sequence[Path],
    rng: random.Random,
    on_landed: Callable[[operations.Landed], None],
) -> tuple[list[operations.Landed], dict[str, float]]:
    """Upload the files one by one, in the order given, after a random pause of up to 1.5 s each, telling
    ``on_landed`` of each; return what landed and when (epoch seconds by file id)."""
    landed: list[operations.Landed] = []
    landed_at: dict[str, float] = {}
    for path in files:
        time.sleep(rng.uniform(0.0, 1.5))
        item = operations.ingest(op, [path])[0]
        landed.append(item)
        landed_at[item.file_id] = time.time()
        on_landed(item)
    return landed, landed_at


def recomputation_matches(
    op: operations.Stack, daily: list[OrderKpi], files: list[Path], work: Path, settings: Settings
) -> tuple[bool, list[CategoryKpi]]:
    """Recompute the KPIs of ``files`` in one process; whether the stored daily and category KPIs equal them
    exactly, and the stored category KPIs."""
    quiet = logging.getLogger("shopkpi")
    level, quiet.level = quiet.level, logging.ERROR  # the check re-validates the bad file: no need to log it again
    try:
        expected = process_local(files, work, settings)
    finally:
        quiet.setLevel(level)
    stored = operations.category(op, None, None, None)
    exact = daily == expected.daily and sorted(stored, key=lambda k: (k.order_date, k.category)) == expected.category
    return exact, stored


def latencies(
    op: operations.Stack, landed: list[operations.Landed], landed_at: dict[str, float], executions: list[dict[str, Any]]
) -> list[float]:
    """Seconds from each file landing to the end of the execution that merged it (its KPIs visible)."""
    stop = {e["name"]: e.get("stopDate") for e in executions}
    out = []
    for item in landed:
        record = op.ledger.get_file(item.file_id)
        end = stop.get(record.execution) if record is not None and record.execution else None
        if isinstance(end, datetime):
            out.append(max(0.0, end.timestamp() - landed_at[item.file_id]))
    return out or [0.0]
