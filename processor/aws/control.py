"""Control-plane calls: CloudFormation stacks, Step Functions executions, SQS queues.

Used by the orchestration (deploy, trigger, wait) and the command line, never inside a task. Part of the one adapter
layer: clients are passed in, errors are translated by :func:`processor.aws.clients.aws_call`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from processor.aws.clients import aws_call
from processor.errors import AwsError, NotFound


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
    def __init__(self, client: Any) -> None:
        self.client = client

    def outputs(self, stack: str) -> dict[str, str]:
        with aws_call("cloudformation.describe_stacks", stack=stack):
            found = self.client.describe_stacks(StackName=stack)["Stacks"]
        return {o["OutputKey"]: o["OutputValue"] for o in found[0].get("Outputs", [])}

    def exists(self, stack: str) -> bool:
        try:
            with aws_call("cloudformation.describe_stacks", stack=stack):
                stacks = self.client.describe_stacks(StackName=stack)["Stacks"]
        except (NotFound, AwsError):
            return False
        return bool(stacks) and stacks[0]["StackStatus"] != "DELETE_COMPLETE"

    def create(self, stack: str, body: str, parameters: dict[str, str], timeout_s: float = 600) -> dict[str, str]:
        """Create a stack and wait for it; a failed stack raises naming the failed resources and reasons."""
        with aws_call("cloudformation.create_stack", stack=stack):
            self.client.create_stack(
                StackName=stack,
                TemplateBody=body,
                Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
                Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
            )
        self.wait(stack, timeout_s)
        return self.outputs(stack)

    def wait(self, stack: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            with aws_call("cloudformation.describe_stacks", stack=stack):
                status = self.client.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"]
            if status.endswith("_COMPLETE") and "ROLLBACK" not in status:
                return str(status)
            if status.endswith("FAILED") or "ROLLBACK" in status:
                raise AwsError(f"stack {stack} is {status}: {self.failures(stack)}", stack=stack, status=status)
            if time.monotonic() > deadline:
                raise AwsError(f"stack {stack} still {status} after {timeout_s:.0f} s", stack=stack)
            time.sleep(1)

    def failures(self, stack: str) -> str:
        with aws_call("cloudformation.describe_stack_events", stack=stack):
            events = self.client.describe_stack_events(StackName=stack)["StackEvents"]
        bad = [
            f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason', '')}"
            for e in events
            if str(e.get("ResourceStatus", "")).endswith("FAILED")
        ]
        return "; ".join(bad) or "no failed resource reported"


class Workflow:
    def __init__(self, client: Any, state_machine_arn: str) -> None:
        self.client = client
        self.arn = state_machine_arn

    def start(self, payload: object, name_hint: str = "run") -> str:
        """Start an execution with a unique name (hint + time + random), return its ARN."""
        name = f"{name_hint[:40]}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        with aws_call("stepfunctions.start_execution", state_machine=self.arn):
            r = self.client.start_execution(stateMachineArn=self.arn, name=name, input=orjson.dumps(payload).decode())
        return str(r["executionArn"])

    def executions(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        args: dict[str, Any] = {"stateMachineArn": self.arn, "maxResults": min(limit, 1000)}
        if status:
            args["statusFilter"] = status
        with aws_call("stepfunctions.list_executions", state_machine=self.arn):
            found: list[dict[str, Any]] = self.client.list_executions(**args)["executions"]
        return found

    def describe(self, execution_arn: str) -> dict[str, Any]:
        with aws_call("stepfunctions.describe_execution", execution=execution_arn):
            found: dict[str, Any] = self.client.describe_execution(executionArn=execution_arn)
        return found

    def history(self, execution_arn: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        args: dict[str, Any] = {"executionArn": execution_arn, "maxResults": 1000}
        while True:
            with aws_call("stepfunctions.get_execution_history", execution=execution_arn):
                page = self.client.get_execution_history(**args)
            events += page["events"]
            if not page.get("nextToken"):
                return events
            args["nextToken"] = page["nextToken"]


class Queue:
    def __init__(self, client: Any, url: str) -> None:
        self.client = client
        self.url = url

    def receive(self, max_messages: int = 10, wait_s: int = 1) -> list[dict[str, Any]]:
        with aws_call("sqs.receive_message", queue=self.url):
            got = self.client.receive_message(
                QueueUrl=self.url, MaxNumberOfMessages=min(max_messages, 10), WaitTimeSeconds=wait_s
            )
        messages: list[dict[str, Any]] = got.get("Messages", [])
        return messages

    def delete(self, receipts: list[str]) -> None:
        for i in range(0, len(receipts), 10):
            entries = [{"Id": str(n), "ReceiptHandle": r} for n, r in enumerate(receipts[i : i + 10])]
            with aws_call("sqs.delete_message_batch", queue=self.url):
                self.client.delete_message_batch(QueueUrl=self.url, Entries=entries)

    def send(self, body: str) -> None:
        with aws_call("sqs.send_message", queue=self.url):
            self.client.send_message(QueueUrl=self.url, MessageBody=body)

    def depth(self) -> int:
        """Messages waiting plus messages being handled (received, not yet deleted)."""
        with aws_call("sqs.get_queue_attributes", queue=self.url):
            attrs = self.client.get_queue_attributes(
                QueueUrl=self.url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def drain(self) -> Iterator[dict[str, Any]]:
        """Every message now in the queue (for reading dead letters), deleting none."""
        seen: set[str] = set()
        while True:
            batch = [m for m in self.receive(10, wait_s=0) if m["MessageId"] not in seen]
            if not batch:
                return
            for m in batch:
                seen.add(m["MessageId"])
                yield m


def poll(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> bool:
    """Call ``condition`` until it is true or ``timeout_s`` passes; True when it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()
