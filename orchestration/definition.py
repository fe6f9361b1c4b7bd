"""The state machine definition: one ASL file, rendered for CloudFormation and for the embedded stack alike.

``statemachine.asl.json`` is valid JSON in which deploy-time values are ``"${Name}"`` placeholders:

* **numbers** (``MaxConcurrency``, timeouts, heartbeat, retry interval) must become JSON numbers, which
  CloudFormation's ``DefinitionSubstitutions`` cannot do (it substitutes text inside strings), so :func:`render`
  replaces them before the template is deployed;
* **deadlines** (``ValidateDeadline``...) are numbers derived from the timeouts, written as strings, because they
  travel as container environment values: a task stops itself at its deadline, just before its state times out;
* **names and ARNs** (cluster, task definition, subnets, topic, queue) are left for CloudFormation's
  ``DefinitionSubstitutions``, which resolves them from the stack's own resources. Nothing account-specific is
  written in the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

NUMBERS: dict[str, int] = {
    "MaxConcurrency": 10,  # files validated in parallel per execution
    "ValidateTimeoutSeconds": 3600,  # a multi-GB file streams in minutes; an hour means it hangs
    "StepTimeoutSeconds": 900,  # transform / quarantine: a commit and a move
    "MergeTimeoutSeconds": 3600,
    # Tasks beat at once, then every 30 s; the window also covers a Fargate cold start (image pull) before the first.
    "HeartbeatSeconds": 300,
    "RetryIntervalSeconds": 5,
    "ExecutionTimeoutSeconds": 4 * 3600,  # a whole batch; past it the execution times out (and the alarm fires)
}
STRINGS = (
    "ClusterArn",
    "TaskDefinition",
    "SubnetA",
    "SubnetB",
    "SecurityGroup",
    "AssignPublicIp",
    "AlertTopicArn",
    "DeadLetterQueueUrl",
    "LedgerTable",
    # each task kind runs with its own role: validate, which parses untrusted files, never holds merge's rights
    "ValidateTaskRoleArn",
    "TransformTaskRoleArn",
    "QuarantineTaskRoleArn",
    "MergeTaskRoleArn",
)
#: Deadline placeholder -> the timeout it derives from (see :func:`deadline`).
DEADLINES = {
    "ValidateDeadline": "ValidateTimeoutSeconds",
    "StepDeadline": "StepTimeoutSeconds",
    "MergeDeadline": "MergeTimeoutSeconds",
}
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def deadline(timeout_s: int) -> int:
    """Seconds after which a task stops itself: a tenth (at most a minute) before its state's timeout, so that no
    container outlives the state waiting for it (Step Functions never stops one)."""
    return timeout_s - min(60, max(1, timeout_s // 10))


def source() -> str:
    return resources.files("orchestration").joinpath("statemachine.asl.json").read_text()


def render(numbers: Mapping[str, int] | None = None) -> str:
    """The definition with numeric placeholders replaced; string placeholders are kept for CloudFormation."""
    values = {**NUMBERS, **(numbers or {})}
    text = source()
    for name, value in values.items():
        text = text.replace(f'"${{{name}}}"', str(int(value)))
    for name, timeout in DEADLINES.items():
        text = text.replace(f'"${{{name}}}"', f'"{deadline(int(values[timeout]))}"')
    left = set(_PLACEHOLDER.findall(text)) - set(STRINGS)
    if left:
        raise ValueError(f"unknown placeholders in the state machine definition: {sorted(left)}")
    return text


def substitute(text: str, strings: Mapping[str, str]) -> str:
    """What CloudFormation's DefinitionSubstitutions does, for checks and tests."""
    missing = set(_PLACEHOLDER.findall(text)) - set(strings)
    if missing:
        raise ValueError(f"no value for placeholders {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda m: strings[m.group(1)], text)


def placeholders() -> set[str]:
    return set(_PLACEHOLDER.findall(source()))


def parsed(numbers: Mapping[str, int] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(render(numbers))
    return data
