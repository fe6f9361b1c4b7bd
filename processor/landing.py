"""Where a task finds a landed file and leaves what it made of it: the landing bucket, or a local folder.

Beside :mod:`processor.store` (the staging area), this is the other half of what a task step touches, so each step
is written once and runs the same against S3 (the ECS tasks) and against local files (``shopkpi-task`` on a laptop,
the tests). Both keep the same key layout under their root::

    reports/<file_id>/report.json         every file's report
    reports/<file_id>/rejected_rows.csv   its rejected rows, when it has any
    archive/<dataset>/<date>/<name>       originals of accepted files, by arrival date     (S3 only)
    rejected/<dataset>/<date>/<name>      originals of rejected files, with <name>.report.json and
                                          <name>.rejected_rows.csv beside them            (S3 only)

A local source is the user's own file: it is read, never moved, so :meth:`Landing.archive` and
:meth:`Landing.quarantine` leave it where it is and answer ``None``.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

import orjson

from processor.errors import ConfigError, NotFound
from processor.ingest import open_local
from processor.log import get_logger
from processor.schema import detect_dataset, is_gzip
from processor.stage import file_id_for
from processor.store import LocalStore

if TYPE_CHECKING:
    from processor.aws.s3 import S3Store

log = get_logger("landing")

#: A file's report and rejected rows, the same keys in the bucket and in a local folder.
REPORT = "reports/{file_id}/report.json"
REJECTED_ROWS = "reports/{file_id}/rejected_rows.csv"
#: Bytes per read of a streamed file.
CHUNK = 8 << 20


class Landing(Protocol):
    def identity(self, source: str) -> tuple[str, datetime]:
        """(file id, arrival time): from the object's ETag and LastModified, or a local file's size and mtime."""
        ...

    def exists(self, source: str) -> bool: ...

    def size(self, source: str) -> int:
        """The file's size in bytes, as stored (compressed, for a ``.gz``)."""
        ...

    def chunks(self, source: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive) of the stored file, streamed in chunks (one ranged read)."""
        ...

    def open(self, source: str) -> Any:
        """A context manager giving the file's bytes as a stream, gunzipped when the name ends in ``.gz``."""
        ...

    def put_report(self, file_id: str, report: dict[str, Any], rejected_rows: Path | None) -> dict[str, Any]:
        """Keep a file's report (and its rejected rows); return the report with where they are kept."""
        ...

    def get_report(self, file_id: str) -> dict[str, Any] | None: ...

    def archive(self, source: str, arrival: str) -> str | None:
        """Move an accepted file's original to ``archive/``; return where it went (None: left in place)."""
        ...

    def quarantine(self, file_id: str, report: dict[str, Any]) -> str | None:
        """Move a rejected file's original to ``rejected/`` beside its report and rejected rows."""
        ...


def dated_key(area: str, source: str, arrival: str) -> str:
    """``<area>/<dataset>/<arrival date>/<file name>``: where a file's original ends."""
    dataset = detect_dataset(source)
    name = PurePosixPath(source.split("://", 1)[-1]).name
    return f"{area}/{dataset.name if dataset else 'unknown'}/{arrival[:10]}/{name}"


