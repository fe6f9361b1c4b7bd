"""S3 access for the landing bucket: streamed transfers, listings, and safe moves.

Files can be many GB, so nothing here holds a whole object in memory except :meth:`S3Store.get_bytes` (meant
for small reports and manifests): downloads and uploads go through boto3's managed transfer in 8 MiB parts,
and :meth:`S3Store.iter_chunks` streams an object's body.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus, unquote_plus

from boto3.s3.transfer import TransferConfig

from processor.aws.clients import aws_call
from processor.errors import AwsError, ConfigError, NotFound

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["CHUNK_SIZE", "ObjectInfo", "RangedObject", "S3Store", "is_s3_uri", "join_uri", "split_uri"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
CHUNK_SIZE = 8 * MiB

#: Transfers of files: 8 MiB parts, a few in flight, so memory stays at a few tens of MiB whatever the size.
DEFAULT_TRANSFER = TransferConfig(
    multipart_threshold=16 * MiB, multipart_chunksize=CHUNK_SIZE, max_concurrency=4, use_threads=True
)
#: Server-side copies move no bytes through this process, so parts can be large and many: a multi-GB archive
#: move is then a few dozen parallel UploadPartCopy calls (CopyObject alone stops at 5 GB).
DEFAULT_COPY_TRANSFER = TransferConfig(
    multipart_threshold=256 * MiB, multipart_chunksize=128 * MiB, max_concurrency=8, use_threads=True
)

_PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412"})


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # without the quotes S3 puts around it
    last_modified: datetime  # timezone-aware, UTC
    version_id: str | None = None


def split_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/a/b.csv"`` -> ``("bucket", "a/b.csv")``. The key may be empty (``s3://bucket/``)."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"not an s3:// URI: {uri!r}", uri=uri)
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ConfigError(f"no bucket in {uri!r}", uri=uri)
    return bucket, key


def join_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def event_key(key: str) -> str:
    """``key`` as S3 writes it in its event notifications: URL-encoded, a space as ``+`` (``red flower.csv`` ->
    ``red+flower.csv``, ``a=b:c`` -> ``a%3Db%3Ac``), slashes kept; the encoding of Java's URLEncoder, which AWS uses.

    The workflow's input carries keys in this form (the landing events'), and a task decodes them with
    :func:`key_from_event`: reading an encoded key as it comes finds no object.
    """
    return quote_plus(key, safe="/*").replace("~", "%7E")


def key_from_event(key: str) -> str:
    """The object key of an S3 event notification's (URL-encoded) key."""
    return unquote_plus(key)


