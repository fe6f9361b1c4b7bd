"""The staging area as a small key/file store, on local disk or in S3.

The merge and the tasks see only this interface, so the same code stages into a directory (``shopkpi process``) or
under ``staging/`` of the landing bucket (the ECS tasks). Objects are immutable once written except the one state
head (``state/head.json``), which only the holder of the merge lock writes.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from processor.errors import ConfigError

if TYPE_CHECKING:
    from processor.aws.s3 import S3Store


class Store(Protocol):
    def put_file(self, local: Path, key: str) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def local_path(self, key: str) -> Path:
        """A local file holding the object (the object itself on disk; a cached download from S3)."""
        ...

    def open(self, key: str) -> IO[bytes]:
        """A seekable reader of the object: reads fetch only the byte ranges asked for (S3 range GETs)."""
        ...

    def list_keys(self, prefix: str) -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...
    def copy(self, src: str, dst: str) -> None:
        """Copy an object within the store without reading it here (S3: a server-side copy)."""
        ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        if root.exists() and not root.is_dir():  # `--staging FILE`, in the CLI and the tasks alike
            raise ConfigError(f"the staging directory {root} is a file: give a directory (it is created if missing)")
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, local: Path, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            # The files put here are written once in scratch space and never changed: a hard link stores them
            # without writing them a second time (on another file system, or where links are refused, a copy).
            os.link(local, tmp)
        except OSError:
            shutil.copyfile(local, tmp)
        tmp.replace(dest)  # atomic: readers see the old object or the whole new one

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)

    def copy(self, src: str, dst: str) -> None:
        self.put_file(self._path(src), dst)  # objects are never changed in place: a hard link is a copy

    def get_bytes(self, key: str) -> bytes | None:
        p = self._path(key)
        return p.read_bytes() if p.exists() else None

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def open(self, key: str) -> IO[bytes]:
        return self._path(key).open("rb")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the staging directory's merge lock (an OS file lock: released by the kernel if the process dies,
        so a killed run never leaves it stuck). A second merge on the same directory waits its turn."""
        path = self.root / ".merge.lock"
        with path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)
        folder = base if base.is_dir() else base.parent
        if not folder.exists():
            return
        for p in sorted(folder.rglob("*")):
            key = p.relative_to(self.root).as_posix()
            if p.is_file() and key.startswith(prefix) and not key.endswith(".tmp"):
                yield key

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3StagingStore:
    """The staging area under ``prefix`` of a bucket; downloads are cached on local disk.

    A cached copy is named after the object's ETag and found through a HEAD request, so it is read only while the
    object is the one that was downloaded. Keys alone are not enough: another stack on the same machine (the embedded
    stack started again, with generation numbers starting again at 1) writes other objects under the same keys.
    """

    def __init__(self, s3: S3Store, prefix: str, cache_dir: Path) -> None:
        self.s3 = s3
        self.prefix = prefix.rstrip("/") + "/"
        self.cache = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)

    def _cached(self, key: str) -> Path:
        etag = self.s3.head(self.prefix + key).etag
        return self.cache / f"{key}{_VERSION}{etag}"

    def put_file(self, local: Path, key: str) -> None:
        self.s3.upload(local, self.prefix + key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.s3.put_bytes(self.prefix + key, data)

    def copy(self, src: str, dst: str) -> None:
        self.s3.copy(self.prefix + src, self.prefix + dst)

    def get_bytes(self, key: str) -> bytes | None:
        if not self.s3.exists(self.prefix + key):
            return None
        return self.s3.get_bytes(self.prefix + key)

    def local_path(self, key: str) -> Path:
        dest = self._cached(key)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            name = dest.name.rpartition(_VERSION)[0]
            # Other versions of this key are never read again. Not this version (another task sharing the cache,
            # as the embedded stack's do, may have just downloaded it and be reading it) nor a download in progress.
            for stale in dest.parent.glob(f"*{_VERSION}*"):
                key_name, _, version = stale.name.rpartition(_VERSION)
                downloading = "." in version  # <etag>.<id>.part, and the transfer's own <...>.part.<random>
                if key_name == name and stale.name != dest.name and not downloading:
                    stale.unlink(missing_ok=True)
            tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.part")
            self.s3.download(self.prefix + key, tmp)
            tmp.replace(dest)
        return dest

    def open(self, key: str) -> IO[bytes]:
        cached = self._cached(key)
        if cached.exists():
            return cached.open("rb")
        return io.BufferedReader(self.s3.open_ranged(self.prefix + key), buffer_size=1 << 20)

    def list_keys(self, prefix: str) -> Iterator[str]:
        for key in self.s3.list_keys(self.prefix + prefix):
            yield key[len(self.prefix) :]

    def delete(self, key: str) -> None:
        self.s3.delete(self.prefix + key)


#: Separates a cached object's key from its ETag in the cache's file names.
_VERSION = "@etag-"
