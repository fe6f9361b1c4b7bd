"""Each task kind's role allows what that kind's code really does, on the keys and items it really touches, and
nothing a compromised task of another kind would need: every task kind runs here against moto with each AWS request
it makes recorded, and the template's policy of its role is evaluated against each request."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import boto3.s3.inject
import botocore.client
import pytest

from processor.aws.s3 import event_key
from processor.schema import DATASETS
from processor.settings import Settings
from processor.stage import file_id_for
from processor.tasks import main
from tests.builders import item, order, product
from tests.conftest import TASK_BUCKET
from tests.infra.test_template import as_list, granted, policy_diff, role_statements, task_code_actions, task_roles

BUCKET = TASK_BUCKET
ACCOUNT = "123456789012"
REGION = "us-east-1"


@dataclass(frozen=True)
class Request:
    """One IAM authorisation a call needs: action, resource ARN and, for DynamoDB items, the partition key."""

    action: str
    resource: str
    leading_key: str | None = None


# --- the template's policies, evaluated -------------------------------------------------------------------------
def resolve(value: Any, physical: dict[str, str]) -> str:
    """A policy's Resource value (``!Sub``/``!GetAtt``/``!Ref`` of this stack's resources) as a concrete ARN."""
    arns = {
        "LandingBucket.Arn": f"arn:aws:s3:::{physical['LandingBucket']}",
        **{
            f"{table}.Arn": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{physical[table]}"
            for table in ("OrderKpisTable", "CategoryKpisTable", "LedgerTable")
        },
        "AWS::Partition": "aws",
        "AWS::Region": REGION,
        "AWS::AccountId": ACCOUNT,
    }
    if isinstance(value, str):
        return value
    if "Fn::GetAtt" in value:
        return arns[".".join(value["Fn::GetAtt"])]
    if "Fn::Sub" in value:
        text = value["Fn::Sub"]
        for name, arn in arns.items():
            text = text.replace("${" + name + "}", arn)
        assert "${" not in text, text
        return str(text)
    raise AssertionError(f"cannot resolve {value}")


def allows(role: str, request: Request, physical: dict[str, str]) -> bool:
    for s in role_statements(role):
        assert s["Effect"] == "Allow", f"{role}: only Allow statements are evaluated here"
        if request.action.lower() not in {a.lower() for a in as_list(s["Action"])}:
            continue
        if not any(fnmatch.fnmatchcase(request.resource, resolve(r, physical)) for r in as_list(s["Resource"])):
            continue
        condition = s.get("Condition", {})
        if condition:
            assert list(condition) == ["ForAllValues:StringLike"], f"unsupported condition {condition}"
            (key, patterns), *rest = condition["ForAllValues:StringLike"].items()
            assert key == "dynamodb:LeadingKeys" and not rest, f"unsupported condition {condition}"
            if request.leading_key is not None and not any(
                fnmatch.fnmatchcase(request.leading_key, p) for p in patterns
            ):
                continue
        return True
    return False


# --- recording what each kind's code calls ----------------------------------------------------------------------
def _s3(bucket: str, key: str) -> str:
    return f"arn:aws:s3:::{bucket}/{key}"


def _source(copy_source: Any) -> str:
    if isinstance(copy_source, dict):
        return _s3(copy_source["Bucket"], copy_source["Key"])
    bucket, _, key = str(copy_source).lstrip("/").partition("/")
    return _s3(bucket, key.split("?")[0])


S3_OPERATIONS: dict[str, Callable[[dict[str, Any]], list[Request]]] = {
    "HeadObject": lambda p: [Request("s3:GetObject", _s3(p["Bucket"], p["Key"]))],
    "GetObject": lambda p: [Request("s3:GetObject", _s3(p["Bucket"], p["Key"]))],
    "PutObject": lambda p: [Request("s3:PutObject", _s3(p["Bucket"], p["Key"]))],
    "CreateMultipartUpload": lambda p: [Request("s3:PutObject", _s3(p["Bucket"], p["Key"]))],
    "UploadPart": lambda p: [Request("s3:PutObject", _s3(p["Bucket"], p["Key"]))],
    "CompleteMultipartUpload": lambda p: [Request("s3:PutObject", _s3(p["Bucket"], p["Key"]))],
    "AbortMultipartUpload": lambda p: [Request("s3:AbortMultipartUpload", _s3(p["Bucket"], p["Key"]))],
    "CopyObject": lambda p: [
        Request("s3:PutObject", _s3(p["Bucket"], p["Key"])),
        Request("s3:GetObject", _source(p["CopySource"])),
    ],
    "UploadPartCopy": lambda p: [
        Request("s3:PutObject", _s3(p["Bucket"], p["Key"])),
        Request("s3:GetObject", _source(p["CopySource"])),
    ],
    "DeleteObject": lambda p: [Request("s3:DeleteObject", _s3(p["Bucket"], p["Key"]))],
    "ListObjectsV2": lambda p: [Request("s3:ListBucket", f"arn:aws:s3:::{p['Bucket']}")],
}


def _table(name: str, index: str | None = None) -> str:
    return f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}" + (f"/index/{index}" if index else "")


def _leading(item: dict[str, Any] | None) -> str | None:
    """The ledger's partition key (``pk``) of an item or key; other tables are not conditioned on it."""
    return str(item["pk"]["S"]) if item and "pk" in item else None


