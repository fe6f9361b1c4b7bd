"""Fixtures shared with the processor tests: the CLI tests write small case files the same way."""

from __future__ import annotations

from tests.processor.conftest import settings, write_csv

__all__ = ["settings", "write_csv"]
