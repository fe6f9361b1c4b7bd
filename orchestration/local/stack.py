"""The embedded default: the whole stack on one machine, with no AWS account (``shopkpi local up``, ``demo``).

1. moto in server mode on 127.0.0.1 (in this process, so :class:`MotoPatches` can act on it), Step Functions
   execution switched on;
2. the stack deployed from ``infra/template.yaml`` through moto's CloudFormation, exactly as ``shopkpi deploy`` sends
   it to AWS (same rendered template, same state machine definition);
3. ECS tasks run as local processes of the task definition's command with the state's container overrides applied
   (:mod:`ecs_runner`), the same entry point as the container;
4. a local trigger doing what the EventBridge Pipe does on AWS (:class:`orchestration.trigger.LocalPipe`); S3 ->
   EventBridge -> SQS is moto's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from subprocess import Popen
from typing import Any

from moto.server import ThreadedMotoServer

from orchestration import definition
from orchestration.local.ecs_runner import run_task_locally
from orchestration.local.moto_patches import MotoPatches, enable_execution
from orchestration.template import render_template
from orchestration.trigger import LocalPipe
from processor.aws import make_clients
from processor.aws.clients import Clients
from processor.aws.cloudformation import StackOutputs, Stacks
from processor.aws.control import Queue, Workflow
from processor.errors import ConfigError
from processor.log import get_logger
from processor.settings import Settings

log = get_logger("local")

#: Local tasks start in about a second, so failures can be noticed far sooner than on Fargate.
LOCAL_NUMBERS = {"HeartbeatSeconds": 30, "RetryIntervalSeconds": 1, "MaxConcurrency": 4}


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise :class:`ConfigError` when ``port`` (0: any free one) cannot be bound on ``host``: moto's server would
    otherwise wait forever for a server thread that failed to start. Bound as the server binds (SO_REUSEADDR), so
    a port held only by closed connections in TIME_WAIT counts as free."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"port {port} is in use: pick another with --port", port=port, reason=str(e)) from e


class EmbeddedStack:
    def __init__(
        self,
        settings: Settings,
        *,
        port: int = 0,
        work_dir: Path | None = None,
        numbers: Mapping[str, int] | None = None,
        task_env: Mapping[str, str] | None = None,
        pipe_window_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.port = port
        self.work_dir = (work_dir or settings.work_dir / "local").resolve()
        self.numbers = {**LOCAL_NUMBERS, **(numbers or {})}
        self.task_env = dict(task_env or {})
        self.pipe_window_s = pipe_window_s
        self.processes: list[Popen[bytes]] = []
        # moto's server and its executions start tasks from several threads at once: without the lock, two starts
        # could each drop the other's process from the list (never stopped, never counted).
        self._tracking = threading.Lock()
        self._server: ThreadedMotoServer | None = None
        self._patches: MotoPatches | None = None
        self._saved_env: dict[str, str | None] = {}
        self._saved_sfn_config: dict[str, Any] | None = None
        self.endpoint = ""
        self.clients: Clients | None = None
        self.outputs: StackOutputs | None = None
        self.pipe: LocalPipe | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> EmbeddedStack:
        check_port_free(self.port)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # moto's CloudFormation has no AWS::Pipes::Pipe nor AWS::SQS::QueuePolicy: it skips them with a warning.
        # Locally the Pipe's work is done by LocalPipe and queue policies have no effect, so the warning is noise.
        warnings.filterwarnings("ignore", message="Tried to parse AWS::", category=UserWarning)
        logging.getLogger("moto").setLevel(logging.ERROR)  # "No Moto CloudFormation support for ..."
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        # The execution engine logs every JSONPath that is absent, which a Choice with IsPresent expects.
        logging.getLogger("moto.stepfunctions.parser").setLevel(logging.CRITICAL)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        _, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._export_env()
        self.settings = replace(self.settings, endpoint_url=self.endpoint)
        from moto.core.config import default_user_config

        # moto's settings are process-wide: put them back on stop, so moto used later in this process (tests with
        # mock_aws) gets its non-executing backend again
        self._saved_sfn_config = dict(default_user_config["stepfunctions"])
        enable_execution(self.endpoint)
        self._patches = MotoPatches(self._run_task, server_port=self.port).install()
        self.clients = make_clients(self.settings)
        # moto creates a stack synchronously, so the first poll mostly finds it settled; no need to wait 5 s.
        stacks = Stacks(self.clients.cloudformation, poll_s=1.0)
        outputs = stacks.create(
            self.settings.stack, render_template(self.numbers), {"EnvironmentName": self.settings.stack}
        )
        self.outputs = StackOutputs.from_outputs(outputs)
        self._executable_state_machine()
        self._bucket_events()
        self.pipe = LocalPipe(
            Queue(self.clients.sqs, self.outputs.buffer_queue_url),
            Workflow(self.clients.stepfunctions, self.outputs.state_machine_arn),
            window_s=self.pipe_window_s,
        )
        self.pipe.start()
        log.info("local.up", endpoint=self.endpoint, stack=self.settings.stack, bucket=self.outputs.bucket)
        return self

    def stop(self) -> None:
        if self.pipe:
            self.pipe.stop()
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self._patches:
            self._patches.uninstall()
        if self._server:
            # moto keeps its state in this process: forget it, as a stopped `shopkpi local up` process would, so a
            # stack started later in the same process (tests) begins empty.
            with contextlib.suppress(OSError):
                urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"))
            self._server.stop()
        if self._saved_sfn_config is not None:
            from moto.core.config import default_user_config

            default_user_config["stepfunctions"] = self._saved_sfn_config  # type: ignore[typeddict-item]
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- pieces ------------------------------------------------------------------------------------------------
    def _export_env(self) -> None:
        """This process's own AWS calls (CLI commands, tests) go to the embedded endpoint with fake credentials."""
        for k, v in {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.settings.region,
            "SHOPKPI_STACK": self.settings.stack,
        }.items():
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v

    def _executable_state_machine(self) -> None:
        """Gap ``cloudformation_state_machines_not_executable`` (MOTO_NOTES.md): moto's CloudFormation puts state
        machines in its non-executing backend.

        Create the same state machine (same name, so the same ARN the stack outputs) through the Step Functions API
        in the executing backend, with the definition CloudFormation would have received and the substitutions it
        would have made from the stack's own resources. Remove once moto's CloudFormation creates executable ones.
        """
        assert self.clients and self.outputs
        listed = self.clients.cloudformation.list_stack_resources(StackName=self.settings.stack)
        resources = {
            r["LogicalResourceId"]: r["PhysicalResourceId"]
            for r in listed["StackResourceSummaries"]
            if "LogicalResourceId" in r  # moto lists the resources it cannot create without one
        }
        values = {
            "ClusterArn": self.outputs.cluster_arn,
            "TaskDefinition": self.outputs.task_family,
            "SubnetA": resources["SubnetA"],
            "SubnetB": resources["SubnetB"],
            "SecurityGroup": resources["TaskSecurityGroup"],
            "AssignPublicIp": "ENABLED",
            "AlertTopicArn": self.outputs.alert_topic_arn,
            "DeadLetterQueueUrl": self.outputs.workflow_dlq_url,
            "LedgerTable": self.outputs.ledger_table,
            **{
                f"{kind}TaskRoleArn": f"arn:aws:iam::123456789012:role/{resources[f'{kind}TaskRole']}"
                for kind in ("Validate", "Transform", "Quarantine", "Merge")
            },
        }
        text = definition.substitute(definition.render(self.numbers), values)
        name = self.outputs.state_machine_arn.rsplit(":", 1)[-1]
        role = f"arn:aws:iam::123456789012:role/{self.settings.stack}-states"
        sfn = self.clients.stepfunctions
        arn = sfn.create_state_machine(name=name, definition=text, roleArn=role)["stateMachineArn"]
        if arn != self.outputs.state_machine_arn:
            raise RuntimeError(
                f"executable state machine {arn} differs from the stack's {self.outputs.state_machine_arn}"
            )

    def _bucket_events(self) -> None:
        """moto's CloudFormation ignores the bucket's ``NotificationConfiguration.EventBridgeConfiguration``.

        Gap ``cloudformation_ignores_bucket_eventbridge`` (MOTO_NOTES.md): the deployed bucket has no notification
        configuration, so no S3 event reaches EventBridge. Apply the template's setting through the S3 API. Remove
        once moto's CloudFormation applies it.
        """
        assert self.clients and self.outputs
        self.clients.s3.put_bucket_notification_configuration(
            Bucket=self.outputs.bucket, NotificationConfiguration={"EventBridgeConfiguration": {}}
        )

    def _run_task(self, parameters: dict[str, Any]) -> Popen[bytes]:
        assert self.clients
        env = {
            "SHOPKPI_WORK_DIR": str(self.work_dir / "tasks"),
            "SHOPKPI_HEARTBEAT": str(max(1, self.numbers["HeartbeatSeconds"] // 5)),
            **self.task_env,
        }
        process = run_task_locally(
            parameters,
            endpoint_url=self.endpoint,
            ecs_client=self.clients.client("ecs"),
            extra_env=env,
            log_path=self.work_dir / "tasks.log",
        )
        with self._tracking:
            self.processes = [p for p in self.processes if p.poll() is None] + [process]
        return process

    # --- state -------------------------------------------------------------------------------------------------
    def running_tasks(self) -> int:
        return sum(1 for p in self.processes if p.poll() is None)


def serve_forever(settings: Settings, *, port: int) -> int:
    """``shopkpi local up``: bring the stack up, print how to reach it, run until interrupted."""
    stack = EmbeddedStack(settings, port=port).start()
    assert stack.outputs
    print(
        f"shopkpi embedded stack '{settings.stack}' is up at {stack.endpoint}\n"
        f"  bucket {stack.outputs.bucket}; state machine {stack.outputs.state_machine_arn}\n"
        f"In another shell:\n"
        f"  export AWS_ENDPOINT_URL={stack.endpoint} AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n"
        f"  shopkpi ingest data/sample --wait && shopkpi kpis daily\n"
        f"Task logs: {stack.work_dir / 'tasks.log'}. Ctrl-C stops.",
        flush=True,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0
