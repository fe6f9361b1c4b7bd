"""A big file validated in parts (processor.split, processor.combine) ends exactly as the same file read whole:
same outcome, counts, staged rows and rejected rows, every line number the file's own."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor import kpis as K
from processor import split
from processor.ingest import FACTS
from processor.schema import DATASETS
from processor.stage import Segment, scan_segment
from processor.store import LocalStore
from processor.tasks import main

HEADER = "order_id,user_id,status,created_at,num_of_item\n"


@pytest.fixture(autouse=True)
def small_record_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cut needs a quote-free window of the record limit before it: a small limit lets a small file be cut.
    monkeypatch.setenv("SHOPKPI_MAX_RECORD_KB", "4")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(list(argv)) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    result: dict[str, Any] = next(x for x in reversed(lines) if x.get("event") == "task.result")
    return result


def validate_whole(capsys: pytest.CaptureFixture[str], path: Path, staging: Path) -> dict[str, Any]:
    return run(capsys, "validate", str(path), "--staging", str(staging))


def validate_in_parts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, path: Path, staging: Path, parts: int
) -> tuple[dict[str, Any], int]:
    """What the workflow does for a big file: validate (answers split), each part, then combine."""
    size_mb = path.stat().st_size / (1 << 20)
    monkeypatch.setenv("SHOPKPI_SPLIT_MB", str(size_mb / 2))
    monkeypatch.setenv("SHOPKPI_PART_MB", str(size_mb / parts))
    monkeypatch.setenv("SHOPKPI_MAX_PARTS", str(parts))
    planned = run(capsys, "validate", str(path), "--staging", str(staging))
    assert planned["outcome"] == "split", planned
    plan = planned["split"]
    for part in plan["parts"]:
        job = {k: plan[k] for k in ("file_id", "source", "arrival", "header_end")} | {"part": part}
        run(capsys, "validate-part", json.dumps(job), "--staging", str(staging))
    for name in ("SHOPKPI_SPLIT_MB", "SHOPKPI_PART_MB", "SHOPKPI_MAX_PARTS"):
        monkeypatch.delenv(name)
    return run(capsys, "combine", json.dumps(plan), "--staging", str(staging)), len(plan["parts"])


def rejected_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    frame = pl.read_csv(result["rejects"], infer_schema=False)
    return sorted(frame.to_dicts(), key=lambda r: (int(r["_line"]), r["_reason"]))


def staged_rows(staging: Path, result: dict[str, Any]) -> list[dict[str, Any]]:
    if result["outcome"] != "accepted":
        return []
    segment = msgspec.convert(result["segment"], type=Segment)
    staged = scan_segment(LocalStore(staging), segment)
    if segment.dataset in FACTS:  # what the merge reads of them: a whole file stages facts, its parts whole rows
        names = DATASETS[segment.dataset].names
        staged = staged.select(*K.staged_facts(staged, FACTS[segment.dataset](names)), "_line", "_b")
    return staged.collect().sort("_line").to_dicts()


SAME = ("outcome", "reason", "message", "rows", "valid_rows", "rejected_rows", "rejects_by_reason", "dataset")


def assert_same(whole: dict[str, Any], parted: dict[str, Any], whole_staging: Path, parted_staging: Path) -> None:
    assert {k: parted.get(k) for k in SAME} == {k: whole.get(k) for k in SAME}
    assert rejected_rows(parted) == rejected_rows(whole)
    assert staged_rows(parted_staging, parted) == staged_rows(whole_staging, whole)
    if whole["outcome"] == "accepted":
        # a local file's arrival is the moment it was validated: everything else of the commit record is the same
        # (and the rows of a file validated in parts stay where its parts staged them: pieces of the segment)
        same = {"arrival_us": 0, "pieces": []}
        assert parted["segment"] | same == whole["segment"] | same


def messy_orders(rows: int, seed: int, quote_every: int = 5_000) -> bytes:
    """Orders with every kind of trouble spread through the file: keys repeated near and far, bad values, blank
    lines, rows with a field too many or too few, bytes that are not UTF-8, and (every ``quote_every`` rows, so
    that quote-free stretches remain to cut in) quoted fields."""
    rnd = random.Random(seed)
    out = [HEADER.encode()]
    for i in range(rows):
        key = rnd.randrange(rows * 2) if rnd.random() < 0.03 else i  # a repeat of an earlier or later key
        line = f"{key},{i % 97},complete,2025-03-{1 + i % 28:02d}T10:00:00,{1 + i % 3}"
        trouble = rnd.random()
        if trouble < 0.01:
            line = line.replace("complete", "lost")
        elif trouble < 0.015:
            line += ",extra"
        elif trouble < 0.02:
            line = line.rsplit(",", 1)[0]
        elif trouble < 0.025:
            out.append(b"\n")
        elif i % quote_every == 17:
            line = line.replace("complete", '"complete"')
        elif trouble < 0.03:
            out.append(b"\n")
        data = line.encode()
        if 0.03 <= trouble < 0.033:
            data = data.replace(b"complete", b"compl\xe9te")
        out.append(data + b"\n")
    return b"".join(out)


@pytest.mark.parametrize("parts", [2, 5])
def test_a_file_validated_in_parts_ends_exactly_as_read_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, parts: int
) -> None:
    monkeypatch.setenv("SHOPKPI_MAX_INVALID_SHARE", "0.5")
    path = tmp_path / "orders.csv"
    path.write_bytes(messy_orders(40_000, seed=parts))
    whole = validate_whole(capsys, path, tmp_path / "whole")
    parted, made = validate_in_parts(capsys, monkeypatch, path, tmp_path / "parts", parts)
    assert made == parts
    assert whole["outcome"] == "accepted" and whole["rejects_by_reason"]["duplicate_key"] > 10
    assert_same(whole, parted, tmp_path / "whole", tmp_path / "parts")
    assert not list((tmp_path / "parts").glob("parts/**/*.*"))  # the parts' leftovers are gone
    # Then committed and merged: the pieces, read in place without the rows repeated across parts, give the
    # KPIs of the file read whole, and the merge deletes them as it deletes a whole segment.
    kpis = {}
    for name, result in (("whole", whole), ("parts", parted)):
        run(capsys, "transform", result["file_id"], "--staging", str(tmp_path / name))
        kpis[name] = run(capsys, "merge", "--staging", str(tmp_path / name))["kpis"]
    assert kpis["parts"] == kpis["whole"] and kpis["whole"]["daily"]
    assert not list((tmp_path / "parts").glob("segments/**/*.*"))


def test_the_invalid_row_threshold_applies_to_the_whole_file_not_to_each_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every bad row sits in the last part: that part alone is far above 5 %, the file is not... until it is.
    good = "".join(f"{i},1,complete,2025-03-01T10:00:00,1\n" for i in range(30_000))
    for bad_rows, outcome in ((1_000, "accepted"), (2_000, "rejected")):
        bad = "".join(f"{100_000 + i},1,lost,2025-03-01T10:00:00,1\n" for i in range(bad_rows))
        path = tmp_path / f"orders_{bad_rows}.csv"
        path.write_text(HEADER + good + bad)
        whole = validate_whole(capsys, path, tmp_path / f"whole{bad_rows}")
        parted, _ = validate_in_parts(capsys, monkeypatch, path, tmp_path / f"parts{bad_rows}", 4)
        assert whole["outcome"] == parted["outcome"] == outcome
        assert_same(whole, parted, tmp_path / f"whole{bad_rows}", tmp_path / f"parts{bad_rows}")


def test_a_header_rule_rejects_a_split_file_as_it_rejects_a_whole_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "orders.csv"
    path.write_text("order_id,status,created_at,num_of_item\n" + "1,complete,2025-03-01T10:00:00,1\n" * 30_000)
    whole = validate_whole(capsys, path, tmp_path / "whole")
    parted, _ = validate_in_parts(capsys, monkeypatch, path, tmp_path / "parts", 3)
    assert whole["reason"] == parted["reason"] == "missing_column"
    assert parted["message"] == whole["message"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), parts=st.integers(2, 6))
def test_any_cut_of_any_messy_file_gives_the_whole_files_result(
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    parts: int,
) -> None:
    # A small quote-free window (record limit 1 KiB, no margin) so that small files are cut in many places.
    monkeypatch.setattr(split, "MARGIN", 0)
    monkeypatch.setenv("SHOPKPI_MAX_RECORD_KB", "1")
    monkeypatch.setenv("SHOPKPI_MAX_INVALID_SHARE", "1")
    tmp = tmp_path_factory.mktemp("split")
    path = tmp / "orders.csv"
    path.write_bytes(messy_orders(1_500, seed, quote_every=200))
    whole = validate_whole(capsys, path, tmp / "whole")
    parted, _ = validate_in_parts(capsys, monkeypatch, path, tmp / "parts", parts)
    assert_same(whole, parted, tmp / "whole", tmp / "parts")


def test_a_cut_is_never_placed_where_a_quote_could_still_be_open() -> None:
    window = 8
    data = b"a,b\n" + b'1,"x\n' + b"2,y\n" * 5
    # The newline right after the quote is no place to cut; the first newline with 8 quote-free bytes before is.
    cut = split.clean_cut(data, 0, nominal=5, window=window)
    assert cut is not None and b'"' not in data[cut - window : cut] and data[cut - 1 : cut] == b"\n"
    assert split.clean_cut(b'"' * 64, 0, nominal=10, window=window) is None


def test_a_combine_step_run_again_after_it_finished_answers_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step Functions retries a state whose task reported late (a lost heartbeat): the parts are gone by then.
    path = tmp_path / "orders.csv"
    path.write_bytes(messy_orders(20_000, seed=3))
    size_mb = path.stat().st_size / (1 << 20)
    monkeypatch.setenv("SHOPKPI_MAX_INVALID_SHARE", "0.5")
    monkeypatch.setenv("SHOPKPI_SPLIT_MB", str(size_mb / 2))
    monkeypatch.setenv("SHOPKPI_PART_MB", str(size_mb / 3))
    staging = str(tmp_path / "st")
    plan = run(capsys, "validate", str(path), "--staging", staging)["split"]
    for part in plan["parts"]:
        job = {k: plan[k] for k in ("file_id", "source", "arrival", "header_end")} | {"part": part}
        run(capsys, "validate-part", json.dumps(job), "--staging", staging)
    first = run(capsys, "combine", json.dumps(plan), "--staging", staging)
    again = run(capsys, "combine", json.dumps(plan), "--staging", staging)
    assert again == first and first["outcome"] == "accepted"
