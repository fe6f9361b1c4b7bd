"""Control-plane calls: Step Functions executions and SQS queues (stacks are :mod:`processor.aws.cloudformation`'s).

Used by the orchestration (trigger, wait) and the command line, never inside a task. Part of the one adapter
layer: clients are passed in, errors are translated by :func:`processor.aws.clients.aws_call`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from processor.aws.clients import aws_call


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