def dynamodb_requests(op: str, p: dict[str, Any]) -> list[Request]:
    action = f"dynamodb:{op}"
    if op == "BatchGetItem":
        return [Request(action, _table(t), _leading(k)) for t, spec in p["RequestItems"].items() for k in spec["Keys"]]
    if op == "BatchWriteItem":
        return [
            Request(action, _table(t), _leading(w.get("PutRequest", {}).get("Item") or w["DeleteRequest"]["Key"]))
            for t, writes in p["RequestItems"].items()
            for w in writes
        ]
    return [Request(action, _table(p["TableName"], p.get("IndexName")), _leading(p.get("Key") or p.get("Item")))]


@dataclass
class Recorder:
    requests: list[Request]
    active: bool = False


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Every IAM authorisation the boto3 calls of this process need while ``active``, in order."""
    rec = Recorder([])
    seen = rec.requests
    original = botocore.client.BaseClient._make_api_call

    def record(self: Any, operation: str, params: dict[str, Any]) -> Any:
        service = self.meta.service_model.service_name
        if not rec.active:
            pass
        elif service == "s3":
            assert operation in S3_OPERATIONS, f"S3 {operation}: map it to IAM in S3_OPERATIONS"
            seen.extend(S3_OPERATIONS[operation](params))
        elif service == "dynamodb":
            seen.extend(dynamodb_requests(operation, params))
        else:
            raise AssertionError(f"unexpected {service}.{operation} from a task")
        return original(self, operation, params)

    def managed(name: str) -> Callable[..., Any]:
        # boto3's managed transfers abort a multipart upload that fails: the role needs it on the destination
        inner = getattr(boto3.s3.inject, name)

        def transfer(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not rec.active:
                return inner(self, *args, **kwargs)
            bucket, key = (args[1], args[2]) if len(args) >= 3 else (kwargs["Bucket"], kwargs["Key"])
            seen.append(Request("s3:AbortMultipartUpload", _s3(bucket, key)))
            return inner(self, *args, **kwargs)

        return transfer

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", record)
    for name in ("upload_file", "copy"):
        monkeypatch.setattr(boto3.s3.inject, name, managed(name))
    return rec


@dataclass
class Runs:
    physical: dict[str, str]
    by_kind: dict[str, list[Request]]


def _csv(path: Path, rows: list[dict[str, object]]) -> Path:
    dataset = next(DATASETS[n] for n in sorted(DATASETS, key=len, reverse=True) if path.name.startswith(n))
    lines = [",".join(dataset.names)]
    lines += [",".join("" if r.get(c) is None else str(r[c]) for c in dataset.names) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def runs(
    task_stack: Settings,
    tmp_path: Path,
    recorder: Recorder,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Runs]:
    """Every task kind run once or more through ``shopkpi-task`` against moto: three accepted files (one delivered
    twice), one rejected file, a big file in parts, a merge and a reprocessing merge. One scenario in the order
    the workflow runs it (hence its length): each call is recorded under the kind that made it."""
    s3 = boto3.client("s3")
    by_kind: dict[str, list[Request]] = {}

    def task(*argv: str) -> dict[str, Any]:
        recorder.requests.clear()
        recorder.active = True
        try:
            code = main(list(argv))
        finally:
            recorder.active = False
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        result: dict[str, Any] = next(x for x in reversed(lines) if x.get("event") == "task.result")
        assert code == 0, result
        by_kind.setdefault(argv[0], []).extend(recorder.requests)
        return result

    files = {
        "incoming/products/p.csv": _csv(tmp_path / "products.csv", [product(1, "Books")]),
        "incoming/orders/o.csv": _csv(
            tmp_path / "orders.csv", [order(10, 100, "2025-03-01T08:00:00"), order(11, 101, "2025-03-01T09:00:00")]
        ),
        "incoming/order_items/i.csv": _csv(
            tmp_path / "order_items.csv", [item(1, 10, 100, 1, "4.00"), item(2, 11, 101, 1, "5.00")]
        ),
    }

    def landed(key: str) -> str:
        """The workflow's input for a landed file, as ``validate --event`` receives it."""
        etag = s3.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
        return json.dumps({"bucket": BUCKET, "key": event_key(key), "etag": etag})

    for key, path in files.items():
        s3.upload_file(str(path), BUCKET, key)
        accepted = task("validate", "--event", landed(key))
        assert accepted["outcome"] == "accepted"
        task("transform", str(accepted["file_id"]))
    with pytest.MonkeyPatch.context() as env:  # the first load, fanned out: a plan, its parts, the final step
        env.setenv("SHOPKPI_FANOUT_ROWS", "1")
        env.setenv("SHOPKPI_MERGE_PARTS", "2")
        fanned = task("merge")["fanout"]
    for part in fanned["parts"]:
        task("merge-part", json.dumps({"plan": fanned["plan"], "part": part}))
    task("merge-finish", fanned["plan"])
    # a fan-out that failed: its lock let go (here it was committed and swept already), then a merge as one task
    task("merge-fallback", fanned["plan"], "--error", json.dumps({"Error": "ShopKpi.StalePlan"}))
    # a redelivered event after the move: the source is gone (404, not 403, thanks to s3:ListBucket), its report not
    s3.upload_file(str(files["incoming/orders/o.csv"]), BUCKET, "incoming/orders/o.csv")
    event = landed("incoming/orders/o.csv")
    assert task("validate", "--event", event)["duplicate"] is True
    task("transform", _file_id(event))
    assert task("validate", "--event", event)["outcome"] == "skipped"
    bad = tmp_path / "orders_bad.csv"
    bad.write_text("order_id,status\n1,complete\n")
    s3.upload_file(str(bad), BUCKET, "incoming/orders/bad.csv")
    rejected = task("validate", "--event", landed("incoming/orders/bad.csv"))
    assert rejected["outcome"] == "rejected"
    task("quarantine", str(rejected["file_id"]))
    # a big file: validate plans the split, each part is validated, then combined (and its parts removed)
    big = _csv(tmp_path / "orders_big.csv", [order(100 + i, 100, "2025-03-02T08:00:00") for i in range(2_000)])
    s3.upload_file(str(big), BUCKET, "incoming/orders/big.csv")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SHOPKPI_MAX_RECORD_KB", "1")
        env.setenv("SHOPKPI_SPLIT_MB", str(big.stat().st_size / 2 / (1 << 20)))
        env.setenv("SHOPKPI_PART_MB", str(big.stat().st_size / 3 / (1 << 20)))
        plan = task("validate", "--event", landed("incoming/orders/big.csv"))["split"]
        for part in plan["parts"]:
            job = {k: plan[k] for k in ("file_id", "source", "arrival", "header_end")} | {"part": part}
            task("validate-part", json.dumps(job))
        assert task("combine", json.dumps(plan))["outcome"] == "accepted"
    task("merge", "--from", "2025-03-01", "--to", "2025-03-02")
    physical = {
        "LandingBucket": BUCKET,
        "OrderKpisTable": task_stack.order_table,
        "CategoryKpisTable": task_stack.category_table,
        "LedgerTable": task_stack.ledger_table,
    }
    yield Runs(physical, by_kind)


