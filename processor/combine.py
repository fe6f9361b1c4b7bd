"""The last step of a split file's validation: the parts' outputs -> the one result of the whole file.

Pure over local files (what the parts staged, downloaded), so the same code serves the ECS task and the tests.
See :mod:`processor.split` for why the result is exactly the one of the file read whole.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import polars as pl

from processor.errors import FileRejected, Reason
from processor.ingest import SAMPLES_PER_REASON, file_rule
from processor.model import ValidationResult
from processor.schema import BUCKET, Dataset
from processor.split import Split, first_samples, line_shifts
from processor.validate import LINE, REASON, as_rejects

#: Keys looked at per pass when finding keys repeated across parts (bounds the combine step's memory).
KEYS_PER_PASS = 4_000_000


@dataclass
class PartOutput:
    """What one part's validation left: its report, the newlines of its own bytes, its files (local copies)."""

    report: dict[str, Any]
    newlines: int
    segment: Path | None  # staged valid rows (Parquet, with _line and _b)
    rejects: Path | None  # rejected rows (CSV)


@dataclass
class StagedPiece:
    """One part's staged rows as a piece of the file's segment (see processor.stage.Piece): read in place."""

    part: int  # index of the part
    shift: int  # the part's line -> the file's line
    dropped: Path | None  # Parquet of the part's own lines repeated from an earlier part (not staged)


@dataclass
class Combined:
    result: ValidationResult
    report: dict[str, Any]
    pieces: list[StagedPiece] | None  # the file's staged rows, part by part (accepted files)
    rejects: Path | None  # the file's rejected rows
    buckets: list[int]


def combine(
    split: Split, parts: list[PartOutput], dataset: Dataset | None, max_invalid_share: float, work: Path
) -> Combined:
    """One outcome, report, rejected-rows file and staged segment for the whole file, from its parts': the rows
    put together (keys repeated across parts rejected, line numbers the file's), then the totals judged."""
    started = time.perf_counter()
    first = parts[0].report
    if dataset is None or (first["outcome"] == "rejected" and first.get("reason") != str(Reason.EMPTY_FILE)):
        # A rule of the header (or the name): every part found it, the first part read the real header line.
        return Combined(msgspec.convert(_result_fields(first), ValidationResult), first, None, parts[0].rejects, [])
    work.mkdir(parents=True, exist_ok=True)
    shifts = line_shifts(split, [p.newlines for p in parts])
    drops = _repeated_across_parts(parts, dataset.key)
    rejects = work / "rejected_rows.csv"
    repeated: list[pl.DataFrame] = []
    pieces = _pieces(parts, shifts, drops, work, repeated.append)
    buckets = sorted({int(b) for p in parts if p.segment is not None for b in p.report.get("buckets", [])})
    duplicates = (
        as_rejects(pl.concat(repeated).drop(BUCKET), dataset, Reason.DUPLICATE_KEY, dataset.key) if repeated else None
    )
    _write_rejects(parts, shifts, duplicates, rejects)
    totals = _Totals.of(parts, shifts, duplicates)
    seconds = round(sum(float(p.report.get("seconds", 0.0)) for p in parts) + time.perf_counter() - started, 3)
    counted: dict[str, Any] = {k: first[k] for k in ("file_id", "source", "dataset", "arrival")}
    counted |= {"rows": totals.rows, "valid_rows": totals.valid, "rejected_rows": totals.rows - totals.valid}
    counted |= {"rejects_by_reason": totals.counts, "seconds": seconds}
    error = totals.file_rule(max_invalid_share)
    if error is not None:
        why = {"outcome": "rejected", "reason": str(error.reason), "message": error.message}
        result = msgspec.convert({**counted, **why}, ValidationResult)
        return Combined(result, {**msgspec.structs.asdict(result), "error": error.to_dict()}, None, rejects, [])
    result = msgspec.convert({**counted, "outcome": "accepted"}, ValidationResult)
    report = {
        **msgspec.structs.asdict(result),
        "buckets": buckets,
        "samples": totals.samples,
        "warnings": first.get("warnings", []),
        "timings": {"parts": len(parts), "combine": round(time.perf_counter() - started, 3)},
    }
    return Combined(result, report, pieces, rejects, buckets)


@dataclass
class _Totals:
    """The whole file's counts and sample rows, from its parts' and the keys repeated across them."""

    rows: int
    valid: int
    counts: dict[str, int]
    samples: list[dict[str, Any]]

    @classmethod
    def of(cls, parts: list[PartOutput], shifts: list[int], duplicates: pl.DataFrame | None) -> _Totals:
        counts: Counter[str] = Counter()
        for p in parts:
            counts.update(p.report.get("rejects_by_reason", {}))
        valid = sum(int(p.report.get("valid_rows", 0)) for p in parts)
        samples = first_samples([p.report.get("samples", []) for p in parts], shifts, SAMPLES_PER_REASON)
        if duplicates is not None:
            counts[str(Reason.DUPLICATE_KEY)] += duplicates.height
            valid -= duplicates.height
            samples = _with_duplicate_samples(samples, duplicates)
        rows = sum(int(p.report.get("rows", 0)) for p in parts)
        return cls(rows, valid, dict(sorted(counts.items())), samples)

    def file_rule(self, max_invalid_share: float) -> FileRejected | None:
        return file_rule(self.rows, self.valid, self.counts, self.samples, max_invalid_share)


