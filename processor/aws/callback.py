"""A task's Step Functions callback: SendTaskSuccess, SendTaskFailure and SendTaskHeartbeat for one task token.

The calls go through :func:`processor.aws.clients.aws_call` like every other AWS call, so a throttled or failed
report is a :class:`ShopKpiError` with a stable code. Two AWS rules that moto does not enforce are kept here:

* a task's output is at most 256 KiB (``States.DataLimitExceeded`` otherwise, which no ``States.ALL`` catches), so
  :func:`bounded` shrinks a result long before that (the whole report is in S3 anyway);
* a token whose state has timed out or whose execution has ended answers ``TaskTimedOut`` (or
  ``TaskDoesNotExist``): :meth:`Callback.heartbeat` reports it as dead, so the task can stop instead of working on
  for nobody. ``InvalidToken`` counts as dead only once the token has been accepted before: moto answers it both
  for an ended execution and, in a race, for a task whose first beat comes before its token is registered.
"""

from __future__ import annotations

from typing import Any

import orjson

from processor.aws.clients import aws_call
from processor.errors import ShopKpiError

#: What a task sends: far below the limit, because a Map iteration's state carries the result beside its input.
RESULT_LIMIT = 8 * 1024
#: Bytes of a failure's cause sent to Step Functions (the whole error is in the task's log).
CAUSE_LIMIT = 8 * 1024
#: What the state machine reads from a result; kept when everything else must go.
ESSENTIAL = ("file_id", "source", "outcome", "reason", "duplicate", "rows", "valid_rows", "report", "rejects")
_DEAD_TOKEN = frozenset({"TaskTimedOut", "TaskDoesNotExist"})
_LONG_TEXT = 1000
_LONG_LIST = 50


def _encode(value: object) -> bytes:
    return orjson.dumps(value, default=str)


def _shrink(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _LONG_TEXT:
        return f"{value[:_LONG_TEXT]}... ({len(value) - _LONG_TEXT} more characters: see the report)"
    if isinstance(value, list) and len(value) > _LONG_LIST:
        return [_shrink(v) for v in value[:_LONG_LIST]] + [f"... {len(value) - _LONG_LIST} more: see the report"]
    if isinstance(value, list):
        return [_shrink(v) for v in value]
    if isinstance(value, dict):
        return {k: _shrink(v) for k, v in value.items()}
    return value


def bounded(result: dict[str, Any], limit: int = RESULT_LIMIT) -> dict[str, Any]:
    """``result`` as sent to Step Functions: unchanged when small; else long texts and lists cut, and, if that is
    not enough, only the :data:`ESSENTIAL` fields with ``"truncated": true``."""
    if len(_encode(result)) <= limit:
        return result
    shrunk = _shrink(result)
    if len(_encode(shrunk)) <= limit:
        return {**shrunk, "truncated": True}
    essential = {k: _shrink(result[k]) for k in ESSENTIAL if k in result}
    return {**essential, "truncated": True}


class Callback:
    """The callback of one task token."""

    def __init__(self, stepfunctions: Any, token: str) -> None:
        self.sfn = stepfunctions
        self.token = token
        self._accepted = False  # a heartbeat went through: the token was valid

    def heartbeat(self) -> bool:
        """Tell Step Functions the task is alive. False when the token is dead: nobody waits for this task."""
        try:
            with aws_call("stepfunctions.send_task_heartbeat"):
                self.sfn.send_task_heartbeat(taskToken=self.token)
        except ShopKpiError as e:
            code = e.context.get("aws_code")
            if code in _DEAD_TOKEN or (code == "InvalidToken" and self._accepted):
                return False
            raise
        self._accepted = True
        return True

    def succeed(self, result: dict[str, Any]) -> None:
        with aws_call("stepfunctions.send_task_success"):
            self.sfn.send_task_success(taskToken=self.token, output=_encode(bounded(result)).decode())

    def fail(self, code: str, cause: str) -> None:
        with aws_call("stepfunctions.send_task_failure", error=code):
            # AWS allows a cause of 32,768 characters, but a Catch puts it into the state beside the batch (50 files
            # with their keys): a few KiB say what went wrong and keep that state far from the 256 KiB limit.
            short = cause.encode()[:CAUSE_LIMIT].decode(errors="ignore")
            self.sfn.send_task_failure(taskToken=self.token, error=code[:256], cause=short)
