"""The one settings object. An explicit argument beats the environment, which beats the default.

Every field is documented here and in the README's settings table; the environment variable is the field name in
upper case with the ``SHOPKPI_`` prefix, except for the standard AWS variables.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from processor.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``"24h"``, ``"90m"``, ``"3600"`` (seconds) -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"not a duration: {text!r} (use e.g. 3600, 90m, 24h, 2d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_share(text: str) -> float:
    """``"0.05"`` or ``"5%"`` -> 0.05."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError as e:
        raise ConfigError(f"not a share: {text!r} (use e.g. 0.05 or 5%)") from e
    if not 0 <= value <= 1:
        raise ConfigError(f"share out of range 0..1: {text!r}")
    return value


@dataclass(frozen=True)
class Settings:
    #: Name of the deployed CloudFormation stack whose outputs name bucket, tables and state machine.
    stack: str = field(default="shopkpi", metadata={"env": "SHOPKPI_STACK"})
    #: When set, every AWS call goes to this endpoint (the embedded moto server); else the standard chain.
    endpoint_url: str | None = field(default=None, metadata={"env": "AWS_ENDPOINT_URL"})
    #: AWS region.
    region: str = field(default="us-east-1", metadata={"env": "AWS_DEFAULT_REGION"})
    #: Landing bucket (incoming/, archive/, rejected/, staging/); normally read from the stack outputs.
    bucket: str | None = field(default=None, metadata={"env": "SHOPKPI_BUCKET"})
    #: DynamoDB table of order-level (daily) KPIs.
    order_table: str | None = field(default=None, metadata={"env": "SHOPKPI_ORDER_TABLE"})
    #: DynamoDB table of category-level KPIs.
    category_table: str | None = field(default=None, metadata={"env": "SHOPKPI_CATEGORY_TABLE"})
    #: DynamoDB table of file outcomes, runs, the merge lock and the generation counter.
    ledger_table: str | None = field(default=None, metadata={"env": "SHOPKPI_LEDGER_TABLE"})
    #: Share of invalid rows above which a whole file is rejected ("0.05" or "5%").
    max_invalid_share: float = field(default=0.05, metadata={"env": "SHOPKPI_MAX_INVALID_SHARE"})
    #: How long an item may wait for its order or product before it is reported as an orphan ("24h").
    orphan_grace_s: float = field(default=86400.0, metadata={"env": "SHOPKPI_ORPHAN_GRACE"})
    #: Hash buckets of the staging area (orders and items by order_id). Fixed once data is staged.
    buckets: int = field(default=32, metadata={"env": "SHOPKPI_BUCKETS"})
    #: Megabytes of CSV per streamed chunk while validating; bounds the memory of the validation pass.
    chunk_mb: int = field(default=8, metadata={"env": "SHOPKPI_CHUNK_MB"})
    #: Kibibytes a CSV record may take; a longer one is a rejected row (``record_too_long``), skipped without ever
    #: being held whole, and so is the rest of a file behind an unclosed quote. Also bounds the header row.
    max_record_kb: int = field(default=1024, metadata={"env": "SHOPKPI_MAX_RECORD_KB"})
    #: Mebibytes above which an uncompressed file is validated by parallel tasks, one per part (see
    #: processor.split); 0 never splits. The default suits Fargate: splitting adds two task starts (30-60 s each),
    #: which a file pays back from about 10-20 GB (docs/workflow.md, measured).
    split_mb: float = field(default=16384.0, metadata={"env": "SHOPKPI_SPLIT_MB"})
    #: Mebibytes of a split file per part (at most SHOPKPI_MAX_PARTS parts: bigger parts beyond that).
    part_mb: float = field(default=1024.0, metadata={"env": "SHOPKPI_PART_MB"})
    #: Most parts one file is split into (and so most tasks validating one file at once).
    max_parts: int = field(default=16, metadata={"env": "SHOPKPI_MAX_PARTS"})
    #: Staged rows (orders + items) the merge recomputes in one pass; bounds the merge's memory.
    merge_rows: int = field(default=1_000_000, metadata={"env": "SHOPKPI_MERGE_ROWS"})
    #: Parts a first load's merge is split into (by staging bucket): parallel ECS tasks on AWS, threads locally
    #: (at most one per core). 1 never splits. See processor.fanout.
    merge_parts: int = field(default=8, metadata={"env": "SHOPKPI_MERGE_PARTS"})
    #: Threads that run a fanned-out merge's parts in one process (``shopkpi process``); 0, the default, is half
    #: the cores this process may use: polars already keeps about two cores busy for one part (measured on 2 cores:
    #: two parts side by side took as long as the merge in one). Below 2, the local merge is not fanned out.
    merge_threads: int = field(default=0, metadata={"env": "SHOPKPI_MERGE_THREADS"})
    #: Staged rows (orders + items) from which a first load's merge is split into SHOPKPI_MERGE_PARTS parts. The
    #: default (about 8.5 GB of CSV) suits Fargate: a fan-out adds two task starts, which a merge pays back from
    #: about 100-250 M rows (docs/performance.md, measured); lower it where parts start at once (threads).
    fanout_rows: int = field(default=100_000_000, metadata={"env": "SHOPKPI_FANOUT_ROWS"})
    #: Local scratch directory (ECS ephemeral storage); large inputs are streamed to it, never held in memory.
    work_dir: Path = field(default=Path(tempfile.gettempdir()) / "shopkpi", metadata={"env": "SHOPKPI_WORK_DIR"})
    #: Parallel DynamoDB batch writers.
    writer_threads: int = field(default=4, metadata={"env": "SHOPKPI_WRITER_THREADS"})
    #: Lease of the merge lock, in seconds ("15m"); a merge that outlives it loses the right to publish.
    lock_ttl_s: float = field(default=900.0, metadata={"env": "SHOPKPI_LOCK_TTL"})
    #: Seconds between Step Functions task heartbeats (must be well under the state's HeartbeatSeconds).
    heartbeat_s: float = field(default=30.0, metadata={"env": "SHOPKPI_HEARTBEAT"})
    #: Seconds after its start at which a task stops itself, whatever it is doing (0: never). The state machine sets
    #: it just under the state's timeout: Step Functions never stops a container it no longer waits for.
    task_deadline_s: float = field(default=0.0, metadata={"env": "SHOPKPI_TASK_DEADLINE"})
    #: Execution id put on every log line (the Step Functions execution name or ARN).
    execution_id: str = field(default="local", metadata={"env": "SHOPKPI_EXECUTION_ID"})
    #: Log level of the JSON logs.
    log_level: str = field(default="INFO", metadata={"env": "SHOPKPI_LOG_LEVEL"})

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings: ``overrides`` (non-None) beat ``env`` (default ``os.environ``), which beats defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
                continue
            names = [f.metadata["env"]]
            if f.name == "region":
                names = ["AWS_REGION", "AWS_DEFAULT_REGION"]
            found = next(((n, env[n]) for n in names if env.get(n)), None)
            if found is not None:
                values[f.name] = _convert(f.name, *found)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.buckets < 1 or self.buckets > 4096:
            raise ConfigError(f"SHOPKPI_BUCKETS must be 1..4096, got {self.buckets}")
        if self.chunk_mb < 1:
            raise ConfigError(f"SHOPKPI_CHUNK_MB must be a positive number of megabytes, got {self.chunk_mb}")
        if self.merge_rows < 1:
            raise ConfigError(f"SHOPKPI_MERGE_ROWS must be a positive number of rows, got {self.merge_rows}")
        if self.max_record_kb < 1:
            raise ConfigError(f"SHOPKPI_MAX_RECORD_KB must be positive, got {self.max_record_kb}")
        if self.split_mb < 0 or self.part_mb <= 0 or self.max_parts < 1:
            raise ConfigError("SHOPKPI_SPLIT_MB must be >= 0 (0: never), SHOPKPI_PART_MB > 0, SHOPKPI_MAX_PARTS >= 1")
        if self.merge_threads < 0:
            raise ConfigError(f"SHOPKPI_MERGE_THREADS must be >= 0 (0: half the cores), got {self.merge_threads}")
        if self.merge_parts < 1 or self.fanout_rows < 1:
            raise ConfigError("SHOPKPI_MERGE_PARTS and SHOPKPI_FANOUT_ROWS must be positive (1 part: never split)")
        if self.writer_threads < 1:
            raise ConfigError(f"SHOPKPI_WRITER_THREADS must be positive, got {self.writer_threads}")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(f"AWS_ENDPOINT_URL must start with http:// or https://, got {self.endpoint_url!r}")


_INTEGERS = frozenset(
    (
        "buckets",
        "chunk_mb",
        "max_record_kb",
        "merge_rows",
        "writer_threads",
        "max_parts",
        "merge_parts",
        "fanout_rows",
        "merge_threads",
    )
)


def _convert(name: str, var: str, raw: str) -> Any:
    """The value of field ``name`` given as text in environment variable ``var``."""
    try:
        if name == "max_invalid_share":
            return parse_share(raw)
        if name in ("orphan_grace_s", "lock_ttl_s", "heartbeat_s", "task_deadline_s"):
            return parse_duration(raw)
        if name in _INTEGERS:
            return int(raw)
        if name in ("split_mb", "part_mb"):
            return float(raw)
        if name == "work_dir":
            return Path(raw)
    except ConfigError as e:  # a duration or a share: the parser says what it expects
        raise ConfigError(f"{var}: {e}") from e
    except ValueError as e:
        kind = "a whole number" if name in _INTEGERS else "a number"
        raise ConfigError(f"{var}={raw!r} is not {kind}") from e
    return raw
