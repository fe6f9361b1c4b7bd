"""Client construction and the translation of AWS exceptions into the project's hierarchy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from processor.aws.clients import aws_call, make_clients, translate
from processor.errors import (
    AccessDenied,
    AwsError,
    NotFound,
    ServiceUnavailable,
    Throttled,
)
from processor.settings import Settings


def client_error(code: str, status: int = 400, op: str = "GetObject") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": f"{code} happened"},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "req-1"},
    }
    return ClientError(response, op)


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("ThrottlingException", 400, Throttled),
        ("ProvisionedThroughputExceededException", 400, Throttled),
        ("RequestLimitExceeded", 400, Throttled),
        ("SlowDown", 503, Throttled),
        ("InternalError", 500, ServiceUnavailable),
        ("SomethingNew", 502, ServiceUnavailable),
        ("NoSuchKey", 404, NotFound),
        ("NoSuchBucket", 404, NotFound),
        ("ResourceNotFoundException", 400, NotFound),
        ("404", 404, NotFound),
        ("AccessDenied", 403, AccessDenied),
        ("AccessDeniedException", 400, AccessDenied),
        ("ValidationException", 400, AwsError),
        ("ConditionalCheckFailedException", 400, AwsError),
    ],
)
def test_client_errors_map_to_the_project_hierarchy(code: str, status: int, expected: type) -> None:
    err = translate(client_error(code, status), "s3.get_object", bucket="b")
    assert type(err) is expected
    assert err.retryable == (expected in (Throttled, ServiceUnavailable))
    assert err.context["aws_code"] == code
    assert err.context["aws_operation"] == "GetObject"
    assert err.context["operation"] == "s3.get_object"
    assert err.context["http_status"] == status
    assert err.context["bucket"] == "b"
    assert err.to_dict()["code"] == expected.code  # the context never shadows the project code


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (EndpointConnectionError(endpoint_url="http://x"), ServiceUnavailable),
        (ReadTimeoutError(endpoint_url="http://x"), ServiceUnavailable),
        (NoCredentialsError(), AccessDenied),
        (ParamValidationError(report="bad"), AwsError),
    ],
)
def test_botocore_errors_map_by_kind(exc: Exception, expected: type) -> None:
    assert type(translate(exc, "op")) is expected


def test_managed_transfer_wrappers_are_classified_by_their_cause() -> None:
    try:
        try:
            raise client_error("SlowDown", 503, "UploadPart")
        except ClientError as e:
            raise S3UploadFailedError("Failed to upload") from e
    except S3UploadFailedError as wrapped:
        assert type(translate(wrapped, "s3.upload")) is Throttled
    exhausted = RetriesExceededError(cast(Any, ReadTimeoutError(endpoint_url="x")))
    assert type(translate(exhausted, "s3.download")) is ServiceUnavailable


def test_project_errors_pass_through_unchanged() -> None:
    original = NotFound("gone")
    assert translate(original) is original


def test_aws_call_translates_as_context_manager_and_as_decorator() -> None:
    with pytest.raises(NotFound) as e, aws_call("dynamodb.get_item", table="t"):
        raise client_error("ResourceNotFoundException")
    assert e.value.context["table"] == "t"
    assert isinstance(e.value.__cause__, ClientError)

    @aws_call("s3.put_object", key="k")
    def put() -> None:
        raise client_error("ThrottlingException")

    with pytest.raises(Throttled):
        put()

    with pytest.raises(ValueError), aws_call("op"):  # not an AWS error: untouched
        raise ValueError("bug")


def test_make_clients_honours_endpoint_region_and_pool_size() -> None:
    settings = Settings.load(env={}, endpoint_url="http://127.0.0.1:5999", region="eu-west-1", writer_threads=16)
    clients = make_clients(settings)
    for client in (clients.s3, clients.dynamodb, clients.sqs, clients.stepfunctions):
        config: Any = client.meta.config
        assert client.meta.endpoint_url == "http://127.0.0.1:5999"
        assert client.meta.region_name == "eu-west-1"
        assert config.max_pool_connections >= 32
        assert config.retries["mode"] == "standard"
    s3_config: Any = clients.s3.meta.config
    assert s3_config.s3["addressing_style"] == "path"
    assert clients.sqs is clients.sqs  # built once, on first use


def test_make_clients_uses_local_credentials_against_an_endpoint_when_none_are_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    clients = make_clients(Settings.load(env={}, endpoint_url="http://127.0.0.1:5999"))
    assert clients.session.get_credentials() is not None


def test_make_clients_without_endpoint_goes_to_aws() -> None:
    clients = make_clients(Settings.load(env={}))
    assert "amazonaws.com" in clients.dynamodb.meta.endpoint_url
