"""One file validated whole and in N parts, in one process, with the time of each step (docs/workflow.md).

``python -m perf.split FILE [--parts N]`` runs ``shopkpi-task validate`` on FILE, then the same file as the workflow
runs a big one (``validate`` answering ``split``, ``validate-part`` for each part one after the other, ``combine``),
each into a staging directory of its own under a temporary folder, and prints one JSON line: the seconds of each
step and whether the two results agree (outcome, rows, valid rows, rejects by reason). A benchmark, not a test: run
it on a quiet machine and compare the steps of one run with each other.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from processor.tasks import main as task

SAME = ("outcome", "rows", "valid_rows", "rejects_by_reason")


def run(*argv: str) -> tuple[dict[str, Any], float]:
    """The task's result line, and its seconds."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw)
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = task(list(argv))
        out.flush()
    seconds = time.perf_counter() - started
    lines = [json.loads(x) for x in raw.getvalue().decode().splitlines() if x.startswith("{")]
    result: dict[str, Any] = next(x for x in reversed(lines) if x.get("event") == "task.result")
    if code != 0:
        raise SystemExit(f"{argv[0]} failed: {result}")
    return result, seconds


def measure(path: Path, parts: int, root: Path) -> dict[str, Any]:
    os.environ.setdefault("SHOPKPI_LOG_LEVEL", "WARNING")
    whole, whole_s = run("validate", str(path), "--staging", str(root / "whole"))
    size_mb = path.stat().st_size / (1 << 20)
    os.environ["SHOPKPI_SPLIT_MB"] = str(size_mb / 2)
    os.environ["SHOPKPI_PART_MB"] = str(size_mb / parts)
    staging = str(root / "parts")
    planned, plan_s = run("validate", str(path), "--staging", staging)
    plan = planned["split"]
    part_s = []
    for part in plan["parts"]:
        job = {k: plan[k] for k in ("file_id", "source", "arrival", "header_end")} | {"part": part}
        part_s.append(round(run("validate-part", json.dumps(job), "--staging", staging)[1], 2))
    done, combine_s = run("combine", json.dumps(plan), "--staging", staging)
    return {
        "size_mb": round(size_mb),
        "rows": done["rows"],
        "whole_s": round(whole_s, 2),
        "plan_s": round(plan_s, 3),
        "parts_s": part_s,
        "combine_s": round(combine_s, 2),
        "same": {k: whole.get(k) for k in SAME} == {k: done.get(k) for k in SAME},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.split", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a CSV file (orders or order items)")
    parser.add_argument("--parts", type=int, default=4, help="parts to cut it into (default 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="perf-split-") as tmp:
        os.environ["SHOPKPI_WORK_DIR"] = str(Path(tmp) / "work")
        print(json.dumps(measure(args.file, args.parts, Path(tmp))))


if __name__ == "__main__":
    main()
