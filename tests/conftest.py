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
