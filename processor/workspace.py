"""What a task step works on (:class:`Workspace`) and where it may write on local disk (:func:`scratch`)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from processor.errors import ConfigError
from processor.landing import Landing, LocalLanding, S3Landing
from processor.log import get_logger
from processor.settings import Settings
from processor.store import LocalStore, S3StagingStore, Store

if TYPE_CHECKING:
    from processor.aws.clients import Clients
    from processor.aws.dynamo import KpiTables, Ledger

log = get_logger("task")


@dataclass
class Workspace:
    """What a task step works on: the landing area, the staging area and, on AWS, the ledger and the KPI tables.

    Built once per task from its settings (AWS clients are created here, never at import); every step is written
    once against it, whether the files are in the landing bucket or on local disk.
    """

    landing: Landing
    staging: Store
    ledger: Ledger | None = None
    kpis: KpiTables | None = None
    clients: Clients | None = None
    #: renews the merge lock's lease while a merge holds it (called with every heartbeat)
    lease: Callable[[], None] | None = field(default=None, repr=False)
    #: lets go of what the task holds (the merge lock) when it stops itself, abandoned by Step Functions
    on_abandon: Callable[[], object] | None = field(default=None, repr=False)

    @classmethod
    def local(cls, root: Path) -> Workspace:
        """Local files; staged data, reports and rejected rows under ``root``; no ledger, no KPI tables."""
        return cls(landing=LocalLanding(root), staging=LocalStore(root))

    @classmethod
    def aws(cls, settings: Settings) -> Workspace:
        from processor.aws import make_clients
        from processor.aws.dynamo import KpiTables, Ledger
        from processor.aws.s3 import S3Store

        if not settings.bucket:
            raise ConfigError("SHOPKPI_BUCKET is not set (the task definition passes it from the stack)")
        clients = make_clients(settings)
        s3 = S3Store(clients.s3, settings.bucket)
        ledger = Ledger(clients.dynamodb, settings.ledger_table) if settings.ledger_table else None
        kpis = None
        if settings.order_table and settings.category_table:
            kpis = KpiTables(
                clients.dynamodb, settings.order_table, settings.category_table, threads=settings.writer_threads
            )
        return cls(
            landing=S3Landing(s3),
            staging=S3StagingStore(s3, "staging", settings.work_dir / "staging-cache"),
            ledger=ledger,
            kpis=kpis,
            clients=clients,
        )


def _work(settings: Settings) -> Path:
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    return settings.work_dir


_SCRATCH = re.compile(r"(?:validate|merge)-(\d+)-\w+")


@contextmanager
def scratch_dir(settings: Settings, kind: str) -> Iterator[Path]:
    """A private scratch directory in the work directory, removed afterwards.

    A killed task cannot clean up, so each directory is named after its process and every task first removes the
    directories of processes that no longer exist (locally, tasks share one work directory; on Fargate each task has
    its own disk and this finds nothing).
    """
    root = _work(settings)
    for old in root.iterdir():
        found = _SCRATCH.fullmatch(old.name)
        if found and old.is_dir() and not _alive(int(found.group(1))):
            log.info("task.scratch_swept", path=str(old))
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