def _file_id(event: str) -> str:
    data = json.loads(event)
    return file_id_for(f"s3://{data['bucket']}/{data['key']}", data["etag"])


#: The calls every kind makes through the task token (processor.aws.callback, run by processor.tasks.main for every
#: command); a test run has no token, so these come from the code, not from the recording.
TOKEN_ACTIONS = {"states:SendTaskSuccess", "states:SendTaskFailure", "states:SendTaskHeartbeat"}


def test_each_task_kind_role_allows_every_call_its_code_makes_and_grants_no_other_action(runs: Runs) -> None:
    roles = task_roles()
    assert set(runs.by_kind) == set(roles)
    assert set(task_code_actions()) >= TOKEN_ACTIONS
    used_by_role: dict[str, set[str]] = {}
    for kind, requests in runs.by_kind.items():
        denied = sorted(
            {(r.action, r.resource, r.leading_key) for r in requests if not allows(roles[kind], r, runs.physical)}
        )
        assert not denied, f"{kind} ({roles[kind]}) is denied calls its code makes: {denied}"
        used_by_role.setdefault(roles[kind], set()).update({r.action for r in requests} | TOKEN_ACTIONS)
    # kinds that share a role (a big file's validate-part and combine run as validate) share its grants
    for role, used in used_by_role.items():
        if "s3:GetObject" in used:
            used.add("s3:ListBucket")  # a missing key must answer 404 (the code's NotFound), not 403
        diff = policy_diff(granted(role), used)
        assert not diff, f"{role}: {diff}"


