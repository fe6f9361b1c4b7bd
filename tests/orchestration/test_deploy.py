"""``shopkpi deploy`` against moto (in process): plans, creates, updates, no-ops and clear errors.

What moto 5.2.1 does with change sets, and what these tests therefore fake (each checked in
``moto/cloudformation/models.py``):

* CreateChangeSet / DescribeChangeSet / ExecuteChangeSet / DeleteChangeSet / ListChangeSets work, synchronously (a
  change set is CREATE_COMPLETE at once). A CREATE change set leaves a REVIEW_IN_PROGRESS stack, as on AWS; an
  UPDATE change set with the same template and parameters ends FAILED with AWS's "didn't contain changes" reason.
* ExecuteChangeSet creates the resources but never rebuilds the stack's outputs (built once, from the empty
  template of the REVIEW_IN_PROGRESS stack) nor records the new parameters: :func:`moto_change_sets` patches those
  two lines back in. Without it a change-set deploy on moto has no outputs at all.
* moto never fails a stack (``execute_change_set``: "TODO: handle execution errors and implement rollback") and
  writes only stack-level events: the failure test injects the events AWS would write, through moto's own model.
* moto's diff is rough: an UPDATE lists Modify changes that are not real (InternetGateway) and misses the ones a
  parameter causes, and never says Replacement. The tests check the plan's type and actions, not its precision.
"""

from __future__ import annotations

import base64
import logging
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.cloudformation import parsing
from moto.cloudformation.models import CloudFormationBackend, Event, Stack

from orchestration.deploy import NO_CREDENTIALS, NO_DOCKER, DeployResult, deploy
from orchestration.template import render_template
from processor.aws.artifacts import TEMPLATE_BODY_LIMIT
from processor.aws.cloudformation import EventTail, StackOutputs, failure_message
from processor.errors import AwsError, ConfigError
from processor.settings import Settings
from shopkpi.cli import main

# moto's CloudFormation skips the types it does not model (AWS::Pipes::Pipe, AWS::SQS::QueuePolicy...) with a warning
# and a log line each: expected here, and noise.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS::")

STACK = "shopkpi"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/shopkpi:test"


