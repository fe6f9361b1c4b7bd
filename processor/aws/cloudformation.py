"""CloudFormation: stacks (describe, create, follow until they settle, say why they failed) and the change sets
``shopkpi deploy`` goes through.

Used by the orchestration and the command line (``shopkpi deploy``, ``local up``, finding a stack's outputs), never
inside a task. Part of the one adapter layer: clients are passed in, every call goes through
:func:`processor.aws.clients.aws_call`, so callers see only :class:`~processor.errors.ShopKpiError` subclasses.

A deploy goes through a change set rather than ``create_stack``/``update_stack`` so that the person deploying sees
what will be added, modified or replaced before anything happens, and a dry run can show the same plan and then
throw it away. Both a deploy and the embedded stack's ``create_stack`` wait with :meth:`Stacks.wait` and word a
failure with :func:`failure_message`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from processor.aws.clients import aws_call
from processor.errors import AwsError, NotFound, ShopKpiError

__all__ = [
    "Change",
    "ChangeSet",
    "ChangeSets",
    "EventTail",
    "StackOutputs",
    "Stacks",
    "event_line",
    "failure_message",
    "failure_reasons",
    "is_no_change",
    "succeeded",
]

#: Seconds between polls of a change set or a stack. CloudFormation takes seconds to minutes; polling faster only
#: spends API calls (DescribeStacks is throttled per account).
POLL_S = 5.0
#: The template creates IAM roles (unnamed, so CAPABILITY_IAM would do; NAMED_IAM keeps a later named role from
#: failing the deploy with InsufficientCapabilities).
_CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"]
#: What CloudFormation says when a change set would change nothing: the old message (``update_stack``) and the change
#: set one. Such a change set ends FAILED, which is not a failure for a deploy.
_NO_CHANGE_MARKERS = ("didn't contain changes", "No updates are to be performed")
#: Reasons of resources CloudFormation stopped because *another* resource failed: noise next to the real cause.
_CANCELLED_MARKERS = ("Resource creation cancelled", "Resource update cancelled")
#: Stack states in which an operation ended well.
_SUCCESS = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "IMPORT_COMPLETE"})


# --- stacks --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StackOutputs:
    bucket: str
    order_table: str
    category_table: str
    ledger_table: str
    state_machine_arn: str
    buffer_queue_url: str
    buffer_dlq_url: str
    workflow_dlq_url: str
    alert_topic_arn: str
    cluster_arn: str
    task_family: str

    @classmethod
    def from_outputs(cls, outputs: dict[str, str]) -> StackOutputs:
        try:
            return cls(
                bucket=outputs["BucketName"],
                order_table=outputs["OrderTable"],
                category_table=outputs["CategoryTable"],
                ledger_table=outputs["LedgerTable"],
                state_machine_arn=outputs["StateMachineArn"],
                buffer_queue_url=outputs["BufferQueueUrl"],
                buffer_dlq_url=outputs["BufferDeadLetterQueueUrl"],
                workflow_dlq_url=outputs["WorkflowDeadLetterQueueUrl"],
                alert_topic_arn=outputs["AlertTopicArn"],
                cluster_arn=outputs["ClusterArn"],
                task_family=outputs["TaskDefinitionFamily"],
            )
        except KeyError as e:
            raise NotFound(f"stack output {e.args[0]} missing: is this a shopkpi stack?") from e


class Stacks:
    """Describe, create and delete stacks, and follow one until it settles."""

    def __init__(self, client: Any, *, poll_s: float = POLL_S, sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.poll_s = poll_s
        self.sleep = sleep

    def describe(self, stack: str) -> dict[str, Any] | None:
        """The stack's description, or None when no stack of that name exists (deleted stacks are not found)."""
        try:
            with aws_call("cloudformation.describe_stacks", stack=stack):
                found = self.client.describe_stacks(StackName=stack)["Stacks"]
        except ShopKpiError as e:
            # CloudFormation has no "not found" code: a missing stack is a ValidationError "... does not exist".
            if e.context.get("aws_code") == "ValidationError" and "does not exist" in e.message:
                return None
            raise
        return dict(found[0]) if found else None

    def status(self, stack: str) -> str | None:
        found = self.describe(stack)
        return str(found["StackStatus"]) if found else None

    def parameters(self, stack: str) -> dict[str, str]:
        found = self.describe(stack) or {}
        return {p["ParameterKey"]: str(p.get("ParameterValue", "")) for p in found.get("Parameters", [])}

    def outputs(self, stack: str) -> dict[str, str]:
        with aws_call("cloudformation.describe_stacks", stack=stack):
            found = self.client.describe_stacks(StackName=stack)["Stacks"]
        return {o["OutputKey"]: o["OutputValue"] for o in found[0].get("Outputs", [])}

    def create(self, stack: str, body: str, parameters: dict[str, str], timeout_s: float = 600) -> dict[str, str]:
        """Create a stack and wait for it (:meth:`wait`); return its outputs."""
        with aws_call("cloudformation.create_stack", stack=stack):
            created = self.client.create_stack(
                StackName=stack,
                TemplateBody=body,
                Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
                Capabilities=_CAPABILITIES,
            )
        # A new stack: every event it has is this operation's.
        stack_id = str(created["StackId"])
        self.wait(stack_id, timeout_s, tail=EventTail(self.client, stack_id, new_only=False))
        return self.outputs(stack_id)

    def delete(self, stack: str) -> None:
        with aws_call("cloudformation.delete_stack", stack=stack):
            self.client.delete_stack(StackName=stack)

    def events(self, stack: str) -> EventTail:
        """A tail of the stack's events that reports only events newer than now."""
        return EventTail(self.client, stack)

    def wait(
        self,
        stack: str,
        timeout_s: float,
        *,
        tail: EventTail,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> str:
        """Poll until the stack leaves every ``*_IN_PROGRESS`` state, feeding each new event of ``tail`` (made before
        the operation started) to ``progress``; return the final status when the operation succeeded.

        A rollback is waited for to its end, so the events hold the failed resources' reasons. Any other final state
        raises :class:`AwsError` naming each failed resource of this operation with its reason
        (:func:`failure_message`); a timeout raises too (the stack goes on).
        """
        deadline = time.monotonic() + timeout_s
        seen: list[dict[str, Any]] = []

        def follow() -> None:
            for event in tail.new():
                seen.append(event)
                if progress is not None:
                    progress(event)

        while True:
            follow()
            with aws_call("cloudformation.describe_stacks", stack=stack):
                found = self.client.describe_stacks(StackName=stack)["Stacks"][0]
            name, status = str(found["StackName"]), str(found["StackStatus"])
            if not status.endswith("_IN_PROGRESS"):
                # Events written between our last tail and the status read would otherwise be lost.
                follow()
                if succeeded(status):
                    return status
                failed = sorted(
                    {str(e["LogicalResourceId"]) for e in seen if str(e["ResourceStatus"]).endswith("_FAILED")}
                )
                raise AwsError(failure_message(name, status, seen), stack=name, status=status, failed=failed)
            if time.monotonic() > deadline:
                raise AwsError(
                    f"stack {name} still {status} after {timeout_s:.0f} s (it goes on; watch it in the console)",
                    stack=name,
                    status=status,
                )
            self.sleep(self.poll_s)

    def failures(self, stack: str) -> str:
        """Why the stack's latest operations failed, read from its newest page of events (:func:`failure_reasons`)."""
        with aws_call("cloudformation.describe_stack_events", stack=stack):
            events = self.client.describe_stack_events(StackName=stack)["StackEvents"]
        return failure_reasons(list(reversed(events)))


# --- change sets ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """One resource change of a change set."""

    action: str  # Add | Modify | Remove | Import | Dynamic
    logical_id: str
    resource_type: str
    #: For Modify: "True", "False" or "Conditional" (AWS's own strings); None when AWS does not say.
    replacement: str | None = None


@dataclass(frozen=True)
class ChangeSet:
    id: str
    stack_id: str
    status: str  # CREATE_COMPLETE | FAILED (after waiting)
    reason: str
    changes: tuple[Change, ...]

    @property
    def no_change(self) -> bool:
        return is_no_change(self.status, self.reason)


def is_no_change(status: str, reason: str) -> bool:
    return status == "FAILED" and any(m in reason for m in _NO_CHANGE_MARKERS)


def _changes(raw: Iterable[Mapping[str, Any]]) -> list[Change]:
    found: list[Change] = []
    for c in raw:
        rc = c.get("ResourceChange")
        if c.get("Type", "Resource") != "Resource" or not rc:
            continue
        found.append(
            Change(
                action=str(rc.get("Action", "?")),
                logical_id=str(rc.get("LogicalResourceId", "?")),
                resource_type=str(rc.get("ResourceType", "?")),
                replacement=str(rc["Replacement"]) if rc.get("Replacement") else None,
            )
        )
    return found


class ChangeSets:
    """Create, inspect, execute or discard change sets."""

    def __init__(self, client: Any, *, poll_s: float = POLL_S, sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.poll_s = poll_s
        self.sleep = sleep

    def template_defaults(self, template: Mapping[str, str]) -> dict[str, str | None]:
        """The template's parameters and their defaults (None: no default), as CloudFormation parses them.
        ``template`` is ``{"TemplateBody": ...}`` or ``{"TemplateURL": ...}`` (see processor.aws.artifacts)."""
        with aws_call("cloudformation.get_template_summary"):
            summary = self.client.get_template_summary(**template)
        return {
            p["ParameterKey"]: (None if p.get("DefaultValue") is None else str(p["DefaultValue"]))
            for p in summary.get("Parameters", [])
        }

    def create(
        self,
        stack: str,
        template: Mapping[str, str],
        parameters: Mapping[str, str],
        *,
        kind: str,
        keep_previous: Collection[str] = (),
        description: str = "shopkpi deploy",
    ) -> tuple[str, str]:
        """Start creating a change set of ``template`` (``{"TemplateBody": ...}`` or ``{"TemplateURL": ...}``);
        return (change set id, stack id). ``keep_previous`` parameters keep the stack's current values
        (UsePreviousValue, so NoEcho values need not be known)."""
        if kind not in ("CREATE", "UPDATE"):
            raise ValueError(f"change set type must be CREATE or UPDATE, not {kind!r}")
        name = f"shopkpi-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        params: list[dict[str, Any]] = [{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()]
        params += [{"ParameterKey": k, "UsePreviousValue": True} for k in keep_previous if k not in parameters]
        with aws_call("cloudformation.create_change_set", stack=stack, change_set=name):
            r = self.client.create_change_set(
                StackName=stack,
                ChangeSetName=name,
                ChangeSetType=kind,
                **template,
                Parameters=params,
                Capabilities=_CAPABILITIES,
                Description=description,
            )
        return str(r["Id"]), str(r["StackId"])

    def describe(self, change_set_id: str, stack: str) -> ChangeSet:
        """The change set with every change (DescribeChangeSet pages its changes)."""
        args: dict[str, Any] = {"ChangeSetName": change_set_id, "StackName": stack}
        changes: list[Change] = []
        while True:
            with aws_call("cloudformation.describe_change_set", stack=stack, change_set=change_set_id):
                page = self.client.describe_change_set(**args)
            changes += _changes(page.get("Changes", []))
            if not page.get("NextToken"):
                break
            args["NextToken"] = page["NextToken"]
        return ChangeSet(
            id=str(page["ChangeSetId"]),
            stack_id=str(page["StackId"]),
            status=str(page["Status"]),
            reason=str(page.get("StatusReason") or ""),
            changes=tuple(changes),
        )

    def wait(self, change_set_id: str, stack: str, timeout_s: float = 600) -> ChangeSet:
        """Wait until the change set is computed: CREATE_COMPLETE, or FAILED (which includes "no changes": see
        :attr:`ChangeSet.no_change`). Unlike boto3's waiter, a FAILED change set is returned, not raised, so the
        caller can tell "nothing to do" from a real error."""
        deadline = time.monotonic() + timeout_s
        while True:
            with aws_call("cloudformation.describe_change_set", stack=stack, change_set=change_set_id):
                page = self.client.describe_change_set(ChangeSetName=change_set_id, StackName=stack)
            if page["Status"] in ("CREATE_COMPLETE", "FAILED"):
                return self.describe(change_set_id, stack)
            if time.monotonic() > deadline:
                raise AwsError(
                    f"change set of stack {stack} still {page['Status']} after {timeout_s:.0f} s",
                    stack=stack,
                    change_set=change_set_id,
                )
            self.sleep(self.poll_s)

    def execute(self, change_set_id: str, stack: str) -> None:
        with aws_call("cloudformation.execute_change_set", stack=stack, change_set=change_set_id):
            self.client.execute_change_set(ChangeSetName=change_set_id, StackName=stack)

    def delete(self, change_set_id: str, stack: str) -> None:
        with aws_call("cloudformation.delete_change_set", stack=stack, change_set=change_set_id):
            self.client.delete_change_set(ChangeSetName=change_set_id, StackName=stack)


class EventTail:
    """New stack events since the tail was made (with ``new_only=False``: every event of the stack), oldest first.

    DescribeStackEvents lists newest first and pages back through the stack's whole history; a poll reads pages
    only until it meets an event it has already seen, so a long-lived stack costs one call per poll.
    """

    def __init__(self, client: Any, stack: str, *, new_only: bool = True) -> None:
        self.client = client
        self.stack = stack
        self.seen: set[str] = set()
        if new_only:
            # Everything already there is history: marking the newest page is enough, because polls stop at the
            # first seen event.
            self.seen.update(str(e["EventId"]) for e in self._page(None)[0])

    def _page(self, token: str | None) -> tuple[list[dict[str, Any]], str | None]:
        args: dict[str, Any] = {"StackName": self.stack}
        if token:
            args["NextToken"] = token
        with aws_call("cloudformation.describe_stack_events", stack=self.stack):
            page = self.client.describe_stack_events(**args)
        return list(page.get("StackEvents", [])), page.get("NextToken")

    def new(self) -> list[dict[str, Any]]:
        fresh: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            events, token = self._page(token)
            known = False
            for e in events:
                if str(e["EventId"]) in self.seen:
                    known = True
                    break
                fresh.append(e)
            if known or not token:
                break
        self.seen.update(str(e["EventId"]) for e in fresh)
        fresh.reverse()
        return fresh


def event_line(event: Mapping[str, Any]) -> str:
    """One stack event for people: ``12:01:07 LandingBucket AWS::S3::Bucket CREATE_COMPLETE (reason)``."""
    stamp = event.get("Timestamp")
    when = stamp.strftime("%H:%M:%S") if isinstance(stamp, datetime) else str(stamp or "")
    reason = event.get("ResourceStatusReason")
    line = " ".join(
        (
            when,
            str(event.get("LogicalResourceId", "?")),
            str(event.get("ResourceType", "?")),
            str(event.get("ResourceStatus")),
        )
    )
    return f"{line} ({reason})" if reason else line


def failure_message(stack: str, status: str, events: Sequence[Mapping[str, Any]]) -> str:
    """Why a stack operation failed: ``stack S is STATUS: `` and :func:`failure_reasons` of ``events``, the events of
    this operation only (older failures of the stack would mislead)."""
    return f"stack {stack} is {status}: " + failure_reasons(events)


def failure_reasons(events: Sequence[Mapping[str, Any]]) -> str:
    """Each failed resource of ``events`` (oldest first) with its reason.

    Resources that were merely cancelled because another one failed are left out when a real cause is known; the
    stack's own events are used only when no resource reported a reason.
    """
    failed = [e for e in events if str(e.get("ResourceStatus", "")).endswith("_FAILED") and not _is_stack(e)]
    causes = [e for e in failed if not any(m in str(e.get("ResourceStatusReason", "")) for m in _CANCELLED_MARKERS)]
    lines: list[str] = []
    for e in causes or failed:
        reason = e.get("ResourceStatusReason") or "no reason given"
        line = f"{e.get('LogicalResourceId', '?')} ({e.get('ResourceType', '?')}): {reason}"
        if line not in lines:
            lines.append(line)
    if not lines:
        stack_reasons = [
            str(e["ResourceStatusReason"]) for e in events if _is_stack(e) and e.get("ResourceStatusReason")
        ]
        lines = stack_reasons[-1:] or ["no failed resource reported"]
    return "; ".join(lines)


def _is_stack(event: Mapping[str, Any]) -> bool:
    return event.get("ResourceType") == "AWS::CloudFormation::Stack"


def succeeded(status: str) -> bool:
    return status in _SUCCESS
