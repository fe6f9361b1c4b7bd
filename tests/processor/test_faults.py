"""The bad-input corpus: every case of tests/cases/faults/cases.toml through the validation task's body.

Each case is validated by :func:`processor.pipeline.validate_file` (what the validation task runs for a local file)
and checked against its expected outcome: the report names the outcome and reason, and the rejected-rows file holds
the rejected lines with their reasons. Big files ("bombs") are generated into ``tmp_path`` at run time, never
committed, and validated in a child process whose peak resident memory must stay under 1 GiB.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from processor.ingest import open_local
from processor.pipeline import validate_stream
from processor.settings import Settings
from processor.stage import file_id_for

CASES = Path(__file__).parent.parent / "cases" / "faults"
MANIFEST: list[dict[str, Any]] = tomllib.loads((CASES / "cases.toml").read_text())["case"]
ROOT = Path(__file__).parent.parent.parent
GIB = 1 << 30

ORDERS = "order_id,user_id,status,created_at,returned_at,shipped_at,delivered_at,num_of_item\n"
PRODUCTS = "id,sku,cost,category,name,brand,retail_price,department\n"
ITEMS = "id,order_id,user_id,product_id,status,created_at,shipped_at,delivered_at,returned_at,sale_price\n"


def _order(i: int) -> str:
    return f"{i},{100 + i % 7},complete,2025-03-01T10:00:00,,,,1\n"


def _product_rows(size: int, line3: str) -> str:
    rows = [PRODUCTS, "1,SKU-1,1.00,TV,Acme TV,Acme,2.00,Electronics\n", line3]
    total, i = sum(map(len, rows)), 3
    while total < size:
        row = f"{i},SKU-{i},1.00,TV,Acme {i} TV,Acme,2.00,Electronics\n"
        rows.append(row)
        total += len(row)
        i += 1
    return "".join(rows)


# --- generators: each writes its file into a directory and returns its path ----------------------------------
def header_field_200k(d: Path) -> Path:
    p = d / "orders_header_field_200k.csv"
    p.write_text(ORDERS.rstrip("\n") + "," + "x" * 200_000 + "\n" + _order(1).rstrip("\n") + ",y\n")
    return p


def million_columns(d: Path) -> Path:
    p = d / "orders_million_columns.csv"
    with p.open("w") as f:
        f.write(ORDERS.rstrip("\n"))
        f.write("".join(f",c{i}" for i in range(1_000_000)))
        f.write("\n" + _order(1))
    return p


def stray_quote_2mb(d: Path) -> Path:
    p = d / "products_stray_quote_2mb.csv"
    p.write_text(_product_rows(2 << 20, '2,SKU-2,1.00,TV,Acme 55" TV,Acme,2.00,Electronics\n'))
    return p


def unclosed_quote_2mb(d: Path) -> Path:
    p = d / "products_unclosed_quote_2mb.csv"
    p.write_text(_product_rows(2 << 20, '2,SKU-2,1.00,TV,"Acme 55 TV,Acme,2.00,Electronics\n'))
    return p


def long_line_40mb(d: Path) -> Path:
    p = d / "orders_long_line.csv"
    with p.open("w") as f:
        f.write(ORDERS + "".join(_order(i) for i in range(1, 21)))
        for _ in range(40):
            f.write("x" * (1 << 20))
        f.write("\n" + "".join(_order(i) for i in range(21, 41)))
    return p


def repeated_row_gzip(d: Path) -> Path:
    p = d / "order_items_repeated_row.csv.gz"
    row = b"1,1,1,1,complete,2025-03-01T00:00:00,,,,1.00\n"
    piece = row * ((1 << 20) // len(row))
    with gzip.open(p, "wb", compresslevel=9) as f:
        f.write(ITEMS.encode())
        for _ in range(160):
            f.write(piece)
    return p


def non_utf8_name(d: Path) -> Path:
    p = d / os.fsdecode(b"orders_\xff.csv")
    p.write_text(ORDERS + "".join(_order(i) for i in range(1, 4)))
    return p


GENERATORS: dict[str, Callable[[Path], Path]] = {
    f.__name__: f
    for f in (
        header_field_200k,
        million_columns,
        stray_quote_2mb,
        unclosed_quote_2mb,
        long_line_40mb,
        repeated_row_gzip,
        non_utf8_name,
    )
}


# --- running a case ------------------------------------------------------------------------------------------
def summarize(path: Path, work: Path, lines: list[int], facts: bool = True) -> dict[str, Any]:
    """Validate one file as the validation task does; what the checks need, as plain JSON-able values.
    ``facts=False`` stages whole typed rows (as a part of a split file does), for the cases that count staged values."""
    settings = Settings.load(env={}, work_dir=work)
    source = str(path)
    file_id = file_id_for(source, "v1")
    with open_local(path) as stream:
        v = validate_stream(
            stream, source=source, file_id=file_id, arrival=datetime.now(UTC), settings=settings, work_dir=work / "w",
            facts=facts,
        )  # fmt: skip
    out: dict[str, Any] = {
        "file_id": file_id,
        "report": {k: v.report.get(k) for k in ("outcome", "reason", "message", "rows", "rejects_by_reason")},
        "rows_file": None,
    }
    if v.rejects_csv is not None and v.rejects_csv.exists():
        rows = pl.scan_csv(v.rejects_csv, infer_schema=False)
        by_reason = rows.group_by("_reason").len().collect()
        raw = pl.col("_raw") if "_raw" in rows.collect_schema().names() else pl.lit(None, pl.String)
        picked = rows.filter(pl.col("_line").cast(pl.Int64).is_in(lines)).select("_line", "_reason", raw).collect()
        out["rows_file"] = {
            "by_reason": {r: n for r, n in by_reason.iter_rows()},
            "lines": {str(int(ln)): [reason, raw] for ln, reason, raw in picked.iter_rows()},
        }
    if v.output is not None:
        staged = pl.read_parquet(v.output.segment)
        out["staged"] = {c: int(staged.get_column(c).is_not_null().sum()) for c in staged.columns}
    return out


def _in_child(path: Path, work: Path, lines: list[int]) -> dict[str, Any]:
    """``summarize`` in a fresh interpreter, plus that process's peak resident memory."""
    code = (
        "import json, resource, sys\n"
        "from pathlib import Path\n"
        "from tests.processor.test_faults import summarize\n"
        "out = summarize(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))\n"
        "out['maxrss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), str(work), json.dumps(lines)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _cases(bombs: bool) -> list[Any]:
    return [pytest.param(c, id=c["file"]) for c in MANIFEST if bool(c.get("bomb")) is bombs]


def check(case: dict[str, Any], out: dict[str, Any]) -> None:
    report = out["report"]
    assert report["outcome"] == case["outcome"], report
    assert report["reason"] == case.get("reason"), report
    if "message" in case:
        assert case["message"] in report["message"]
    if "rows" in case:
        assert report["rows"] == case["rows"]
    expected = case.get("rejects", {})
    assert report["rejects_by_reason"] == expected
    rows_file = out["rows_file"]
    if expected or "rows" in case:
        assert rows_file is not None, "rows were read: the rejected-rows file must exist"
        assert rows_file["by_reason"] == expected, "every rejected row is in the file, with its reason"
    for line, reason in case.get("lines", {}).items():
        assert rows_file["lines"][str(line)][0] == reason, f"line {line}"
    for line, start in case.get("raw", {}).items():
        assert rows_file["lines"][str(line)][1].startswith(start), f"raw text of line {line}"
    for column, count in case.get("staged", {}).items():
        assert out["staged"][column] == count


def _materialize(case: dict[str, Any], tmp_path: Path) -> Path:
    if "generate" in case:
        return GENERATORS[case["generate"]](tmp_path)
    return CASES / str(case["file"])


def _lines(case: dict[str, Any]) -> list[int]:
    return sorted({int(x) for x in (*case.get("lines", {}), *case.get("raw", {}))})


@pytest.mark.parametrize("case", _cases(bombs=False))
def test_bad_file_gets_its_expected_outcome_and_rejected_rows(case: dict[str, Any], tmp_path: Path) -> None:
    path = _materialize(case, tmp_path)
    check(case, summarize(path, tmp_path / "work", _lines(case), facts="staged" not in case))


@pytest.mark.parametrize("case", _cases(bombs=True))
def test_bomb_gets_its_expected_outcome_in_bounded_memory(case: dict[str, Any], tmp_path: Path) -> None:
    path = _materialize(case, tmp_path)
    out = _in_child(path, tmp_path / "work", _lines(case))
    check(case, out)
    assert out["maxrss"] < GIB, f"peak resident memory {out['maxrss'] >> 20} MiB"


def test_manifest_covers_at_least_25_kinds_and_every_committed_file() -> None:
    committed = {p.name for p in CASES.iterdir() if p.name != "cases.toml"}
    listed = {c["file"] for c in MANIFEST if "generate" not in c}
    assert committed == listed
    assert len(MANIFEST) >= 25
    assert all(c["generate"] in GENERATORS for c in MANIFEST if "generate" in c)


def test_peak_memory_of_a_child_process_is_measured() -> None:
    """The memory check can fail: a child that allocates 300 MiB reports at least that much."""
    code = "import resource; b = bytearray(300 << 20); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout) * 1024 >= 300 << 20
