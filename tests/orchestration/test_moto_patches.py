"""The patched moto server executes our kind of ASL: ECS tasks as local processes reporting through their task token.

One in-process moto server (ThreadedMotoServer on a free port, Step Functions execution on) for the module; the
state machines are created through the Step Functions API, as the local runner will do.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import boto3
import moto
import pytest
from moto.core.config import default_user_config
from moto.server import ThreadedMotoServer

from orchestration.local.ecs_runner import run_task_locally
from orchestration.local.moto_ecs import LocalEcsTask
from orchestration.local.moto_patches import PATCHES, MotoPatches, Runner, enable_execution
from processor.aws.dynamo import create_tables

pytestmark = pytest.mark.slow

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/shopkpi-states"
CONTAINER = "processor"


@dataclass
class Stack:
    endpoint: str
    port: int
    cluster: str = "shopkpi"
    family: str = "shopkpi-task"
    processes: list[Popen[bytes]] = field(default_factory=list)

    def client(self, service: str) -> Any:
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The server, the stack's resources (bucket, tables, cluster, task definition), the patches installed."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()  # port=0: the OS picked a free one
    s = Stack(endpoint=f"http://127.0.0.1:{port}", port=port)
    saved_config = dict(default_user_config["stepfunctions"])
    try:
        enable_execution(s.endpoint)
        names = create_tables(s.client("dynamodb"), f"t{uuid.uuid4().hex[:8]}")
        bucket = f"landing-{uuid.uuid4().hex[:8]}"
        s.client("s3").create_bucket(Bucket=bucket)
        ecs = s.client("ecs")
        ecs.create_cluster(clusterName=s.cluster)
        # As the stack registers it: the image's entry point, no default command, the stack's names in the env.
        ecs.register_task_definition(
            family=s.family,
            requiresCompatibilities=["FARGATE"],
            networkMode="awsvpc",
            cpu="1024",
            memory="2048",
            containerDefinitions=[
                {
                    "name": CONTAINER,
                    "image": "shopkpi:local",
                    "essential": True,
                    "entryPoint": ["shopkpi-task"],
                    "command": [],
                    "environment": [
                        {"name": "SHOPKPI_BUCKET", "value": bucket},
                        {"name": "SHOPKPI_ORDER_TABLE", "value": names.order},
                        {"name": "SHOPKPI_CATEGORY_TABLE", "value": names.category},
                        {"name": "SHOPKPI_LEDGER_TABLE", "value": names.ledger},
                        {"name": "SHOPKPI_BUCKETS", "value": "4"},
                    ],
                }
            ],
        )
        yield s
    finally:
        for p in s.processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        default_user_config["stepfunctions"] = saved_config  # type: ignore[typeddict-item]
        server.stop()


#: Installs the patches with this runner for one test (uninstalled after it), calling this server's port.
PatchMoto = Callable[[Runner], MotoPatches]


@pytest.fixture
def patch_moto(stack: Stack) -> Iterator[PatchMoto]:
    installed: list[MotoPatches] = []

    def install(runner: Runner) -> MotoPatches:
        installed.append(MotoPatches(runner, server_port=stack.port).install())
        return installed[-1]

    yield install
    for patches in installed:
        patches.uninstall()


def _ecs_runner(stack: Stack, work: Path) -> Runner:
    ecs = stack.client("ecs")

    def run(parameters: dict[str, Any]) -> Popen[bytes]:
        process = run_task_locally(
            parameters,
            endpoint_url=stack.endpoint,
            ecs_client=ecs,
            extra_env={"SHOPKPI_WORK_DIR": str(work)},
            log_path=work / "task.log",
        )
        stack.processes.append(process)
        return process

    return run


def _run_task_state(stack: Stack, command: list[str], **state: Any) -> dict[str, Any]:
    """A Task state as the real definition writes it: ECS RunTask, wait for the token the container reports."""
    return {
        "Type": "Task",
        "Resource": "arn:aws:states:::ecs:runTask.waitForTaskToken",
        "Parameters": {
            "Cluster": stack.cluster,
            "TaskDefinition": stack.family,
            "LaunchType": "FARGATE",
            "Overrides": {
                "ContainerOverrides": [
                    {
                        "Name": CONTAINER,
                        "Command": command,
                        "Environment": [
                            {"Name": "SHOPKPI_TASK_TOKEN", "Value.$": "$$.Task.Token"},
                            {"Name": "SHOPKPI_EXECUTION_ID", "Value.$": "$$.Execution.Name"},
                        ],
                    }
                ]
            },
        },
        **state,
    }


def _execute(stack: Stack, definition: dict[str, Any], payload: Any = None, timeout: float = 30) -> dict[str, Any]:
    """Create a state machine, run it to the end; the describe_execution answer (output decoded)."""
    sfn = stack.client("stepfunctions")
    arn = sfn.create_state_machine(name=f"sm-{uuid.uuid4().hex[:12]}", definition=json.dumps(definition), roleArn=ROLE)[
        "stateMachineArn"
    ]
    execution = sfn.start_execution(stateMachineArn=arn, input=json.dumps(payload or {}))["executionArn"]
    return _wait(sfn, execution, timeout)


def _wait(sfn: Any, execution: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (described := sfn.describe_execution(executionArn=execution))["status"] == "RUNNING":
        assert time.monotonic() < deadline, f"{execution} still running after {timeout}s"
        time.sleep(0.1)
    described["output"] = json.loads(described.get("output") or "null")
    return dict(described)


def _history(stack: Stack, execution: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = stack.client("stepfunctions").get_execution_history(executionArn=execution)["events"]
    return events


def test_wait_for_task_token_runs_the_real_task_and_takes_its_reported_result(
    stack: Stack, patch_moto: PatchMoto, tmp_path: Path
) -> None:
    patch_moto(_ecs_runner(stack, tmp_path))
    definition = {
        "StartAt": "Merge",
        "States": {
            "Merge": _run_task_state(
                stack,
                ["merge"],
                TimeoutSeconds=60,
                Retry=[
                    {
                        "ErrorEquals": ["ShopKpi.Throttled", "ShopKpi.ServiceUnavailable", "ShopKpi.LockBusy"],
                        "IntervalSeconds": 1,
                        "MaxAttempts": 2,
                        "BackoffRate": 2.0,
                    }
                ],
                Catch=[{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "MergeFailed"}],
                ResultPath="$.merge",
                End=True,
            ),
            "MergeFailed": {"Type": "Fail", "Error": "MergeFailed"},
        },
    }

    done = _execute(stack, definition, {"trigger": "test"})

    assert done["status"] == "SUCCEEDED", done
    # Exactly what the container printed as its result line is what it sent with SendTaskSuccess.
    lines = [json.loads(line) for line in (tmp_path / "task.log").read_text().splitlines() if line.startswith("{")]
    reported = next(line for line in lines if line.get("event") == "task.result")
    assert reported["ok"] is True
    assert done["output"] == {
        "trigger": "test",
        "merge": {k: v for k, v in reported.items() if k not in ("event", "ok")},
    }
    assert done["output"]["merge"]["generation"] == 1
    assert [p.wait(timeout=10) for p in stack.processes] == [0]
    events = _history(stack, done["executionArn"])
    types = [e["type"] for e in events]
    assert types[:5] == ["ExecutionStarted", "TaskStateEntered", "TaskScheduled", "TaskStarted", "TaskSubmitted"]
    assert types[-3:] == ["TaskSucceeded", "TaskStateExited", "ExecutionSucceeded"]
    scheduled = json.loads(events[2]["taskScheduledEventDetails"]["parameters"])
    env = {e["Name"]: e["Value"] for e in scheduled["Overrides"]["ContainerOverrides"][0]["Environment"]}
    assert len(env["SHOPKPI_TASK_TOKEN"]) >= 32  # resolved from $$.Task.Token
    assert env["SHOPKPI_EXECUTION_ID"] == done["name"]


@pytest.mark.parametrize(
    ("timeouts", "within"),
    [({"TimeoutSeconds": 2}, 10.0), ({"HeartbeatSeconds": 2, "TimeoutSeconds": 60}, 10.0)],
    ids=["timeout", "heartbeat"],
)
def test_task_exiting_without_reporting_times_out_into_the_catch(
    stack: Stack, patch_moto: PatchMoto, tmp_path: Path, timeouts: dict[str, int], within: float
) -> None:
    patch_moto(_ecs_runner(stack, tmp_path))
    # `--help` prints usage and exits 0 without ever calling SendTaskSuccess/Failure: a lost task.
    definition = {
        "StartAt": "Lost",
        "States": {
            "Lost": _run_task_state(
                stack,
                ["--help"],
                **timeouts,
                Catch=[{"ErrorEquals": ["States.Timeout"], "ResultPath": "$.error", "Next": "Recovered"}],
                End=True,
            ),
            "Recovered": {"Type": "Pass", "End": True},
        },
    }
    started = time.monotonic()

    done = _execute(stack, definition, {"file": "x"})

    assert time.monotonic() - started < within  # the heartbeat fired, not the 60 s timeout
    assert done["status"] == "SUCCEEDED", done
    # moto reports a missed heartbeat as States.Timeout, as AWS does for ErrorEquals matching (see MOTO_NOTES.md).
    assert done["output"] == {"file": "x", "error": {"Error": "States.Timeout", "Cause": ""}}
    types = [e["type"] for e in _history(stack, done["executionArn"])]
    assert "TaskTimedOut" in types and "PassStateEntered" in types
    assert stack.processes[-1].wait(timeout=10) == 0


def test_each_retry_attempt_gets_its_own_token(stack: Stack, patch_moto: PatchMoto) -> None:
    tokens: list[str] = []
    sfn = stack.client("stepfunctions")

    def runner(parameters: dict[str, Any]) -> None:
        env = parameters["Overrides"]["ContainerOverrides"][0]["Environment"]
        token = next(e["Value"] for e in env if e["Name"] == "SHOPKPI_TASK_TOKEN")
        tokens.append(token)
        attempt = len(tokens)

        def report() -> None:  # from another thread, later, as a task would
            time.sleep(0.2)
            if attempt == 1:
                sfn.send_task_failure(taskToken=token, error="ShopKpi.Throttled", cause="slow down")
            else:
                sfn.send_task_success(taskToken=token, output=json.dumps({"attempt": attempt}))

        threading.Thread(target=report, daemon=True).start()

    patch_moto(runner)
    retry = [{"ErrorEquals": ["ShopKpi.Throttled"], "IntervalSeconds": 1, "MaxAttempts": 3, "BackoffRate": 2.0}]
    definition = {
        "StartAt": "T",
        "States": {"T": _run_task_state(stack, ["merge"], TimeoutSeconds=20, Retry=retry, End=True)},
    }

    done = _execute(stack, definition)

    assert done["status"] == "SUCCEEDED", done
    assert done["output"] == {"attempt": 2}
    assert len(tokens) == 2 and tokens[0] != tokens[1]
    failed = [e["taskFailedEventDetails"] for e in _history(stack, done["executionArn"]) if e["type"] == "TaskFailed"]
    assert [(f["error"], f.get("cause")) for f in failed] == [("ShopKpi.Throttled", "slow down")]


def test_other_patched_gaps(stack: Stack, patch_moto: PatchMoto) -> None:
    patch_moto(lambda parameters: None)  # tasks that never report
    sfn, sqs = stack.client("stepfunctions"), stack.client("sqs")
    queue = sqs.create_queue(QueueName=f"q-{uuid.uuid4().hex[:8]}")["QueueUrl"]

    # (f) a definite path with an index in the middle selects one value; (e) sqs:sendMessage reaches this server.
    definition = {
        "StartAt": "Pick",
        "States": {
            "Pick": {"Type": "Pass", "Parameters": {"b.$": "$.a[0].b", "all.$": "$.a[*].b"}, "Next": "Send"},
            "Send": {
                "Type": "Task",
                "Resource": "arn:aws:states:::sqs:sendMessage",
                "Parameters": {"QueueUrl": queue, "MessageBody.$": "States.JsonToString($)"},
                "ResultPath": None,
                "End": True,
            },
        },
    }
    done = _execute(stack, definition, {"a": [{"b": 1}, {"b": 2}]})
    assert done["status"] == "SUCCEEDED", done
    assert done["output"] == {"b": 1, "all": [1, 2]}
    assert json.loads(sqs.receive_message(QueueUrl=queue)["Messages"][0]["Body"]) == {"b": 1, "all": [1, 2]}

    # (g) unnamed executions of one machine with the same input are distinct; #10077: the machine runs again.
    machine = done["stateMachineArn"]
    again = [sfn.start_execution(stateMachineArn=machine, input='{"a": [{"b": 3}]}')["executionArn"] for _ in "12"]
    assert again[0] != again[1] and not again[0].endswith(":None")
    assert [_wait(sfn, e)["output"] for e in again] == [{"b": 3, "all": [3]}] * 2

    # A States.Timeout not caught inside a Map iteration reaches the Map's Catch with its name.
    lost = _run_task_state(stack, ["merge"], TimeoutSeconds=1, End=True)
    definition = {
        "StartAt": "Each",
        "States": {
            "Each": {
                "Type": "Map",
                "ItemsPath": "$.files",
                "MaxConcurrency": 2,
                "ItemSelector": {"file.$": "$$.Map.Item.Value"},
                "ItemProcessor": {"ProcessorConfig": {"Mode": "INLINE"}, "StartAt": "T", "States": {"T": lost}},
                "Catch": [{"ErrorEquals": ["States.Timeout"], "ResultPath": "$.error", "Next": "Done"}],
                "End": True,
            },
            "Done": {"Type": "Pass", "End": True},
        },
    }
    done = _execute(stack, definition, {"files": ["a"]})
    assert done["status"] == "SUCCEEDED", done
    assert done["output"]["error"]["Error"] == "States.Timeout"


def test_install_refuses_another_moto_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moto, "__version__", "5.2.2")
    with pytest.raises(RuntimeError, match=r"verified against moto 5\.2\.1"):
        MotoPatches(lambda parameters: None).install()


# --- install and uninstall, in process (no server needed) ---------------------------------------------------------
_ABSENT = object()


def _targets() -> list[tuple[Any, str, Any]]:
    """Every (owner, attribute) the patches replace, with what moto has there now (patches only compute these)."""
    probe = MotoPatches(lambda parameters: None)
    return [(owner, name, vars(owner).get(name, _ABSENT)) for patch in PATCHES for owner, name, _ in patch(probe)]


def _moto_behaviour() -> tuple[Any, type, str]:
    """Three patched gaps as seen from outside: a JSONPath answer, the ECS integration, the integrations' port."""
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import state_task_factory
    from moto.stepfunctions.parser.asl.utils import boto_client, json_path

    return (
        json_path.extract_json("$.a[0].b", {"a": [{"b": 1}]}),
        type(getattr(state_task_factory, "state_task_service_for")("ecs")),  # noqa: B009
        getattr(boto_client, "moto_server_port")(),  # noqa: B009
    )


