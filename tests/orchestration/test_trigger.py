"""The local trigger feeds the state machine exactly what the EventBridge Pipe of the template would."""

from __future__ import annotations

import json
import re
from typing import Any

from orchestration.trigger import pipe_record
from processor.aws.s3 import event_key
from tests.infra.test_template import props, the_one


def _apply_pipe_template(template: str, record: dict[str, Any]) -> dict[str, Any]:
    """What a Pipe does with an input template and an SQS record: ``<$.body.x.y>`` paths into the JSON body."""
    body = json.loads(record["body"])

    def value(match: re.Match[str]) -> str:
        found: Any = body
        for part in match.group(1).split("."):
            found = found[part]
        return str(found)

    return dict(json.loads(re.sub(r"<\$\.body\.([\w.-]+)>", value, template)))


def test_local_pipe_passes_each_record_as_the_templates_pipe_does() -> None:
    key = "incoming/orders/red flower+1=2:3 é.csv"
    # What S3 sends on AWS (the key URL-encoded, "etag") and what moto's S3 sends (the key raw, "eTag").
    aws = {"detail": {"bucket": {"name": "b"}, "object": {"key": event_key(key), "etag": "abc", "size": 5}}}
    moto = {"detail": {"bucket": {"name": "b"}, "object": {"key": key, "eTag": "abc", "size": 5}}}
    template = props(the_one("AWS::Pipes::Pipe"))["TargetParameters"]["InputTemplate"]
    expected = _apply_pipe_template(template, {"body": json.dumps(aws)})
    assert expected == {"bucket": "b", "key": "incoming/orders/red+flower%2B1%3D2%3A3+%C3%A9.csv", "etag": "abc"}
    message = {"MessageId": "m", "ReceiptHandle": "r", "Body": json.dumps(moto)}
    assert pipe_record(message) == expected
