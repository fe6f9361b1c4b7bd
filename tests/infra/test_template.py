"""infra/template.yaml: it lints, it deploys (into moto), the state machine reaches the stack only through
substitutions, the alarms watch what matters, and every role may call exactly the AWS actions its code or its
service calls: no more, no less."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import boto3
import cfnlint
import pytest
import yaml
from moto import mock_aws

from orchestration import definition
from orchestration.template import render_template, template_text
from processor.aws.cloudformation import StackOutputs
from processor.aws.dynamo import table_definitions
from processor.errors import RETRYABLE_CODES

# moto's CloudFormation skips the types it does not implement (alarms, metric filters, policies, the Pipe) with a
# warning; the checks of those resources below read the template instead.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS::")

ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
ENV = "kpitest"  # EnvironmentName (and stack name) of the moto deployment


#: Task kind (a ``shopkpi-task`` subcommand) -> the ``DefinitionSubstitutions`` key of that kind's task role.
TASK_ROLES = {
    "validate": "ValidateTaskRoleArn",
    # a big file's validation in parts: the same untrusted input, the same role
    "validate-part": "ValidateTaskRoleArn",
    "combine": "ValidateTaskRoleArn",
    "transform": "TransformTaskRoleArn",
    "quarantine": "QuarantineTaskRoleArn",
    "merge": "MergeTaskRoleArn",
    # a big first load's merge in parts: the same state, the same lock, the same role
    "merge-part": "MergeTaskRoleArn",
    "merge-finish": "MergeTaskRoleArn",
    "merge-fallback": "MergeTaskRoleArn",
}


def task_kind(state: dict[str, Any]) -> str | None:
    """The ``shopkpi-task`` subcommand an ``ecs:runTask`` state runs (None for any other state)."""
    if not str(state.get("Resource", "")).startswith("arn:aws:states:::ecs:runTask"):
        return None
    for override in state["Parameters"]["Overrides"]["ContainerOverrides"]:
        if isinstance(override.get("Command"), list):
            return str(override["Command"][0])
        if found := re.match(r"^States\.Array\('([\w-]+)'", str(override.get("Command.$", ""))):
            return found.group(1)
    raise AssertionError(f"cannot tell which task an ecs:runTask state runs: {json.dumps(state)[:200]}")


# --- the template as plain data ------------------------------------------------------------------------------
class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, !GetAtt, ...) read as their long forms, as plain data."""


def _short_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", _short_tag)


@cache
def rendered() -> str:
    return render_template()


@cache
def template() -> dict[str, Any]:
    data: dict[str, Any] = yaml.load(rendered(), Loader=CfnLoader)
    return data


def resources(kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template()["Resources"].items() if v["Type"] == kind}


def the_one(kind: str) -> str:
    found = list(resources(kind))
    assert len(found) == 1, f"expected one {kind}, found {found}"
    return found[0]


def props(logical_id: str) -> dict[str, Any]:
    found: dict[str, Any] = template()["Resources"][logical_id].get("Properties", {})
    return found


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def referenced_ids(value: Any) -> set[str]:
    """The logical ids and parameters a value points at through Ref, Fn::GetAtt or Fn::Sub."""
    out: set[str] = set()
    if isinstance(value, dict):
        for key, v in value.items():
            if key == "Ref":
                out.add(v)
            elif key == "Fn::GetAtt":
                out.add(v[0])
            elif key == "Fn::Sub":
                text = v if isinstance(v, str) else v[0]
                out |= {name.split(".")[0] for name in re.findall(r"\$\{([^}!]+)\}", text)}
                if not isinstance(v, str):
                    out |= referenced_ids(v[1])
            else:
                out |= referenced_ids(v)
    elif isinstance(value, list):
        for v in value:
            out |= referenced_ids(v)
    return {i for i in out if not i.startswith("AWS::")}


def resource_types(value: Any) -> set[str]:
    return {template()["Resources"][i]["Type"] for i in referenced_ids(value) if i in template()["Resources"]}


def sub_text(value: Any) -> str:
    """The text of a !Sub (or a plain string)."""
    if isinstance(value, str):
        return value
    sub = value["Fn::Sub"]
    return str(sub if isinstance(sub, str) else sub[0])