def test_uninstall_gives_moto_back_its_own_behaviour() -> None:
    before, behaviour = _targets(), _moto_behaviour()
    assert behaviour[0] == [1] and behaviour[1] is not LocalEcsTask  # moto's gaps, unpatched

    patches = MotoPatches(lambda parameters: None, server_port=4599).install()
    try:
        assert patches.installed == [patch.__name__ for patch in PATCHES]
        assert _moto_behaviour() == (1, LocalEcsTask, "4599")
    finally:
        patches.uninstall()

    assert patches.installed == []
    assert _moto_behaviour() == behaviour
    assert [(owner, name, vars(owner).get(name, _ABSENT)) for owner, name, _ in before] == before
    import moto.stepfunctions

    assert not [name for name in vars(moto.stepfunctions) if name.startswith("_shopkpi")]


def test_installing_twice_or_uninstalling_twice_is_harmless() -> None:
    before = _targets()
    patches = MotoPatches(lambda parameters: None, server_port=4599)
    try:
        assert patches.install() is patches.install()
        assert patches.installed == [patch.__name__ for patch in PATCHES]
        assert _moto_behaviour()[0] == 1
    finally:
        patches.uninstall()
    patches.uninstall()

    assert [(owner, name, vars(owner).get(name, _ABSENT)) for owner, name, _ in before] == before