# --- what a compromised task of one kind cannot do ---------------------------------------------------------------
PHYSICAL = {"LandingBucket": BUCKET, "OrderKpisTable": "o", "CategoryKpisTable": "c", "LedgerTable": "l"}


def can(kind: str, action: str, resource: str, leading_key: str | None = None) -> bool:
    if not resource.startswith("arn:"):
        resource = _table(resource) if action.startswith("dynamodb:") else _s3(BUCKET, resource)
    return allows(task_roles()[kind], Request(action, resource, leading_key), PHYSICAL)


def test_validate_role_cannot_write_committed_staging_publish_kpis_or_take_the_merge_lock() -> None:
    assert can("validate", "s3:PutObject", "staging/segments/orders/f-1.parquet")  # its own, uncommitted segment
    assert can("validate", "s3:PutObject", "reports/f-1/report.json")
    for key in ("staging/manifest/f-1.json", "staging/state/head.json", "archive/orders/x.csv", "incoming/x.csv"):
        assert not can("validate", "s3:PutObject", key), key
    for key in ("incoming/x.csv", "staging/segments/orders/f-1.parquet", "reports/f-1/report.json"):
        assert not can("validate", "s3:DeleteObject", key), key
    assert not can("validate", "s3:GetObject", "staging/state/head.json")
    assert can("validate", "dynamodb:PutItem", "l", "FILE#f-1")
    assert not can("validate", "dynamodb:PutItem", "l", "LOCK#merge")
    assert not can("validate", "dynamodb:PutItem", "l", "COUNTER#generation")
    for table in ("o", "c"):
        for action in ("dynamodb:BatchWriteItem", "dynamodb:PutItem", "dynamodb:UpdateItem"):
            assert not can("validate", action, table), (action, table)


def test_transform_and_quarantine_roles_only_move_files_and_touch_no_table_or_staging_state() -> None:
    assert can("transform", "s3:PutObject", "staging/manifest/f-1.json")
    assert can("transform", "s3:PutObject", "archive/orders/2025-03-01/o.csv")
    assert can("quarantine", "s3:PutObject", "rejected/orders/2025-03-01/bad.csv")
    for kind in ("transform", "quarantine"):
        assert can(kind, "s3:DeleteObject", "incoming/orders/o.csv")
        for key in ("staging/state/head.json", "staging/segments/orders/f-1.parquet", "reports/f-1/report.json"):
            assert not can(kind, "s3:PutObject", key), (kind, key)
            assert not can(kind, "s3:DeleteObject", key), (kind, key)
        assert not any(a.startswith("dynamodb:") for a in granted(task_roles()[kind])), kind
    assert not can("quarantine", "s3:PutObject", "archive/orders/x.csv")
    assert not can("quarantine", "s3:PutObject", "staging/manifest/f-1.json")
    assert not can("transform", "s3:PutObject", "rejected/orders/x.csv")


def test_merge_role_cannot_touch_landed_files_reports_or_file_records() -> None:
    assert can("merge", "s3:PutObject", "staging/state/head.json")
    assert can("merge", "dynamodb:BatchWriteItem", "o") and can("merge", "dynamodb:BatchWriteItem", "c")
    for key in ("incoming/orders/o.csv", "archive/orders/x.csv", "rejected/x.csv", "reports/f-1/report.json"):
        assert not can("merge", "s3:GetObject", key), key
        assert not can("merge", "s3:PutObject", key), key
        assert not can("merge", "s3:DeleteObject", key), key
    assert can("merge", "dynamodb:UpdateItem", "l", "LOCK#merge")
    assert not can("merge", "dynamodb:PutItem", "l", "FILE#f-1")


def test_policy_evaluation_matches_prefixes_and_leading_keys_as_iam_does() -> None:
    # the evaluator the tests above rely on: a prefix pattern stops at its prefix, a leading-key condition applies
    assert resolve({"Fn::Sub": "${LandingBucket.Arn}/staging/segments/*"}, PHYSICAL) == (
        f"arn:aws:s3:::{BUCKET}/staging/segments/*"
    )
    assert fnmatch.fnmatchcase(_s3(BUCKET, "staging/segments/a/b.parquet"), f"arn:aws:s3:::{BUCKET}/staging/segments/*")
    assert not fnmatch.fnmatchcase(_s3(BUCKET, "staging/manifest/b.json"), f"arn:aws:s3:::{BUCKET}/staging/segments/*")
    assert dynamodb_requests("PutItem", {"TableName": "l", "Item": {"pk": {"S": "FILE#x"}}}) == [
        Request("dynamodb:PutItem", _table("l"), "FILE#x")
    ]