def _result_fields(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k in ValidationResult.__struct_fields__}


def _repeated_across_parts(parts: list[PartOutput], key: str) -> list[np.ndarray]:
    """Per part, the (part's own) lines of the rows whose key an earlier part already holds, sorted.

    A part holds each key once (it dropped its own repeats), so a key in several parts is kept in the first of
    them. Read in passes over the key's residues, the key and line columns only, so memory stays bounded."""
    scans = [
        pl.scan_parquet(p.segment, glob=False).select(pl.col(key), pl.col(LINE), pl.lit(i, pl.Int32).alias("_part"))
        for i, p in enumerate(parts)
        if p.segment is not None
    ]
    drops: list[list[np.ndarray]] = [[] for _ in parts]
    if len(scans) < 2 or _disjoint([scan.select(pl.col(key).min().alias("lo"), pl.col(key).max().alias("hi"))
                                    for scan in scans]):  # fmt: skip
        # Parts whose key ranges do not overlap share no key: files exported in key order (the usual case) skip
        # the pass below, for the price of reading one column.
        return [np.array([], dtype=np.int64) for _ in parts]
    total = sum(int(p.report.get("valid_rows", 0)) for p in parts)
    passes = max(1, math.ceil(total / KEYS_PER_PASS))
    for n in range(passes):
        keys = pl.concat(scans)
        if passes > 1:
            keys = keys.filter(pl.col(key) % passes == n)
        later = (
            keys.filter(pl.col(key).is_duplicated())
            .filter(pl.col("_part") != pl.col("_part").min().over(key))
            .select("_part", LINE)
            .collect()
        )
        for (i,), group in later.group_by("_part"):
            drops[int(i)].append(group.get_column(LINE).to_numpy())  # type: ignore[call-overload]
    return [np.sort(np.concatenate(d)) if d else np.array([], dtype=np.int64) for d in drops]


def _disjoint(ranges: list[pl.LazyFrame]) -> bool:
    """Whether the (lo, hi) key ranges of the parts overlap nowhere."""
    bounds = sorted(
        (lo, hi) for lo, hi in pl.concat(pl.collect_all(ranges)).iter_rows() if lo is not None and hi is not None
    )
    return all(prev[1] < nxt[0] for prev, nxt in itertools.pairwise(bounds))


def _pieces(
    parts: list[PartOutput],
    shifts: list[int],
    drops: list[np.ndarray],
    work: Path,
    removed: Callable[[pl.DataFrame], None],
) -> list[StagedPiece]:
    """The parts' staged rows as pieces of one segment, read in place by the merge: nothing is rewritten. The rows
    repeated across parts are read (those rows only) and go to ``removed`` with the file's line numbers; their
    part's own lines are written beside the piece, for the merge to leave out."""
    pieces = []
    for i, (p, shift, drop) in enumerate(zip(parts, shifts, drops, strict=True)):
        if p.segment is None:
            continue
        dropped = None
        if drop.size:
            lines = pl.DataFrame({LINE: drop}, schema={LINE: pl.Int64()})
            rows = pl.scan_parquet(p.segment, glob=False).join(lines.lazy(), on=LINE, how="semi").collect()
            removed(rows.with_columns(pl.col(LINE) + shift))
            dropped = work / f"dropped-{i}.parquet"
            lines.write_parquet(dropped)
        pieces.append(StagedPiece(i, shift, dropped))
    return pieces


def _write_rejects(parts: list[PartOutput], shifts: list[int], duplicates: pl.DataFrame | None, out: Path) -> None:
    """The parts' rejected rows with the file's line numbers, then the rows repeated across parts."""
    with out.open("wb") as f:
        header = True
        for p, shift in zip(parts, shifts, strict=True):
            if p.rejects is None:
                continue
            for batch in _csv_batches(p.rejects):
                batch = batch.with_columns((pl.col(LINE).cast(pl.Int64) + shift).cast(pl.String))
                batch.write_csv(f, include_header=header)
                header = False
        if duplicates is not None:
            duplicates.write_csv(f, include_header=header)


def _csv_batches(path: Path) -> Iterator[pl.DataFrame]:
    """A part's rejected rows in batches (every column as text: they are written back as they were read)."""
    yield from pl.scan_csv(path, infer_schema=False).collect_batches()


def _with_duplicate_samples(samples: list[dict[str, Any]], duplicates: pl.DataFrame) -> list[dict[str, Any]]:
    have = sum(1 for s in samples if s[REASON] == str(Reason.DUPLICATE_KEY))
    extra = [
        {k: v for k, v in row.items() if k != "_raw" or v is not None}
        for row in duplicates.sort(LINE).head(max(0, SAMPLES_PER_REASON - have)).iter_rows(named=True)
    ]
    return samples + extra