def test_a_second_patch_set_is_refused_while_one_is_installed() -> None:
    with MotoPatches(lambda parameters: None) as first:
        with pytest.raises(RuntimeError, match="another MotoPatches is installed"):
            MotoPatches(lambda parameters: None).install()
        assert first.installed
    with MotoPatches(lambda parameters: None) as second:  # free again once the first is uninstalled
        assert second.installed


def test_a_multipart_upload_sends_one_object_created_event(
    stack: Stack, patch_moto: PatchMoto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the 2 GB load test: without the patch each file above the multipart threshold was processed twice.
    from boto3.s3.transfer import TransferConfig
    from moto.s3 import notifications

    patch_moto(lambda parameters: None)
    sent: list[str] = []
    original = notifications.send_event

    def send_event(account_id: str, event_name: Any, bucket: Any, key: Any) -> None:
        sent.append(str(event_name))
        original(account_id, event_name, bucket, key)

    monkeypatch.setattr(notifications, "send_event", send_event)
    s3 = stack.client("s3")
    bucket = f"mp-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    big = tmp_path / "big.csv"
    big.write_bytes(b"x" * (6 << 20))
    s3.upload_file(str(big), bucket, "incoming/big.csv", Config=TransferConfig(multipart_threshold=5 << 20))
    created = [e for e in sent if "OBJECT_CREATED" in e]  # moto's names (ObjectCreated:... on the wire)
    assert created == ["S3NotificationEvent.OBJECT_CREATED_COMPLETE_MULTIPART_UPLOAD_EVENT"], sent