# --- (a) cfn-lint ---------------------------------------------------------------------------------------------
def test_rendered_template_passes_cfn_lint_without_errors_or_warnings(tmp_path: Path) -> None:
    # A justified warning is silenced in the template (Metadata cfn-lint ignore_checks) with a comment saying why.
    path = tmp_path / "template.yaml"
    path.write_text(rendered())
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    proc = subprocess.run([str(cfn_lint), "--format", "parseable", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- (b) the template deploys into moto, with what the code and the embedded stack need -------------------------
@pytest.fixture(scope="module")
def deployed() -> Iterator[dict[str, str]]:
    """The rendered template deployed once into an in-process moto (fake credentials); yields the outputs."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }.items():
            mp.setenv(name, value)
        with mock_aws():
            cf = boto3.client("cloudformation", region_name=REGION)
            cf.create_stack(
                StackName=ENV,
                TemplateBody=rendered(),
                Parameters=[{"ParameterKey": "EnvironmentName", "ParameterValue": ENV}],
                Capabilities=["CAPABILITY_IAM"],
            )
            stack = cf.describe_stacks(StackName=ENV)["Stacks"][0]
            assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
            yield {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}


def test_stack_has_every_output_the_code_reads(deployed: dict[str, str]) -> None:
    read = set(re.findall(r'outputs\["(\w+)"\]', inspect.getsource(StackOutputs.from_outputs)))
    assert len(read) >= 11
    assert read <= set(deployed), f"outputs missing: {sorted(read - set(deployed))}"
    outputs = StackOutputs.from_outputs(deployed)
    assert all(vars(outputs).values())


def test_deployed_tables_have_the_keys_and_indexes_the_code_uses(deployed: dict[str, str]) -> None:
    ddb = boto3.client("dynamodb", region_name=REGION)
    wanted = table_definitions(ENV)
    assert {d["TableName"] for d in wanted} == {
        deployed["OrderTable"],
        deployed["CategoryTable"],
        deployed["LedgerTable"],
    }
    for want in wanted:
        got = ddb.describe_table(TableName=want["TableName"])["Table"]
        assert got["KeySchema"] == want["KeySchema"], want["TableName"]
        assert {tuple(sorted(a.items())) for a in got["AttributeDefinitions"]} == {
            tuple(sorted(a.items())) for a in want["AttributeDefinitions"]
        }
        assert got["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        got_gsis = {g["IndexName"]: (g["KeySchema"], g["Projection"]) for g in got.get("GlobalSecondaryIndexes", [])}
        want_gsis = {g["IndexName"]: (g["KeySchema"], g["Projection"]) for g in want.get("GlobalSecondaryIndexes", [])}
        assert got_gsis == want_gsis, want["TableName"]


def test_deployed_bucket_and_queues_exist_and_the_buffer_redrives_to_its_dlq(deployed: dict[str, str]) -> None:
    # (moto's CloudFormation ignores the bucket's versioning and notification settings; the embedded stack applies
    # the notification itself.)
    boto3.client("s3", region_name=REGION).head_bucket(Bucket=deployed["BucketName"])
    sqs = boto3.client("sqs", region_name=REGION)
    for key in ("BufferQueueUrl", "BufferDeadLetterQueueUrl", "WorkflowDeadLetterQueueUrl"):
        sqs.get_queue_attributes(QueueUrl=deployed[key], AttributeNames=["QueueArn"])
    dlq_arn = sqs.get_queue_attributes(QueueUrl=deployed["BufferDeadLetterQueueUrl"], AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    redrive = json.loads(
        sqs.get_queue_attributes(QueueUrl=deployed["BufferQueueUrl"], AttributeNames=["RedrivePolicy"])["Attributes"][
            "RedrivePolicy"
        ]
    )
    assert redrive["deadLetterTargetArn"] == dlq_arn and int(redrive["maxReceiveCount"]) == 5


def test_deployed_task_definition_runs_the_task_entry_point_with_the_stack_settings(deployed: dict[str, str]) -> None:
    ecs = boto3.client("ecs", region_name=REGION)
    clusters = ecs.describe_clusters(clusters=[deployed["ClusterArn"]])["clusters"]
    assert [c["status"] for c in clusters] == ["ACTIVE"]
    # (moto keeps neither the launch type nor the network mode; the template test below reads those.)
    task = ecs.describe_task_definition(taskDefinition=deployed["TaskDefinitionFamily"])["taskDefinition"]
    (container,) = task["containerDefinitions"]
    assert container["name"] == "processor"
    assert container["entryPoint"] == ["shopkpi-task"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert env["SHOPKPI_BUCKET"] == deployed["BucketName"]
    assert env["SHOPKPI_ORDER_TABLE"] == deployed["OrderTable"]
    assert env["SHOPKPI_CATEGORY_TABLE"] == deployed["CategoryTable"]
    assert env["SHOPKPI_LEDGER_TABLE"] == deployed["LedgerTable"]
    assert env["SHOPKPI_WORK_DIR"]
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    assert container["logConfiguration"]["options"]["awslogs-group"] == deployed["TaskLogGroup"]


def test_deployed_stack_has_the_topic_network_and_dashboard_the_embedded_stack_reads(deployed: dict[str, str]) -> None:
    boto3.client("sns", region_name=REGION).get_topic_attributes(TopicArn=deployed["AlertTopicArn"])
    listed = boto3.client("cloudformation", region_name=REGION).list_stack_resources(StackName=ENV)
    physical = {r.get("LogicalResourceId"): r.get("PhysicalResourceId") for r in listed["StackResourceSummaries"]}
    for logical_id in ("SubnetA", "SubnetB", "TaskSecurityGroup", "Cluster", "LandingBucket", "StateMachine"):
        assert physical.get(logical_id), f"{logical_id} was not created"
    body = boto3.client("cloudwatch", region_name=REGION).get_dashboard(DashboardName=f"{ENV}-pipeline")
    assert json.loads(body["DashboardBody"])["widgets"] and "${" not in body["DashboardBody"]
    assert f":alarm:{ENV}-executions-failed" in body["DashboardBody"]


# --- (c) the state machine reaches the stack only through DefinitionSubstitutions ------------------------------
#: What each substitution must point at: the type of the stack resource it names.
SUBSTITUTION_TYPES = {
    "ClusterArn": "AWS::ECS::Cluster",
    "SubnetA": "AWS::EC2::Subnet",
    "SubnetB": "AWS::EC2::Subnet",
    "SecurityGroup": "AWS::EC2::SecurityGroup",
    "AlertTopicArn": "AWS::SNS::Topic",
    "DeadLetterQueueUrl": "AWS::SQS::Queue",
    "LedgerTable": "AWS::DynamoDB::Table",
    **{key: "AWS::IAM::Role" for key in TASK_ROLES.values()},
}
#: Substitutions that are settings, not resources.
SUBSTITUTION_CONSTANTS = {"AssignPublicIp": {"ENABLED", "DISABLED"}}


def state_machine() -> dict[str, Any]:
    return props(the_one("AWS::StepFunctions::StateMachine"))


def test_every_placeholder_of_the_definition_is_a_substitution_and_every_number_is_rendered() -> None:
    text = state_machine()["DefinitionString"]
    json.loads(text)  # the rendered definition is JSON (numbers are JSON numbers)
    placeholders = set(re.findall(r"\$\{(\w+)\}", text))
    substitutions = state_machine()["DefinitionSubstitutions"]
    assert placeholders == set(substitutions), "placeholders and DefinitionSubstitutions differ"
    assert not placeholders & set(definition.NUMBERS), "a number was left for CloudFormation (it can only make text)"
    for name in definition.NUMBERS:
        assert f'"${{{name}}}"' in definition.source(), f"{name} is no longer a placeholder of the definition"
    substituted = json.loads(definition.substitute(text, {k: "x" for k in substitutions}))
    assert "${" not in json.dumps(substituted)


def test_every_substitution_names_a_resource_of_this_stack_and_nothing_is_hard_coded() -> None:
    substitutions = state_machine()["DefinitionSubstitutions"]
    for name, value in substitutions.items():
        if name in SUBSTITUTION_CONSTANTS:
            assert value in SUBSTITUTION_CONSTANTS[name], name
        elif name == "TaskDefinition":
            task = the_one("AWS::ECS::TaskDefinition")
            assert sub_text(value) == sub_text(props(task)["Family"]), "TaskDefinition is not the task family"
        else:
            assert resource_types(value) == {SUBSTITUTION_TYPES[name]}, f"{name} -> {value}"
        literal = json.dumps(value)
        assert not re.search(r"\d{12}", literal) and "arn:aws:" not in literal, f"{name} is hard-coded: {literal}"


def test_definition_holds_no_arn_account_or_region_but_service_integrations() -> None:
    text = state_machine()["DefinitionString"]
    without_integrations = re.sub(r'"arn:aws:states:::[\w:.]+"', '""', text)
    assert "arn:" not in without_integrations
    assert not re.search(r"\d{12}", text)
    assert not re.search(r"\b(us|eu|ap|sa|ca|me|af|il|mx)-(east|west|north|south|central)\w*-\d\b", text)


# --- alarms, metrics, dashboard, logs -------------------------------------------------------------------------
def alarms() -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in resources("AWS::CloudWatch::Alarm").items()}


def metric_filters() -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in resources("AWS::Logs::MetricFilter").items()}


def alarm_on(namespace: str, metric: str, dimension_target: str | None = None) -> dict[str, Any]:
    """The alarm on ``namespace/metric`` (whose dimension points at ``dimension_target``), failing if none."""
    for alarm in alarms().values():
        if sub_text(alarm["Namespace"]) != namespace or alarm["MetricName"] != metric:
            continue
        if dimension_target is None or dimension_target in referenced_ids(alarm.get("Dimensions", [])):
            return alarm
    raise AssertionError(f"no alarm on {namespace} {metric} {dimension_target or ''}")


def logged_events(level: str | None = None) -> set[str]:
    """Event names the processor logs (``log.<level>("event.name", ...)``), at one level or any."""
    method = level.lower() if level else r"\w+"
    found: set[str] = set()
    for path in (ROOT / "processor").rglob("*.py"):
        found |= set(re.findall(rf'\blog\.{method}\(\s*"([\w.]+)"', path.read_text()))
    return found


def test_metric_filters_count_events_the_tasks_really_log() -> None:
    filters = metric_filters()
    assert filters
    for name, f in filters.items():
        assert referenced_ids(f["LogGroupName"]) == {"TaskLogGroup"}, name
        pattern = f["FilterPattern"]
        events = re.findall(r'\$\.event = "([\w.]+)"', pattern)
        levels = re.findall(r'\$\.level = "(\w+)"', pattern)
        assert events, f"{name} does not filter on an event"
        for event in events:
            assert event in logged_events(levels[0] if levels else None), f"{name}: nothing logs {event} {levels}"
    by_metric = {f["MetricTransformations"][0]["MetricName"]: f["FilterPattern"] for f in filters.values()}
    assert '"file.rejected"' in by_metric["FilesRejected"]
    assert '"ERROR"' in by_metric["TaskErrors"]
    assert '"task.failed"' in by_metric["TaskErrors"] and '"task.crashed"' in by_metric["TaskErrors"]
    # codes a filter leaves out are retryable codes of the project (a normal wait), never a terminal one
    assert set(re.findall(r'\$\.code != "([\w.]+)"', by_metric["TaskErrors"])) <= set(RETRYABLE_CODES)


def test_alarms_watch_failures_dead_letters_rejects_and_task_errors_and_notify_the_alert_topic() -> None:
    alarm_on("AWS/States", "ExecutionsFailed", "StateMachine")
    alarm_on("AWS/States", "ExecutionsTimedOut", "StateMachine")
    for dlq in ("BufferDeadLetterQueue", "WorkflowDeadLetterQueue"):
        alarm = alarm_on("AWS/SQS", "ApproximateNumberOfMessagesVisible", dlq)
        assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0), dlq
    namespaces = {sub_text(f["MetricTransformations"][0]["MetricNamespace"]) for f in metric_filters().values()}
    (namespace,) = namespaces
    alarm_on(namespace, "FilesRejected")
    alarm_on(namespace, "TaskErrors")
    for name, alarm in alarms().items():
        assert alarm["AlarmActions"] == [{"Ref": "AlertTopic"}], f"{name} does not notify the alert topic"
        assert sub_text(alarm["AlarmName"]).startswith("${EnvironmentName}-"), f"{name}: the topic policy needs it"


def test_alert_topic_policy_lets_exactly_this_stacks_alarms_publish() -> None:
    policy = props(the_one("AWS::SNS::TopicPolicy"))
    assert referenced_ids(policy["Topics"]) == {"AlertTopic"}
    (statement,) = [
        s for s in policy["PolicyDocument"]["Statement"] if s["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    ]
    assert statement["Effect"] == "Allow" and statement["Action"] == "sns:Publish"
    source = sub_text(statement["Condition"]["ArnLike"]["aws:SourceArn"])
    assert source.endswith(":alarm:${EnvironmentName}-*")


def dashboard() -> dict[str, Any]:
    """The dashboard body as JSON: !Sub variables inlined, ``${X}`` left as ``<X>``, the ``"."`` shorthand (the
    value of the row above at that position) expanded, each metric row without its options object."""
    sub = props(the_one("AWS::CloudWatch::Dashboard"))["DashboardBody"]["Fn::Sub"]
    text, variables = (sub, {}) if isinstance(sub, str) else (sub[0], sub[1])
    for name, value in variables.items():
        text = text.replace("${" + name + "}", sub_text(value))
    data: dict[str, Any] = json.loads(re.sub(r"\$\{([^}]+)\}", r"<\1>", text))
    for widget in data["widgets"]:
        rows: list[list[str]] = []
        for row in widget["properties"].get("metrics", []):
            fields = [f for f in row if isinstance(f, str)]
            rows.append([rows[-1][i] if f == "." else f for i, f in enumerate(fields)] if rows else fields)
        widget["properties"]["metrics"] = rows
    return data


def test_rendered_template_fits_cloudformations_limit_for_a_template_read_from_s3() -> None:
    # Beyond the 51,200 bytes of an inline TemplateBody, shopkpi deploy passes a TemplateURL (test_artifacts.py):
    # CloudFormation reads up to 1 MB from S3.
    size = len(rendered().encode())
    assert size <= 1_000_000, f"rendered template is {size} bytes"


def test_dashboard_shows_pipeline_health_and_every_alarm() -> None:
    data = dashboard()
    metrics = [m for w in data["widgets"] for m in w["properties"]["metrics"]]
    shown = {(m[0], m[1], m[3] if len(m) > 3 else None) for m in metrics}
    for metric in ("ExecutionsStarted", "ExecutionsSucceeded", "ExecutionsFailed"):
        assert ("AWS/States", metric, "<StateMachine>") in shown
    for queue in ("BufferDeadLetterQueue", "WorkflowDeadLetterQueue"):
        assert ("AWS/SQS", "ApproximateNumberOfMessagesVisible", f"<{queue}.QueueName>") in shown
    assert ("AWS/SQS", "ApproximateAgeOfOldestMessage", "<BufferQueue.QueueName>") in shown
    assert ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "<BufferQueue.QueueName>") in shown
    assert {m for _, m, _ in shown} >= {"FilesRejected", "TaskErrors", "WriteThrottleEvents", "ReadThrottleEvents"}
    for table in resources("AWS::DynamoDB::Table"):
        assert ("AWS/DynamoDB", "WriteThrottleEvents", f"<{table}>") in shown, table
    listed = {
        a.rsplit(":alarm:", 1)[1] for w in data["widgets"] if w["type"] == "alarm" for a in w["properties"]["alarms"]
    }
    names = {sub_text(a["AlarmName"]).replace("${EnvironmentName}", "<EnvironmentName>") for a in alarms().values()}
    assert listed == names


def test_every_log_group_has_a_retention_and_every_log_destination_is_one_of_them() -> None:
    groups = resources("AWS::Logs::LogGroup")
    for name, group in groups.items():
        assert group["Properties"].get("RetentionInDays") == {"Ref": "LogRetentionDays"}, name
    task = props(the_one("AWS::ECS::TaskDefinition"))
    destinations = [c["LogConfiguration"]["Options"]["awslogs-group"] for c in task["ContainerDefinitions"]]
    destinations += [
        d["CloudWatchLogsLogGroup"]["LogGroupArn"] for d in state_machine()["LoggingConfiguration"]["Destinations"]
    ]
    destinations.append(
        props(the_one("AWS::Pipes::Pipe"))["LogConfiguration"]["CloudwatchLogsLogDestination"]["LogGroupArn"]
    )
    for destination in destinations:
        assert referenced_ids(destination) <= set(groups) and referenced_ids(destination), destination


# --- (d) each role grants exactly what its code or service calls ---------------------------------------------
#: boto3 S3 calls -> the IAM actions they need. HeadObject is authorised as s3:GetObject; the managed transfers
#: (download_file, upload_file, copy) run HeadObject, ranged GetObject, (multipart) PutObject or UploadPartCopy, and
#: AbortMultipartUpload when a multipart transfer fails.
S3_ACTIONS = {
    "get_object": {"s3:GetObject"},
    "head_object": {"s3:GetObject"},
    "put_object": {"s3:PutObject"},
    "delete_object": {"s3:DeleteObject"},
    "list_objects_v2": {"s3:ListBucket"},
    "download_file": {"s3:GetObject"},
    "upload_file": {"s3:PutObject", "s3:AbortMultipartUpload"},
    "copy": {"s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"},
}
IAM_PREFIX = {"s3": "s3", "dynamodb": "dynamodb", "stepfunctions": "states"}
CLIENT_TYPES = {"S3Client": "s3", "DynamoDBClient": "dynamodb", "SFNClient": "stepfunctions"}
WAITERS = {("dynamodb", "table_exists"): "describe_table"}
#: Functions of task modules that tasks never run, and why (checked: no task module calls them).
NOT_RUN_BY_TASKS = {
    ("processor.aws.dynamo.tables", "create_tables"): (
        "tests and the embedded stack create tables; on AWS CloudFormation does"
    ),
}
#: Step Functions service integrations -> the IAM actions the workflow role needs (Step Functions developer guide).
INTEGRATIONS = {
    "arn:aws:states:::ecs:runTask": {"ecs:RunTask", "iam:PassRole"},
    "arn:aws:states:::ecs:runTask.waitForTaskToken": {"ecs:RunTask", "iam:PassRole"},
    "arn:aws:states:::ecs:runTask.sync": {
        "ecs:RunTask",
        "ecs:StopTask",
        "ecs:DescribeTasks",
        "events:PutTargets",
        "events:PutRule",
        "events:DescribeRule",
        "iam:PassRole",
    },
    "arn:aws:states:::sns:publish": {"sns:Publish"},
    "arn:aws:states:::sqs:sendMessage": {"sqs:SendMessage"},
    "arn:aws:states:::dynamodb:updateItem": {"dynamodb:UpdateItem"},
    "arn:aws:states:::dynamodb:putItem": {"dynamodb:PutItem"},
}
LOG_DELIVERY = {
    "logs:CreateLogDelivery",
    "logs:GetLogDelivery",
    "logs:UpdateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:DescribeResourcePolicies",
    "logs:DescribeLogGroups",
}
XRAY = {"xray:PutTraceSegments", "xray:PutTelemetryRecords", "xray:GetSamplingRules", "xray:GetSamplingTargets"}
IMAGE_PULL = {
    "ecr:GetAuthorizationToken",
    "ecr:BatchCheckLayerAvailability",
    "ecr:GetDownloadUrlForLayer",
    "ecr:BatchGetImage",
}
LOG_WRITE = {"logs:CreateLogStream", "logs:PutLogEvents"}
KMS_PUBLISH = {"kms:GenerateDataKey", "kms:Decrypt"}


def _module_path(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


@cache
def task_modules() -> dict[str, Path]:
    """The processor modules an ECS task can run: the static import closure of ``processor.tasks``, imports inside
    functions included."""
    seen: dict[str, Path] = {}
    todo = ["processor.tasks"]
    while todo:
        name = todo.pop()
        path = _module_path(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("processor")]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("processor"):
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return seen


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """Top-level functions, methods (``Class.method``) and the module's own statements (``<module>``)."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{item.name}", item
        else:
            yield "<module>", node


def client_calls(source: str) -> set[tuple[str, str, str]]:
    """(function, service, operation) of every boto3 client call in a module.

    A receiver is a client when it is ``client``/``self.client`` (the service comes from the module's annotation of
    its ``client`` parameters: ``S3Client``, ``DynamoDBClient``), ``...clients.<service>`` /
    ``make_clients(...).<service>``, a name or attribute assigned from one of those, or an attribute assigned from a
    parameter named after its service (``self.sfn = stepfunctions``).
    """
    tree = ast.parse(source)
    typed = {
        CLIENT_TYPES[ast.unparse(n.annotation)]
        for n in ast.walk(tree)
        if isinstance(n, ast.arg)
        and n.arg == "client"
        and n.annotation is not None
        and ast.unparse(n.annotation) in CLIENT_TYPES
    }
    assert len(typed) <= 1, f"one module, clients of several services: {typed}"
    via_clients = re.compile(r"(?:\bclients|make_clients\([^)]*\))\.(\w+)")
    # parameters named after a service that hold its client (``stepfunctions: Any``), not a wrapper (``s3: S3Store``)
    client_params = {
        n.arg
        for n in ast.walk(tree)
        if isinstance(n, ast.arg)
        and n.arg in IAM_PREFIX
        and (n.annotation is None or ast.unparse(n.annotation) in ("Any", *CLIENT_TYPES))
    }
    aliases: dict[str, str] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name | ast.Attribute):
            services = set(via_clients.findall(ast.unparse(n.value))) & set(IAM_PREFIX)
            # ``self.sfn = stepfunctions``: a parameter named after its service (processor.aws.callback.Callback)
            if isinstance(n.value, ast.Name) and n.value.id in client_params:
                services = {n.value.id}
            if len(services) == 1:
                aliases[ast.unparse(n.targets[0])] = services.pop()
    calls: set[tuple[str, str, str]] = set()
    for function, body in _functions(tree):
        for n in ast.walk(body):
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
                continue
            receiver, op = ast.unparse(n.func.value), n.func.attr
            if receiver in ("client", "self.client"):
                assert typed, f"{receiver}.{op}: the module's `client` has no known type annotation"
                service = next(iter(typed))
            elif (m := re.fullmatch(rf"(?:.*\.)?{via_clients.pattern}", receiver)) and m.group(1) in IAM_PREFIX:
                service = m.group(1)
            elif receiver in aliases:
                service = aliases[receiver]
            else:
                continue
            if op in ("get_paginator", "get_waiter"):
                name = n.args[0].value  # type: ignore[attr-defined]
                op = WAITERS.get((service, name), name) if op == "get_waiter" else name
            calls.add((function, service, op))
    return calls


def iam_actions(service: str, op: str) -> set[str]:
    if service == "s3":
        assert op in S3_ACTIONS, f"S3 call {op}: add its IAM actions to S3_ACTIONS"
        return S3_ACTIONS[op]
    return {f"{IAM_PREFIX[service]}:{''.join(part.title() for part in op.split('_'))}"}


def task_code_actions() -> dict[str, set[str]]:
    """IAM action -> where the task code calls it."""
    out: dict[str, set[str]] = {}
    for module, path in task_modules().items():
        for function, service, op in client_calls(path.read_text()):
            if (module, function) in NOT_RUN_BY_TASKS:
                continue
            for action in iam_actions(service, op):
                out.setdefault(action, set()).add(f"{module}.{function}: {service}.{op}")
    return out


def granted(role: str) -> set[str]:
    return {a for s in role_statements(role) if s["Effect"] == "Allow" for a in as_list(s["Action"])}


def role_statements(role: str) -> list[dict[str, Any]]:
    return [s for p in props(role).get("Policies", []) for s in as_list(p["PolicyDocument"]["Statement"])]


def task_roles() -> dict[str, str]:
    """Task kind -> the logical id of the role its ECS states pass (``Overrides.TaskRoleArn``, a substitution)."""
    subs = state_machine()["DefinitionSubstitutions"]
    out: dict[str, str] = {}
    for st in _states(json.loads(state_machine()["DefinitionString"])).values():
        kind = task_kind(st)
        if kind is None:
            continue
        (placeholder,) = re.findall(r"^\$\{(\w+)\}$", st["Parameters"]["Overrides"].get("TaskRoleArn", ""))
        (role,) = referenced_ids(subs[placeholder])
        assert out.setdefault(kind, role) == role, f"two {kind} states run with different roles"
    return out


def role_of(logical_id: str, prop: str) -> str:
    (role,) = referenced_ids(props(logical_id)[prop])
    return role


def policy_diff(grants: set[str], expected: set[str]) -> str:
    """'' when equal, else what is granted but never called and what is called but not granted."""
    lower_grants, lower_expected = {a.lower() for a in grants}, {a.lower() for a in expected}
    extra = sorted(a for a in grants if a.lower() not in lower_expected)
    missing = sorted(a for a in expected if a.lower() not in lower_grants)
    return (f"granted but never called: {extra}. " if extra else "") + (
        f"called but not granted: {missing}" if missing else ""
    )


def expected_workflow_actions() -> set[str]:
    sm = state_machine()
    used = {str(st["Resource"]) for st in _states(json.loads(sm["DefinitionString"])).values() if st["Type"] == "Task"}
    unknown = used - set(INTEGRATIONS)
    assert not unknown, f"integrations without an IAM mapping in INTEGRATIONS: {unknown}"
    expected = set().union(*(INTEGRATIONS[r] for r in used))
    topic = props(the_one("AWS::SNS::Topic"))
    if "arn:aws:states:::sns:publish" in used and "KmsMasterKeyId" in topic:
        expected |= KMS_PUBLISH  # publishing to an encrypted topic encrypts with its key, as the publisher
    if sm.get("LoggingConfiguration", {}).get("Destinations"):
        expected |= LOG_DELIVERY
    if sm.get("TracingConfiguration", {}).get("Enabled"):
        expected |= XRAY
    return expected


def _states(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, st in d["States"].items():
        out[name] = st
        for nested in ("Iterator", "ItemProcessor"):
            if nested in st:
                out.update(_states(st[nested]))
        for branch in st.get("Branches", []):
            out.update(_states(branch))
    return out


def expected_pipe_actions() -> set[str]:
    pipe = props(the_one("AWS::Pipes::Pipe"))
    assert resource_types(pipe["Source"]) == {"AWS::SQS::Queue"}, "only an SQS source is mapped"
    expected = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
    assert resource_types(pipe["Target"]) == {"AWS::StepFunctions::StateMachine"}, "only a state machine target"
    invocation = pipe["TargetParameters"]["StepFunctionStateMachineParameters"]["InvocationType"]
    expected.add(
        {"FIRE_AND_FORGET": "states:StartExecution", "REQUEST_RESPONSE": "states:StartSyncExecution"}[invocation]
    )
    if pipe.get("LogConfiguration", {}).get("CloudwatchLogsLogDestination"):
        expected |= LOG_WRITE
    return expected


def expected_execution_actions() -> set[str]:
    task = props(the_one("AWS::ECS::TaskDefinition"))
    expected = set(IMAGE_PULL)
    if any(c.get("LogConfiguration", {}).get("LogDriver") == "awslogs" for c in task["ContainerDefinitions"]):
        expected |= LOG_WRITE
    return expected


def test_task_code_calls_are_found_and_control_plane_code_is_not_part_of_a_task() -> None:
    modules = task_modules()
    assert {"processor.aws.s3", "processor.aws.dynamo", "processor.tasks"} <= set(modules)
    # CloudFormation, ECR, StartExecution, SQS: the CLI's, not a task's
    assert not {"processor.aws.cloudformation", "processor.aws.control", "processor.aws.ecr"} & set(modules)
    actions = task_code_actions()
    assert {"s3:GetObject", "dynamodb:BatchWriteItem", "states:SendTaskSuccess", "states:SendTaskHeartbeat"} <= set(
        actions
    )
    for (module, function), _why in NOT_RUN_BY_TASKS.items():
        short = function.rsplit(".", 1)[-1]
        for path in modules.values():
            for n in ast.walk(ast.parse(path.read_text())):
                if isinstance(n, ast.Call):
                    called = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                    assert called != short, f"{module}.{function} is excluded from the task role but {path} calls it"


def all_task_grants() -> set[str]:
    return set().union(*(granted(role) for role in task_roles().values()))


def test_task_roles_together_grant_exactly_the_aws_actions_the_task_code_calls() -> None:
    # Each kind's own share is checked by running it (test_each_task_kind_role_...); this static check covers the
    # code paths a run does not take (error paths, multipart transfers).
    calls = task_code_actions()
    diff = policy_diff(all_task_grants(), set(calls))
    assert not diff, (
        f"task roles: {diff}\nwhere the code calls what: "
        f"{json.dumps({k: sorted(v) for k, v in calls.items()}, indent=1)}"
    )


def test_every_ecs_state_runs_with_its_task_kinds_own_role_and_the_task_definition_has_none() -> None:
    roles = task_roles()
    validation = {"validate", "validate-part", "combine", "transform", "quarantine"}
    merging = {"merge", "merge-part", "merge-finish", "merge-fallback"}
    assert set(roles) == set(TASK_ROLES) == validation | merging
    families = {kind: TASK_ROLES[kind] for kind in roles}  # the validation of one file is one family, one role
    assert len(set(roles.values())) == len(set(families.values())), f"task kinds share a role: {roles}"
    assert all(roles[a] == roles[b] for a in roles for b in roles if families[a] == families[b]), roles
    assert "TaskRoleArn" not in props(the_one("AWS::ECS::TaskDefinition")), "a task run without override gets a role"
    # the kinds are the task entry point's subcommands
    from processor.tasks import build_parser

    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(roles) == set(subcommands or {})


def test_image_pull_is_scoped_to_the_stacks_own_repository() -> None:
    role = role_of(the_one("AWS::ECS::TaskDefinition"), "ExecutionRoleArn")
    for s in role_statements(role):
        actions = set(as_list(s["Action"]))
        if actions == {"ecr:GetAuthorizationToken"}:
            assert s["Resource"] == "*"  # no resource-level permissions
        elif any(a.startswith("ecr:") for a in actions):
            (resource,) = as_list(s["Resource"])
            assert sub_text(resource).endswith(":repository/${EnvironmentName}"), resource


def test_task_execution_role_only_pulls_the_image_and_writes_the_task_logs() -> None:
    role = role_of(the_one("AWS::ECS::TaskDefinition"), "ExecutionRoleArn")
    assert not policy_diff(granted(role), expected_execution_actions()), policy_diff(
        granted(role), expected_execution_actions()
    )
    for s in role_statements(role):
        if set(as_list(s["Action"])) & LOG_WRITE:
            assert referenced_ids(s["Resource"]) == {"TaskLogGroup"}


def test_workflow_role_grants_exactly_what_the_definitions_integrations_logging_and_tracing_need() -> None:
    role = role_of(the_one("AWS::StepFunctions::StateMachine"), "RoleArn")
    expected = expected_workflow_actions()
    assert not policy_diff(granted(role), expected), policy_diff(granted(role), expected)
    subs = state_machine()["DefinitionSubstitutions"]
    by_action = {a: s for s in role_statements(role) for a in as_list(s["Action"])}
    assert referenced_ids(by_action["sns:Publish"]["Resource"]) == referenced_ids(subs["AlertTopicArn"])
    assert referenced_ids(by_action["sqs:SendMessage"]["Resource"]) == referenced_ids(subs["DeadLetterQueueUrl"])
    task = the_one("AWS::ECS::TaskDefinition")
    passed = referenced_ids(by_action["iam:PassRole"]["Resource"])
    assert passed == set(task_roles().values()) | {role_of(task, "ExecutionRoleArn")}
    assert by_action["iam:PassRole"]["Condition"]["StringEquals"]["iam:PassedToService"] == "ecs-tasks.amazonaws.com"
    assert sub_text(subs["TaskDefinition"]) in sub_text(by_action["ecs:RunTask"]["Resource"])


def test_pipe_role_only_reads_the_buffer_starts_the_workflow_and_writes_its_log() -> None:
    pipe = the_one("AWS::Pipes::Pipe")
    role = role_of(pipe, "RoleArn")
    expected = expected_pipe_actions()
    assert not policy_diff(granted(role), expected), policy_diff(granted(role), expected)
    by_action = {a: s for s in role_statements(role) for a in as_list(s["Action"])}
    assert referenced_ids(by_action["sqs:ReceiveMessage"]["Resource"]) == referenced_ids(props(pipe)["Source"])
    assert referenced_ids(by_action["states:StartExecution"]["Resource"]) == referenced_ids(props(pipe)["Target"])


def test_every_role_is_checked_trusts_only_its_service_and_has_no_unchecked_policy() -> None:
    task = the_one("AWS::ECS::TaskDefinition")
    trusted = {
        **{role: "ecs-tasks.amazonaws.com" for role in task_roles().values()},
        role_of(task, "ExecutionRoleArn"): "ecs-tasks.amazonaws.com",
        role_of(the_one("AWS::StepFunctions::StateMachine"), "RoleArn"): "states.amazonaws.com",
        role_of(the_one("AWS::Pipes::Pipe"), "RoleArn"): "pipes.amazonaws.com",
    }
    roles = resources("AWS::IAM::Role")
    assert set(roles) == set(trusted), "a role no test holds to its callers"
    for name, role in roles.items():
        statements = as_list(role["Properties"]["AssumeRolePolicyDocument"]["Statement"])
        assert [s["Principal"] for s in statements] == [{"Service": trusted[name]}], name
        assert "ManagedPolicyArns" not in role["Properties"], f"{name}: a managed policy escapes these checks"
    assert not resources("AWS::IAM::Policy") and not resources("AWS::IAM::ManagedPolicy")


@cache
def iam_reference() -> dict[str, Any]:
    """cfn-lint's copy of the IAM service authorization reference: actions and the resource types they accept."""
    data: dict[str, Any] = json.loads(
        (Path(cfnlint.__file__).parent / "data/AdditionalSpecs/Policies.json").read_text()
    )
    return data


def test_each_action_is_scoped_to_resources_when_it_can_be_and_to_star_only_when_it_cannot() -> None:
    # An action without resource-level permissions matches only Resource "*": anything narrower silently denies it
    # (states:SendTaskSuccess on a state machine ARN would leave every task unable to report).
    for role in resources("AWS::IAM::Role"):
        for s in role_statements(role):
            for action in as_list(s["Action"]):
                assert "*" not in action, f"{role}: wildcard action {action}"
                service, name = action.split(":")
                entry = iam_reference()[service]["Actions"].get(name.lower())
                assert entry is not None, f"{role}: unknown IAM action {action}"
                scoped = as_list(s["Resource"]) != ["*"]
                if entry.get("Resources"):
                    assert scoped and "*" not in as_list(s["Resource"]), f"{role}: {action} on '*' (can be scoped)"
                else:
                    assert not scoped, f"{role}: {action} has no resource-level permissions; only '*' matches"


def test_policy_check_fails_on_a_grant_the_code_never_calls_and_on_a_call_the_role_lacks() -> None:
    grants = all_task_grants()
    expected = set(task_code_actions())
    assert "granted but never called: ['dynamodb:Scan']" in policy_diff(grants | {"dynamodb:Scan"}, expected)
    assert "called but not granted: ['dynamodb:BatchWriteItem']" in policy_diff(
        grants - {"dynamodb:BatchWriteItem"}, expected
    )
    new_call = (
        "class T:\n    def __init__(self, client: DynamoDBClient) -> None:\n        self.client = client\n"
        "    def f(self) -> None:\n        self.client.scan(TableName='t')\n"
    )
    assert client_calls(new_call) == {("T.f", "dynamodb", "scan")}
    assert iam_actions("dynamodb", "scan") == {"dynamodb:Scan"}


# --- what moto does not keep: read from the template ----------------------------------------------------------
def test_bucket_is_private_versioned_encrypted_tls_only_and_sends_events() -> None:
    bucket = props("LandingBucket")
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    assert bucket["NotificationConfiguration"]["EventBridgeConfiguration"] == {"EventBridgeEnabled": True}
    assert all(bucket["PublicAccessBlockConfiguration"].values()) and len(bucket["PublicAccessBlockConfiguration"]) == 4
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    (policy,) = [
        p for p in resources("AWS::S3::BucketPolicy").values() if p["Properties"]["Bucket"] == {"Ref": "LandingBucket"}
    ]
    (deny,) = policy["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_tasks_run_on_fargate_in_the_stack_network_with_https_egress_only() -> None:
    task = props(the_one("AWS::ECS::TaskDefinition"))
    assert task["RequiresCompatibilities"] == ["FARGATE"] and task["NetworkMode"] == "awsvpc"
    egress = props("TaskSecurityGroup")["SecurityGroupEgress"]
    assert [(e["IpProtocol"], e["FromPort"], e["ToPort"]) for e in egress] == [("tcp", 443, 443)]
    assert not props("TaskSecurityGroup").get("SecurityGroupIngress")


# --- data retention, encryption, naming limits, event delivery ------------------------------------------------
def test_bucket_and_tables_survive_a_stack_deletion_or_replacement() -> None:
    stateful = ["LandingBucket", *resources("AWS::DynamoDB::Table")]
    assert len(stateful) == 4
    for logical_id in stateful:
        resource = template()["Resources"][logical_id]
        assert resource.get("DeletionPolicy") in ("Retain", "Snapshot"), logical_id
        assert resource.get("UpdateReplacePolicy") in ("Retain", "Snapshot"), logical_id


def test_alert_topic_is_encrypted_with_a_stack_key_the_alarms_and_the_workflow_may_use() -> None:
    topic = props(the_one("AWS::SNS::Topic"))
    (key,) = referenced_ids(topic["KmsMasterKeyId"])
    assert template()["Resources"][key]["Type"] == "AWS::KMS::Key"  # alias/aws/sns would refuse the alarms
    assert props(key)["EnableKeyRotation"] is True
    (cloudwatch,) = [
        s for s in props(key)["KeyPolicy"]["Statement"] if s["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    ]
    assert {"kms:Decrypt", "kms:GenerateDataKey*"} <= set(as_list(cloudwatch["Action"]))
    role = role_of(the_one("AWS::StepFunctions::StateMachine"), "RoleArn")
    (kms,) = [s for s in role_statements(role) if set(as_list(s["Action"])) == KMS_PUBLISH]
    assert referenced_ids(kms["Resource"]) == {key}


#: The longest region names (ap-southeast-5, ap-northeast-3 ... are 14 characters; none is longer today).
LONGEST_REGION = "ap-southeast-5"


def test_bucket_name_stays_within_63_characters_for_the_longest_allowed_environment_name() -> None:
    parameter = template()["Parameters"]["EnvironmentName"]
    (low, high) = map(int, re.fullmatch(r"\[a-z\]\[a-z0-9-\]\{(\d+),(\d+)\}", parameter["AllowedPattern"]).groups())  # type: ignore[union-attr]
    longest = "e" * (1 + high)
    name = sub_text(props("LandingBucket")["BucketName"]).replace("${EnvironmentName}", longest)
    name = name.replace("${AWS::AccountId}", "123456789012").replace("${AWS::Region}", LONGEST_REGION)
    assert "${" not in name and len(name) <= 63, f"{name}: {len(name)} characters"
    assert low >= 1


def test_object_created_events_go_to_a_dead_letter_queue_when_the_buffer_cannot_take_them() -> None:
    (target,) = props("ObjectCreatedRule")["Targets"]
    (dlq,) = referenced_ids(target["DeadLetterConfig"]["Arn"])
    assert template()["Resources"][dlq]["Type"] == "AWS::SQS::Queue" and dlq != "BufferQueue"
    (policy,) = [
        p for p in resources("AWS::SQS::QueuePolicy").values() if dlq in referenced_ids(p["Properties"]["Queues"])
    ]
    (statement,) = [
        s
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        if s["Principal"] == {"Service": "events.amazonaws.com"} and dlq in referenced_ids(s["Resource"])
    ]
    assert statement["Action"] == "sqs:SendMessage"
    assert referenced_ids(statement["Condition"]["ArnEquals"]["aws:SourceArn"]) == {"ObjectCreatedRule"}


def test_rendering_drops_comment_lines_and_nothing_else() -> None:
    source: dict[str, Any] = yaml.load(template_text(), Loader=CfnLoader)
    rendered_data = dict(template())
    source["Resources"]["StateMachine"]["Properties"].pop("DefinitionString")
    rendered_data["Resources"] = {
        k: (
            {**v, "Properties": {p: w for p, w in v["Properties"].items() if p != "DefinitionString"}}
            if k == "StateMachine"
            else v
        )
        for k, v in rendered_data["Resources"].items()
    }
    assert rendered_data == source
    assert not any(line.lstrip().startswith("#") for line in rendered().splitlines())
