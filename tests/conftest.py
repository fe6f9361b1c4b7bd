"""Shared fixtures (the row builders they use are in tests/builders.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from moto import mock_aws

from processor.settings import Settings
from tests.builders import WriteCsv, write_rows


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An in-process fake AWS (moto) in us-east-1 with fake credentials: nothing can reach a real account."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with mock_aws():
        yield


@pytest.fixture
def write_csv(tmp_path: Path) -> WriteCsv:
    """``write_csv("orders_part1.csv", [{"order_id": 1, ...}, ...])``: every column of the dataset, blanks for None,
    written to ``tmp_path/<folder>`` (``folder`` defaults to ``in``)."""

    def write(name: str, rows: Sequence[dict[str, object]], folder: str = "in") -> Path:
        return write_rows(tmp_path / folder, name, rows)

    return write


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings of a small local run: 4 staging buckets, scratch under ``tmp_path``."""
    return Settings.load(env={}, buckets=4, work_dir=tmp_path / "work")


#: The landing bucket of :func:`task_stack`.
TASK_BUCKET = "landing"


@pytest.fixture
def task_stack(aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What an ECS task finds on moto: the landing bucket, the three tables, and the stack's names in the
    environment as the task definition passes them (no task token). Returns the settings the task will load."""
    import boto3

    from processor.aws.dynamo import create_tables

    names = create_tables(boto3.client("dynamodb"), "t")
    boto3.client("s3").create_bucket(Bucket=TASK_BUCKET)
    env = {
        "SHOPKPI_BUCKET": TASK_BUCKET,
        "SHOPKPI_ORDER_TABLE": names.order,
        "SHOPKPI_CATEGORY_TABLE": names.category,
        "SHOPKPI_LEDGER_TABLE": names.ledger,
        "SHOPKPI_BUCKETS": "4",
        "SHOPKPI_WORK_DIR": str(tmp_path / "work"),
        "SHOPKPI_EXECUTION_ID": "exec-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SHOPKPI_TASK_TOKEN", raising=False)
    return Settings.load()