def is_s3_uri(text: str) -> bool:
    return text.startswith("s3://")


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class S3Store:
    """One bucket. Methods raise project errors only (a missing key: :class:`~processor.errors.NotFound`)."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        *,
        transfer: TransferConfig | None = None,
        copy_transfer: TransferConfig | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self._transfer = transfer or DEFAULT_TRANSFER
        self._copy_transfer = copy_transfer or DEFAULT_COPY_TRANSFER

    def uri(self, key: str) -> str:
        return join_uri(self.bucket, key)

    # --- transfers ------------------------------------------------------------------------------------------
    def download(self, key: str, dest: Path) -> Path:
        """Stream ``key`` to ``dest`` (parents created). The managed transfer writes a temporary file and
        renames it, so ``dest`` never holds a partial object, even if the download fails halfway."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        with aws_call("s3.download", bucket=self.bucket, key=key):
            self.client.download_file(self.bucket, key, str(dest), Config=self._transfer)
        return dest

    def upload(self, path: Path, key: str, *, content_type: str | None = None) -> None:
        """Stream a local file to ``key`` (multipart above 16 MiB)."""
        extra = {"ContentType": content_type} if content_type else None
        with aws_call("s3.upload", bucket=self.bucket, key=key, path=str(path)):
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=self._transfer)

    def iter_chunks(
        self, key: str, chunk_size: int = CHUNK_SIZE, *, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """The body of ``key`` (or its bytes ``start`` to ``end``, exclusive) as chunks of at most ``chunk_size``."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        with aws_call("s3.get_object", bucket=self.bucket, key=key):
            body = self.client.get_object(**args)["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of ``key``: one ranged GET."""
        with aws_call("s3.get_object", bucket=self.bucket, key=key, range=f"{start}-{end - 1}"):
            body = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

    def open_ranged(self, key: str) -> RangedObject:
        """A seekable reader of ``key`` that fetches only what is read (a Parquet reader reads a footer and some
        row groups: a few ranged GETs instead of the whole object)."""
        return RangedObject(self, key, self.head(key).size)

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if content_type:
            args["ContentType"] = content_type
        with aws_call("s3.put_object", bucket=self.bucket, key=key):
            self.client.put_object(**args)

    def get_bytes(self, key: str) -> bytes:
        """The whole object in memory: for small objects (reports, manifests) only."""
        with aws_call("s3.get_object", bucket=self.bucket, key=key):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

    # --- metadata -------------------------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        with aws_call("s3.head_object", bucket=self.bucket, key=key):
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        return ObjectInfo(
            key=key,
            size=int(r["ContentLength"]),
            etag=r["ETag"].strip('"'),
            last_modified=_utc(r["LastModified"]),
            version_id=r.get("VersionId"),
        )

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except NotFound:
            return False
        return True

    def list_objects(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order, fetched one page at a time (never the whole listing)."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
        with aws_call("s3.list_objects_v2", bucket=self.bucket, prefix=prefix):
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        key=obj["Key"],
                        size=int(obj["Size"]),
                        etag=obj["ETag"].strip('"'),
                        last_modified=_utc(obj["LastModified"]),
                    )

    def list_keys(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[str]:
        for info in self.list_objects(prefix, page_size=page_size):
            yield info.key

    # --- moves ----------------------------------------------------------------------------------------------
    def copy(self, src_key: str, dst_key: str, *, etag: str | None = None) -> None:
        """Server-side copy within the bucket; multipart above the copy threshold. With ``etag``, only that
        version of the source is copied (S3 answers 412 if it was overwritten meanwhile)."""
        extra = {"CopySourceIfMatch": f'"{etag}"'} if etag else None
        with aws_call("s3.copy", bucket=self.bucket, key=src_key, dst_key=dst_key):
            self.client.copy(
                {"Bucket": self.bucket, "Key": src_key},
                self.bucket,
                dst_key,
                ExtraArgs=extra,
                Config=self._copy_transfer,
            )

    def move(self, src_key: str, dst_key: str, *, etag: str | None = None) -> ObjectInfo:
        """Copy ``src_key`` to ``dst_key``, check the copy, then delete the source; returns the destination.

        The source is deleted only after the copy succeeded and the destination has the source's size, so a
        failure at any point leaves at least one complete copy. ``etag`` (default: the source's current ETag)
        pins the version being moved: if a producer overwrites the source key meanwhile, the copy fails
        (nothing deleted) or, if the overwrite lands after the copy, the conditional delete leaves the newer
        object in place for its own event. A retried move whose first attempt already deleted the source
        succeeds when the destination exists.
        """
        if src_key == dst_key:
            return self.head(src_key)
        try:
            src = self.head(src_key)
        except NotFound:
            if self.exists(dst_key):
                log.info("s3 move already done", extra={"src_key": src_key, "dst_key": dst_key})
                return self.head(dst_key)
            raise
        pinned = etag or src.etag
        if pinned != src.etag:
            raise AwsError(
                f"s3.move: {src_key} changed (etag {src.etag}, expected {pinned})",
                operation="s3.move",
                aws_code="PreconditionFailed",
                key=src_key,
            )
        self.copy(src_key, dst_key, etag=pinned)
        dst = self.head(dst_key)
        if dst.size != src.size:
            raise AwsError(
                f"s3.move: copy of {src_key} has {dst.size} bytes, source {src.size}; source kept",
                operation="s3.move",
                key=src_key,
                dst_key=dst_key,
            )
        try:
            with aws_call("s3.delete_object", bucket=self.bucket, key=src_key):
                self.client.delete_object(Bucket=self.bucket, Key=src_key, IfMatch=f'"{pinned}"')
        except AwsError as e:
            if e.context.get("aws_code") not in _PRECONDITION_FAILED:
                raise
            log.warning(
                "s3 move: source overwritten after the copy; newer object left in place",
                extra={"src_key": src_key, "dst_key": dst_key},
            )
        except NotFound:
            pass  # deleted by a concurrent attempt of the same move: the copy exists, which is all we need
        return dst

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error (S3 semantics)."""
        with aws_call("s3.delete_object", bucket=self.bucket, key=key):
            self.client.delete_object(Bucket=self.bucket, Key=key)


class RangedObject(io.RawIOBase):
    """A read-only, seekable view of one S3 object; each read is a ranged GET (wrap it in a BufferedReader)."""

    def __init__(self, store: S3Store, key: str, size: int) -> None:
        self._store = store
        self._key = key
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        end = min(self._size, self._pos + len(buffer))
        if end <= self._pos:
            return 0
        data = self._store.get_range(self._key, self._pos, end)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)