class LocalLanding:
    """Local files as the landing area; reports are kept under ``root`` (the local staging directory)."""

    def __init__(self, root: Path) -> None:
        self.files = LocalStore(root)

    def identity(self, source: str) -> tuple[str, datetime]:
        path = Path(source)
        if not path.exists():
            raise NotFound(f"{source} does not exist", source=source)
        if path.is_dir():  # a task validates one file (a named pipe too); `shopkpi process` takes folders
            raise ConfigError(f"{source} is a folder: a task validates one file at a time", source=source)
        stat = path.stat()
        return file_id_for(str(path.resolve()), f"{stat.st_size}:{stat.st_mtime_ns}"), datetime.now(UTC)

    def exists(self, source: str) -> bool:
        return Path(source).exists()

    def size(self, source: str) -> int:
        return Path(source).stat().st_size

    def chunks(self, source: str, start: int, end: int) -> Iterator[bytes]:
        with Path(source).open("rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                data = f.read(min(left, CHUNK))
                if not data:
                    return
                left -= len(data)
                yield data

    @contextmanager
    def open(self, source: str) -> Iterator[IO[bytes]]:
        with open_local(Path(source)) as stream:
            yield stream

    def put_report(self, file_id: str, report: dict[str, Any], rejected_rows: Path | None) -> dict[str, Any]:
        report = dict(report)
        if rejected_rows is not None and rejected_rows.exists():
            key = REJECTED_ROWS.format(file_id=file_id)
            self.files.put_file(rejected_rows, key)
            report["rejects"] = str(self.files.local_path(key))
        key = REPORT.format(file_id=file_id)
        report["report"] = str(self.files.local_path(key))
        self.files.put_bytes(key, orjson.dumps(report))
        return report

    def get_report(self, file_id: str) -> dict[str, Any] | None:
        data = self.files.get_bytes(REPORT.format(file_id=file_id))
        return None if data is None else cast(dict[str, Any], orjson.loads(data))

    def archive(self, source: str, arrival: str) -> str | None:
        return None

    def quarantine(self, file_id: str, report: dict[str, Any]) -> str | None:
        return None


class S3Landing:
    """The landing bucket: sources are ``s3://<bucket>/<key>`` URIs of that bucket, streamed, never downloaded."""

    def __init__(self, s3: S3Store) -> None:
        self.s3 = s3

    def key(self, source: str) -> str:
        from processor.aws.s3 import split_uri

        bucket, key = split_uri(source)
        if bucket != self.s3.bucket:
            raise ConfigError(f"{source} is not in the landing bucket {self.s3.bucket}")
        return key

    def identity(self, source: str) -> tuple[str, datetime]:
        info = self.s3.head(self.key(source))
        return file_id_for(source, info.etag), info.last_modified

    def exists(self, source: str) -> bool:
        return self.s3.exists(self.key(source))

    def size(self, source: str) -> int:
        return self.s3.head(self.key(source)).size

    def chunks(self, source: str, start: int, end: int) -> Iterator[bytes]:
        if end > start:
            yield from self.s3.iter_chunks(self.key(source), CHUNK, start=start, end=end)

    @contextmanager
    def open(self, source: str) -> Iterator[IO[bytes]]:
        raw: IO[bytes] = io.BufferedReader(ChunkStream(self.s3.iter_chunks(self.key(source))), 8 << 20)
        stream: IO[bytes] = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")) if is_gzip(source) else raw
        try:
            yield stream
        finally:
            stream.close()

    def put_report(self, file_id: str, report: dict[str, Any], rejected_rows: Path | None) -> dict[str, Any]:
        report = dict(report)
        if rejected_rows is not None and rejected_rows.exists():
            key = REJECTED_ROWS.format(file_id=file_id)
            self.s3.upload(rejected_rows, key, content_type="text/csv")
            report["rejects"] = self.s3.uri(key)
        key = REPORT.format(file_id=file_id)
        report["report"] = self.s3.uri(key)
        self.s3.put_bytes(key, orjson.dumps(report), content_type="application/json")
        return report

    def get_report(self, file_id: str) -> dict[str, Any] | None:
        key = REPORT.format(file_id=file_id)
        return cast(dict[str, Any], orjson.loads(self.s3.get_bytes(key))) if self.s3.exists(key) else None

    def archive(self, source: str, arrival: str) -> str | None:
        src = self.key(source)
        if not self.s3.exists(src):
            return None  # an earlier run of this step archived it
        dest = dated_key("archive", source, arrival)
        try:
            self.s3.move(src, dest)
        except NotFound:
            # The same object delivered twice, its two transforms side by side: the other one archived it.
            if self.s3.exists(src):
                raise
            log.info("file.archived_by_another", source=source)
        return dest

    def quarantine(self, file_id: str, report: dict[str, Any]) -> str | None:
        source = report["source"]
        dest = dated_key("rejected", source, report["arrival"])
        try:
            self.s3.move(self.key(source), dest)
        except NotFound:
            # The same object delivered twice, its two quarantines side by side: the other one moved it.
            if not self.s3.exists(dest):
                raise
        self.s3.put_bytes(dest + ".report.json", orjson.dumps(report), content_type="application/json")
        rows = REJECTED_ROWS.format(file_id=file_id)
        if self.s3.exists(rows):
            self.s3.copy(rows, dest + ".rejected_rows.csv")
        return self.s3.uri(dest)


class ChunkStream(io.RawIOBase):
    """A readable byte stream over an iterator of chunks (an S3 response body), for the streaming CSV reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
