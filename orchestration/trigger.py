"""The event trigger: landed-file events, buffered in SQS, become batched Step Functions executions.

On AWS this is an EventBridge Pipe (``infra/template.yaml``: SQS source, batch size 50, batching window 30 s, Step
Functions target, an input template applied to each record). :class:`LocalPipe` does the same for the embedded stack:
moto stores Pipes but never runs them (gap ``pipes_never_run`` in ``orchestration/local/MOTO_NOTES.md``), so
it reads the buffer queue, gathers a batch for at most ``window_s`` seconds, starts one execution whose input is the
batch as the Pipe delivers it, and deletes the messages once the execution started. The state machine is thus fed
the same input by both: a JSON array of ``{"bucket", "key", "etag"}``, the key URL-encoded as S3 writes it in its
events. Only these three fields travel: 50 whole SQS records (each with its EventBridge event) can pass the 256 KiB
limit of a Pipe's target input, 50 of these cannot (a key is at most 1,024 bytes, 3 KiB encoded).

Duplicates (an object landing twice, an event delivered twice) are not filtered here: a Pipe cannot either. They are
harmless downstream, where a file is identified by (key, ETag) and staged once.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from processor.aws.control import Queue, Workflow
from processor.aws.s3 import event_key
from processor.log import get_logger

log = get_logger("trigger")


def pipe_record(message: dict[str, Any]) -> dict[str, Any]:
    """An SQS message (an EventBridge "Object Created" event) as the Pipe's input template passes it to its target:
    ``{"bucket": <$.body.detail.bucket.name>, "key": <$.body.detail.object.key>, "etag": <$.body.detail.object.etag>}``.

    moto's S3 differs from AWS's in two ways here (gap ``s3_events_differ_from_aws`` in
    ``orchestration/local/MOTO_NOTES.md``), both undone so the workflow sees what it sees on AWS: it writes the key
    as it is, where S3 URL-encodes it, and names the ETag ``eTag``, where S3 writes ``etag``.
    """
    detail = json.loads(message["Body"])["detail"]
    obj = detail["object"]
    return {
        "bucket": detail["bucket"]["name"],
        "key": event_key(obj["key"]),
        "etag": obj.get("etag", obj.get("eTag")),
    }


class LocalPipe:
    def __init__(self, queue: Queue, workflow: Workflow, *, batch_size: int = 50, window_s: float = 2.0) -> None:
        self.queue = queue
        self.workflow = workflow
        self.batch_size = batch_size
        self.window_s = window_s
        self.started: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy = threading.Event()  # set while a batch is gathered and handed over

    def run_once(self) -> str | None:
        """Gather one batch (waiting up to ``window_s`` once the first message is in); start it. None when idle."""
        first = self.queue.receive(self.batch_size, wait_s=1)
        if not first:
            return None
        self.busy.set()
        try:
            batch = list(first)
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.batch_size and time.monotonic() < deadline:
                more = self.queue.receive(self.batch_size - len(batch), wait_s=0)
                if more:
                    batch += more
                else:
                    time.sleep(0.1)
            arn = self.workflow.start([pipe_record(m) for m in batch], name_hint="batch")
            self.queue.delete([m["ReceiptHandle"] for m in batch])
            self.started.append(arn)
            log.info("trigger.batch", files=len(batch), execution=arn)
            return arn
        finally:
            self.busy.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="local-pipe", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as e:  # the loop must outlive a failed call, as a Pipe does; the message stays queued
                log.error("trigger.failed", exc_info=True, error=str(e))
                self._stop.wait(1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