@pytest.fixture
def moto_change_sets(aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto with the two missing lines of ExecuteChangeSet: the stack's outputs and parameters."""
    original = CloudFormationBackend.execute_change_set

    def execute_change_set(self: CloudFormationBackend, change_set_name: str, stack_name: str | None = None) -> None:
        original(self, change_set_name, stack_name)
        change_set = self.describe_change_set(change_set_name)
        assert change_set is not None
        stack = self.stacks[change_set.stack_id]
        stack._parse_template()
        stack.parameters = dict(change_set.parameters)
        stack.output_map = stack._create_output_map()

    monkeypatch.setattr(CloudFormationBackend, "execute_change_set", execute_change_set)
    # parsing.py logs "No Moto CloudFormation support for <type>" on its module logger (named "moto").
    level = parsing.logger.level
    parsing.logger.setLevel(logging.ERROR)
    yield
    parsing.logger.setLevel(level)


@pytest.fixture
def settings(moto_change_sets: None) -> Settings:
    return Settings.load(stack=STACK)


class Lines:
    """A progress callback that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines)


def run(settings: Settings, **kwargs: Any) -> tuple[DeployResult, Lines]:
    lines = Lines()
    args: dict[str, Any] = {"image_uri": IMAGE, "skip_image": True, "dry_run": False, "parameters": {}}
    args.update(kwargs)
    return deploy(settings, progress=lines, **args), lines


def template_resources() -> tuple[set[str], set[str]]:
    """(every logical id of the rendered template, those behind a Condition), parsed as moto parses it."""
    resources: dict[str, dict[str, Any]] = Stack.parse_template(render_template())["Resources"]
    return set(resources), {name for name, r in resources.items() if "Condition" in r}


def cfn() -> Any:
    return boto3.client("cloudformation", region_name="us-east-1")


def stack_parameters() -> dict[str, str]:
    found = cfn().describe_stacks(StackName=STACK)["Stacks"][0]["Parameters"]
    return {p["ParameterKey"]: p["ParameterValue"] for p in found}


# --- plans and deploys -------------------------------------------------------------------------------------------
def test_dry_run_on_a_fresh_account_plans_a_create_and_leaves_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No image given: the dry run names the image a deploy would build, and builds nothing (no Docker here).
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    result, lines = run(settings, image_uri=None, skip_image=False, dry_run=True)

    assert result.status == "planned"
    assert result.plan.kind == "CREATE"
    assert result.outputs == {}
    planned = {c.logical_id for c in result.plan.changes}
    every, conditional = template_resources()
    assert planned <= every and every - planned <= conditional  # AWS leaves out resources whose condition is false
    assert {"LandingBucket", "StateMachine", "TaskDefinition"} <= planned
    assert {c.action for c in result.plan.changes} == {"Add"}
    image = result.plan.parameters["ImageUri"]
    assert image.startswith("123456789012.dkr.ecr.us-east-1.amazonaws.com/shopkpi:")
    assert NO_DOCKER in lines.text()
    # Nothing left behind: the REVIEW_IN_PROGRESS stack is deleted with its change set, and no repository was made.
    with pytest.raises(Exception, match="does not exist"):
        cfn().describe_stacks(StackName=STACK)
    statuses = [s["StackStatus"] for s in cfn().list_stacks()["StackSummaries"] if s["StackName"] == STACK]
    assert statuses == ["DELETE_COMPLETE"]
    assert boto3.client("ecr", region_name="us-east-1").describe_repositories()["repositories"] == []
    # only the deploy bucket, whose template the change set was computed from (bigger than an inline TemplateBody)
    buckets = [b["Name"] for b in boto3.client("s3", region_name="us-east-1").list_buckets()["Buckets"]]
    assert buckets == ["shopkpi-deploy-123456789012-us-east-1"]


def test_a_template_too_big_to_send_inline_is_deployed_from_the_deploy_bucket(settings: Settings) -> None:
    assert len(render_template().encode()) > TEMPLATE_BODY_LIMIT  # else this test has nothing to show
    result, _ = run(settings)
    assert result.status == "deployed"
    s3 = boto3.client("s3", region_name="us-east-1")
    [kept] = s3.list_objects_v2(Bucket="shopkpi-deploy-123456789012-us-east-1")["Contents"]
    body = s3.get_object(Bucket="shopkpi-deploy-123456789012-us-east-1", Key=kept["Key"])["Body"].read()
    assert body.decode() == render_template()
    assert cfn().get_template(StackName=STACK)["TemplateBody"] == render_template()


def test_deploy_creates_the_stack_and_returns_its_outputs(settings: Settings) -> None:
    result, lines = run(settings)

    assert result.status == "deployed"
    assert result.plan.kind == "CREATE"
    outputs = StackOutputs.from_outputs(result.outputs)  # every output the CLI commands rely on
    assert outputs.bucket == "shopkpi-landing-123456789012-us-east-1"
    assert outputs.state_machine_arn.endswith(":stateMachine:shopkpi-pipeline")
    assert cfn().describe_stacks(StackName=STACK)["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"
    assert stack_parameters()["ImageUri"] == IMAGE
    assert boto3.client("s3", region_name="us-east-1").head_bucket(Bucket=outputs.bucket)
    # Progress follows the stack's events, only those of this deploy: not the REVIEW_IN_PROGRESS of the change set.
    events = [line for line in lines.lines if " AWS::CloudFormation::Stack " in line]
    assert [line.split()[3] for line in events] == ["CREATE_IN_PROGRESS", "CREATE_COMPLETE"]


def test_second_deploy_without_changes_reports_no_changes(settings: Settings) -> None:
    first, _ = run(settings)
    second, lines = run(settings)

    assert second.status == "unchanged"
    assert second.plan.changes == ()
    assert second.outputs == first.outputs
    assert "no changes" in lines.text()
    # The FAILED "no changes" change set is not left lying around.
    summaries = cfn().list_change_sets(StackName=STACK)["Summaries"]
    assert [s["Status"] for s in summaries if s["Status"] == "FAILED"] == []


def test_skip_image_keeps_the_deployed_image_and_other_values(settings: Settings) -> None:
    run(settings, parameters={"AlertEmail": "ops@example.com"})

    # Neither the image nor the alert address is given again: both keep their deployed values, so nothing changes.
    again, _ = run(settings, image_uri=None, skip_image=True)

    assert again.status == "unchanged"
    assert again.plan.image_uri is None
    assert again.plan.kept == ("AlertEmail", "ImageUri")
    assert again.plan.parameters["ImageUri"] == IMAGE
    assert stack_parameters()["AlertEmail"] == "ops@example.com"


def test_a_changed_parameter_yields_an_update_plan_and_the_update_runs(settings: Settings) -> None:
    run(settings)

    planned, _ = run(settings, parameters={"LogRetentionDays": "7"}, dry_run=True)
    assert planned.status == "planned"
    assert planned.plan.kind == "UPDATE"
    assert planned.plan.changes  # moto's list of changes is rough (see the module docstring); AWS's is exact
    assert {c.action for c in planned.plan.changes} <= {"Modify", "Add", "Remove"}
    assert stack_parameters()["LogRetentionDays"] == "30"  # the dry run changed nothing
    assert cfn().describe_stacks(StackName=STACK)["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"

    updated, lines = run(settings, parameters={"LogRetentionDays": "7"})
    assert updated.status == "deployed"
    assert updated.plan.kind == "UPDATE"
    assert stack_parameters()["LogRetentionDays"] == "7"
    assert "UPDATE_COMPLETE" in lines.text()
    assert StackOutputs.from_outputs(updated.outputs).bucket


def test_first_deploy_with_skip_image_needs_an_image(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="--skip-image needs --image-uri"):
        run(settings, image_uri=None, skip_image=True)


def test_parameters_the_deploy_sets_itself_are_refused(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="use --image-uri"):
        run(settings, parameters={"ImageUri": "x"})
    with pytest.raises(ConfigError, match="use --stack"):
        run(settings, parameters={"EnvironmentName": "other"})


# --- clear errors -------------------------------------------------------------------------------------------------
def test_missing_credentials_give_a_clear_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # mock_aws exports fake keys while it runs: remove them, and every other source of the standard chain.
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "credentials").write_text("")
    (tmp_path / "config").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe (and its timeouts)

    with pytest.raises(ConfigError) as caught:
        run(settings)
    assert caught.value.message == NO_CREDENTIALS
    assert caught.value.message.startswith("no AWS credentials found: configure a profile")


def test_missing_docker_gives_a_clear_error_and_creates_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(ConfigError) as caught:
        run(settings, image_uri=None, skip_image=False)
    assert caught.value.message.startswith(NO_DOCKER)
    assert boto3.client("ecr", region_name="us-east-1").describe_repositories()["repositories"] == []
    with pytest.raises(Exception, match="does not exist"):
        cfn().describe_stacks(StackName=STACK)


def fake_docker(directory: Path, *, daemon: bool = True) -> Path:
    """A ``docker`` on PATH that records its arguments (and stdin for ``login``) and succeeds, or has no daemon."""
    directory.mkdir()
    log = directory / "calls.log"
    script = directory / "docker"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        + ("" if daemon else 'if [ "$1" = info ]; then echo "Cannot connect to the Docker daemon." >&2; exit 1; fi\n')
        + f'if [ "$1" = login ]; then printf "stdin=" >> "{log}"; cat >> "{log}"; echo >> "{log}"; fi\n'
        "exit 0\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return log


def test_docker_without_a_daemon_gives_the_same_clear_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_docker(tmp_path / "bin", daemon=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with pytest.raises(ConfigError, match="Cannot connect to the Docker daemon") as caught:
        run(settings, image_uri=None, skip_image=False)
    assert caught.value.message.startswith(NO_DOCKER)


def test_image_is_built_for_fargate_and_pushed_to_ecr(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The only fake: the docker executable. ECR (repository, login token) and the stack are moto's.
    log = fake_docker(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")

    result, _ = run(settings, image_uri=None, skip_image=False)

    repo = boto3.client("ecr", region_name="us-east-1").describe_repositories(repositoryNames=[STACK])
    repo_uri = repo["repositories"][0]["repositoryUri"]
    image = stack_parameters()["ImageUri"]
    assert result.status == "deployed"
    assert image == result.plan.image_uri
    assert image.startswith(f"{repo_uri}:")
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty-\d{8}-\d{6})?|\d{8}-\d{6}", image.rsplit(":", 1)[1])
    token = boto3.client("ecr", region_name="us-east-1").get_authorization_token()["authorizationData"][0]
    password = base64.b64decode(token["authorizationToken"]).decode().split(":", 1)[1]
    assert log.read_text().splitlines() == [
        "info --format {{.ServerVersion}}",
        f"build --platform linux/amd64 -t {image} .",
        f"login --username AWS --password-stdin {token['proxyEndpoint']}",
        f"stdin={password}",  # the password never appears on a command line
        f"push {image}",
    ]


def inject_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """ExecuteChangeSet that fails the way AWS does: a resource fails, the others are cancelled, the stack rolls
    back. moto cannot fail a stack by itself; the events go through its own Event model and DescribeStackEvents."""

    def execute_change_set(self: CloudFormationBackend, change_set_name: str, stack_name: str | None = None) -> None:
        change_set = self.describe_change_set(change_set_name)
        assert change_set is not None
        stack = self.stacks[change_set.stack_id]

        def event(logical_id: str, kind: str, status: str, reason: str | None) -> None:
            stack.events.append(Event(stack.stack_id, stack.name, logical_id, "", kind, status, reason, None))

        event(stack.name, "AWS::CloudFormation::Stack", "CREATE_IN_PROGRESS", "User Initiated")
        event("LandingBucket", "AWS::S3::Bucket", "CREATE_IN_PROGRESS", None)
        event("LandingBucket", "AWS::S3::Bucket", "CREATE_FAILED", "shopkpi-landing-x already exists")
        event("TaskDefinition", "AWS::ECS::TaskDefinition", "CREATE_FAILED", "Resource creation cancelled")
        event(stack.name, "AWS::CloudFormation::Stack", "ROLLBACK_IN_PROGRESS", "The following resource(s) failed")
        event(stack.name, "AWS::CloudFormation::Stack", "ROLLBACK_COMPLETE", None)
        stack.status = "ROLLBACK_COMPLETE"

    monkeypatch.setattr(CloudFormationBackend, "execute_change_set", execute_change_set)


def test_a_failed_stack_raises_naming_the_resource_and_its_reason(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject_failure(monkeypatch)
    with pytest.raises(AwsError) as caught:
        run(settings)
    message = caught.value.message
    assert (
        message
        == "stack shopkpi is ROLLBACK_COMPLETE: LandingBucket (AWS::S3::Bucket): shopkpi-landing-x already exists"
    )
    assert caught.value.context["failed"] == ["LandingBucket", "TaskDefinition"]

    # The stack cannot be updated now; the next deploy says so and what to do, instead of AWS's bare refusal.
    with pytest.raises(AwsError, match=r"cannot be updated .*LandingBucket.*delete-stack --stack-name shopkpi"):
        run(settings)


def test_a_change_set_that_fails_to_compute_raises_its_reason_and_leaves_no_stack(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto marks a change set FAILED only for "no changes"; AWS also does for template errors, found while computing.
    original = CloudFormationBackend.create_change_set

    def create_change_set(self: CloudFormationBackend, *args: Any, **kwargs: Any) -> tuple[str, str]:
        change_set_id, stack_id = original(self, *args, **kwargs)
        change_set = self.change_sets[change_set_id]
        change_set.status = "FAILED"
        change_set.status_reason = "Template error: instance of Fn::GetAtt references undefined resource Nope"
        return change_set_id, stack_id

    monkeypatch.setattr(CloudFormationBackend, "create_change_set", create_change_set)
    with pytest.raises(AwsError, match=r"change set for stack shopkpi failed: Template error: .*Nope"):
        run(settings)
    with pytest.raises(Exception, match="does not exist"):
        cfn().describe_stacks(StackName=STACK)


def test_failure_message_prefers_causes_then_cancelled_then_the_stack_reason() -> None:
    bucket = {"LogicalResourceId": "B", "ResourceType": "AWS::S3::Bucket", "ResourceStatus": "CREATE_FAILED"}
    cancelled = {**bucket, "LogicalResourceId": "T", "ResourceStatusReason": "Resource creation cancelled"}
    stack = {"LogicalResourceId": "s", "ResourceType": "AWS::CloudFormation::Stack", "ResourceStatus": "UPDATE_FAILED"}

    assert failure_message("s", "ROLLBACK_COMPLETE", [{**bucket, "ResourceStatusReason": "boom"}, cancelled]) == (
        "stack s is ROLLBACK_COMPLETE: B (AWS::S3::Bucket): boom"
    )
    assert failure_message("s", "ROLLBACK_COMPLETE", [cancelled]).endswith(
        "T (AWS::S3::Bucket): Resource creation cancelled"
    )
    assert failure_message("s", "UPDATE_ROLLBACK_COMPLETE", [{**stack, "ResourceStatusReason": "role denied"}]) == (
        "stack s is UPDATE_ROLLBACK_COMPLETE: role denied"
    )
    assert failure_message("s", "ROLLBACK_COMPLETE", []).endswith("no failed resource reported")


class PagedEvents:
    """DescribeStackEvents over a list (newest first), two events a page."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.calls = 0

    def add(self, *ids: str) -> None:
        self.events[:0] = [{"EventId": i} for i in reversed(ids)]

    def describe_stack_events(self, StackName: str, NextToken: str | None = None) -> dict[str, Any]:
        self.calls += 1
        start = int(NextToken or 0)
        page: dict[str, Any] = {"StackEvents": self.events[start : start + 2]}
        if start + 2 < len(self.events):
            page["NextToken"] = str(start + 2)
        return page


def test_event_tail_reports_only_new_events_oldest_first_and_reads_no_further_than_needed() -> None:
    client = PagedEvents()
    client.add("old1", "old2", "old3", "old4", "old5")
    tail = EventTail(client, "s")
    assert tail.new() == []
    client.add("a", "b", "c")
    client.calls = 0
    assert [e["EventId"] for e in tail.new()] == ["a", "b", "c"]
    assert client.calls == 2  # "c b", then "a old5": stops at the first known event
    assert tail.new() == []


# --- the command line ---------------------------------------------------------------------------------------------
def test_cli_dry_run_prints_the_plan_table(moto_change_sets: None, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["--stack", STACK, "deploy", "--dry-run", "--skip-image", "--image-uri", IMAGE, "--param", "TaskCpu=512"]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "Plan: CREATE stack shopkpi" in out
    assert "LandingBucket" in out and "AWS::S3::Bucket" in out
    assert "TaskCpu=512" in out
    assert "dry run: change set deleted, nothing was changed" in err


def test_cli_reports_errors_on_stderr(moto_change_sets: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--stack", STACK, "deploy", "--param", "novalue"]) == 2
    assert "--param wants KEY=VALUE" in capsys.readouterr().err


def test_cli_deploy_prints_the_outputs(moto_change_sets: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--stack", STACK, "deploy", "--skip-image", "--image-uri", IMAGE]) == 0
    out = capsys.readouterr().out
    assert "Outputs of stack shopkpi" in out and "StateMachineArn" in out
    assert main(["--stack", STACK, "deploy", "--skip-image"]) == 0
    assert "no changes: stack shopkpi is up to date" in capsys.readouterr().out
