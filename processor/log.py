"""Structured JSON logs on stdout, one object per line (the awslogs driver ships them to CloudWatch Logs).

Every line carries ``execution``, ``file`` and ``stage`` from the current context (set once per task with
:func:`context`), so a CloudWatch Logs Insights query such as
``filter execution = "..." and level = "ERROR"`` finds everything one run did.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

_context: ContextVar[dict[str, Any]] = ContextVar("shopkpi_log_context", default={})  # noqa: B039


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = _context.get()
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            "execution": ctx.get("execution", "local"),
            "file": ctx.get("file"),
            "stage": ctx.get("stage"),
        }
        body.update(getattr(record, "fields", {}))
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


class EventLogger:
    """``log.info("event.name", key=value, ...)``: an event name plus fields, never a formatted sentence."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, exc_info: bool = False, **fields: Any) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, **fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info=exc_info, **fields)


def get_logger(name: str) -> EventLogger:
    return EventLogger(logging.getLogger(f"shopkpi.{name}"))


def configure(level: str = "INFO", stream: Any = None) -> None:
    """Send the project's logs as JSON lines to ``stream`` (stdout by default). Idempotent."""
    root = logging.getLogger("shopkpi")
    root.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add fields (execution, file, stage) to every log line emitted inside the block."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)
