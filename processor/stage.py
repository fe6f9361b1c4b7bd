"""Committing validated segments into the staging area (the body of the per-file transformation task).

Layout under the staging root (a local directory or ``s3://<bucket>/staging/``)::

    segments/<dataset>/<file_id>.parquet    one file's valid rows, in row groups of whole buckets: the facts the merge
                                            reads of orders and items (processor.ingest.FACTS), typed rows of products
                                            (deleted by the merge that applies it: its rows then live in the state)
    segments/<dataset>/<file_id>/part-<k>.parquet (and part-<k>.dropped.parquet)
                                            or, for a file validated in parts, each part's staged rows as the part
                                            wrote them: the pieces of the file's segment (see :class:`Piece`)
    manifest/<file_id>.json                 the commit record of that segment (written last: its commit point; kept)
    state/head.json                         the merge's commit point: names the files of its keyed tables and
                                            aggregates (see processor.state)
    state/g=<generation>/                   the files one merge wrote: keyed tables (sorted Parquet runs, see
                                            processor.keyed) and aggregates

A segment is visible to merges only once its manifest exists, and the manifest is written after the segment, so a
crash between the two leaves an invisible orphan object, never a half-visible file. Committing the same file
again (a duplicate delivery) is a no-op: the file id is derived from the object's identity.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import msgspec
import polars as pl

from processor.store import Store

LINE = "_line"  # the staged rows' line numbers in their file (processor.validate.LINE)


class Piece(msgspec.Struct, frozen=True, kw_only=True):
    """One part of a file validated in parts (processor.split), staged as that part's task wrote it and read in
    place: its lines are the part's own, ``shift`` makes them the file's; ``dropped`` names a Parquet of the
    part's own lines whose key an earlier part holds (rejected as ``duplicate_key``, not staged)."""

    key: str
    shift: int
    dropped: str | None = None


class Segment(msgspec.Struct, frozen=True, kw_only=True):
    """The commit record of one staged file."""

    file_id: str
    dataset: str
    source: str  # where the file came from (s3 URI or local path)
    arrival_us: int  # arrival time, microseconds since the epoch: the later version of a key wins
    rows: int
    buckets: list[int]  # buckets that hold rows of this file
    key: str  # staged Parquet, relative to the staging root (unless the file was validated in pieces)
    pieces: list[Piece] = msgspec.field(default_factory=list)  # a file validated in parts: its rows, part by part

    def objects(self) -> list[str]:
        """Every object holding this segment's rows (what a merge deletes once it applied them)."""
        return [self.key] + [k for p in self.pieces for k in (p.key, p.dropped) if k is not None]


def scan_segment(store: Store, seg: Segment) -> pl.LazyFrame:
    """The staged rows of a segment, with the file's line numbers, whether it is one file or pieces."""
    if not seg.pieces:
        return pl.scan_parquet(store.local_path(seg.key), glob=False)
    frames = []
    for p in seg.pieces:
        rows = pl.scan_parquet(store.local_path(p.key), glob=False)
        if p.dropped is not None:
            rows = rows.join(pl.scan_parquet(store.local_path(p.dropped), glob=False), on=LINE, how="anti")
        frames.append(rows.with_columns(pl.col(LINE) + p.shift))
    return pl.concat(frames)


def file_id_for(source: str, version: str) -> str:
    """A stable id for one version of one object: readable stem plus a digest of (source, version).

    ``version`` is the S3 ETag (or version id), or size and mtime for a local file: the same object delivered twice
    gets the same id, a changed object a new one.

    A local path that is not valid UTF-8 reaches Python with its bad bytes as lone surrogates (``surrogateescape``).
    They are hashed as the original bytes (the same encoding the OS layer uses, and unchanged for every valid name,
    so existing ids stay the same) and replaced by ``_`` in the readable stem, which ends up in keys, file names
    and JSON that must be valid UTF-8.
    """
    stem = Path(source.split("://", 1)[-1]).name.split(".")[0][:40] or "file"
    stem = _LONE_SURROGATE.sub("_", stem)
    digest = hashlib.sha256(_utf8(f"{source}\0{version}")).hexdigest()[:16]
    return f"{stem}-{digest}"


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")  # U+DC80..U+DCFF: the bytes the OS gave
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")  # any other lone surrogate: still one stable encoding


def segment_key(dataset: str, file_id: str) -> str:
    return f"segments/{dataset}/{file_id}.parquet"


def manifest_key(file_id: str) -> str:
    return f"manifest/{file_id}.json"


def is_committed(store: Store, file_id: str) -> bool:
    return store.get_bytes(manifest_key(file_id)) is not None


def commit(store: Store, local_segment: Path, segment: Segment) -> bool:
    """Publish a validated segment. Returns False when this exact file was already committed (re-delivery)."""
    if is_committed(store, segment.file_id):
        return False
    store.put_file(local_segment, segment.key)
    return commit_manifest(store, segment)


def commit_manifest(store: Store, segment: Segment) -> bool:
    """Commit a segment whose data is already in the store: the manifest is the commit point."""
    if is_committed(store, segment.file_id):
        return False
    store.put_bytes(manifest_key(segment.file_id), msgspec.json.encode(segment))
    return True


def committed_segments(store: Store) -> list[Segment]:
    """Every committed segment, in arrival order (ties broken by source and id, so the order is total)."""
    segments = []
    for key in store.list_keys("manifest/"):
        data = store.get_bytes(key)
        if data is not None:
            segments.append(msgspec.json.decode(data, type=Segment))
    return sorted(segments, key=lambda s: (s.arrival_us, s.source, s.file_id))
