"""Duplicate primary keys within one file, found exactly in bounded memory.

:class:`KeySpill` takes (key, line) pairs chunk by chunk and spills them to disk in hash partitions; at the end each
partition is checked alone, sorted in memory, and a partition too large for that is split further by the next bits
of the hash first. Used by :mod:`processor.ingest` for the ``duplicate_key`` rule (docs/validation.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

_SPILL_PARTS = 16
_HASH_BITS = 4  # log2(_SPILL_PARTS)
#: Keys of one spill partition sorted in memory at once (16 bytes each with its line): larger ones are split again.
_PART_KEYS = 1 << 22
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class KeySpill:
    """Primary keys and lines, spilled to disk in hash partitions, to find duplicates in bounded memory.

    Callers add each key at most once per chunk (repeats within a chunk are found in memory), so a partition holds
    at most one copy of a key per chunk, and a partition larger than ``_PART_KEYS`` can always be split further by
    the next bits of the hash.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._keys = [(directory / f"k{p}.bin").open("wb") for p in range(_SPILL_PARTS)]
        self._lines = [(directory / f"l{p}.bin").open("wb") for p in range(_SPILL_PARTS)]
        self.dir = directory

    def add(self, keys: np.ndarray, lines: np.ndarray) -> None:
        _partition(keys.astype(np.int64), lines.astype(np.int64), 0, self._keys, self._lines)

    def duplicate_lines(self) -> np.ndarray:
        """Lines whose key repeats an earlier line of the file (the first occurrence is kept), ascending."""
        for f in (*self._keys, *self._lines):
            f.close()
        found = [d for p in range(_SPILL_PARTS) if (d := _part_duplicates(self.dir, f"{p}", 0)).size]
        shutil.rmtree(self.dir, ignore_errors=True)
        return np.sort(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)


def _part_of(keys: np.ndarray, level: int) -> np.ndarray:
    shift = np.uint64(64 - _HASH_BITS * (level + 1))
    mask = np.uint64(_SPILL_PARTS - 1)
    return (((keys.astype(np.uint64) * _GOLDEN) >> shift) & mask).astype(np.int64)


def _partition(
    keys: np.ndarray, lines: np.ndarray, level: int, kfiles: Sequence[BinaryIO], lfiles: Sequence[BinaryIO]
) -> None:
    part = _part_of(keys, level)
    order = np.argsort(part, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=_SPILL_PARTS))])
    k, ln = keys[order], lines[order]
    for p in range(_SPILL_PARTS):
        lo, hi = bounds[p], bounds[p + 1]
        if hi > lo:
            k[lo:hi].tofile(kfiles[p])
            ln[lo:hi].tofile(lfiles[p])


def _part_duplicates(directory: Path, name: str, level: int) -> np.ndarray:
    """Duplicate lines of one partition: sorted by (key, line) in memory, or split by the next hash bits first."""
    kpath, lpath = directory / f"k{name}.bin", directory / f"l{name}.bin"
    count = kpath.stat().st_size // 8
    if count > _PART_KEYS and _HASH_BITS * (level + 2) <= 64:
        kfiles = [(directory / f"k{name}_{p}.bin").open("wb") for p in range(_SPILL_PARTS)]
        lfiles = [(directory / f"l{name}_{p}.bin").open("wb") for p in range(_SPILL_PARTS)]
        with kpath.open("rb") as kf, lpath.open("rb") as lf:
            while (keys := np.fromfile(kf, dtype=np.int64, count=_PART_KEYS)).size:
                _partition(keys, np.fromfile(lf, dtype=np.int64, count=keys.size), level + 1, kfiles, lfiles)
        for f in (*kfiles, *lfiles):
            f.close()
        kpath.unlink()
        lpath.unlink()
        found = [_part_duplicates(directory, f"{name}_{p}", level + 1) for p in range(_SPILL_PARTS)]
        return np.concatenate(found)
    keys = np.fromfile(kpath, dtype=np.int64)
    if keys.size < 2:
        return np.empty(0, dtype=np.int64)
    lines = np.fromfile(lpath, dtype=np.int64)
    order = np.lexsort((lines, keys))  # by key, then line: each key's first line comes first
    keys, lines = keys[order], lines[order]
    repeats: np.ndarray = lines[1:][keys[1:] == keys[:-1]]
    return repeats
