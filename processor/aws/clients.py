"""Client construction and the one place where AWS exceptions become project exceptions.

Every boto3 call of the project goes through :func:`aws_call`, so the rest of the code only ever sees
:class:`~processor.errors.ShopKpiError` subclasses: the state machine's Retry/Catch lists match on their
codes, and a botocore exception type never leaks into business logic.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
from boto3.exceptions import Boto3Error, RetriesExceededError
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.parsers import ResponseParserError

from processor.errors import (
    AccessDenied,
    AwsError,
    NotFound,
    ServiceUnavailable,
    ShopKpiError,
    Throttled,
)
from processor.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_s3 import S3Client

__all__ = ["Clients", "aws_call", "make_clients", "translate"]

# Codes AWS uses for "slow down" (S3 says SlowDown, DynamoDB ProvisionedThroughputExceeded...).
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "SlowDown",
        "EC2ThrottledException",
        "LimitExceededException",  # DynamoDB: too many concurrent control-plane operations
        "TransactionInProgressException",
    }
)
# Transient server-side failures that do not come with a 5xx status on every service.
UNAVAILABLE_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
    }
)
NOT_FOUND_CODES = frozenset(
    {
        "404",  # HEAD requests carry no body, so S3 reports a missing key by status only
        "NoSuchKey",
        "NoSuchBucket",
        "NoSuchUpload",
        "NotFound",
        "ResourceNotFoundException",
        "TableNotFoundException",
        "StateMachineDoesNotExist",
        "ExecutionDoesNotExist",
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
    }
)
ACCESS_CODES = frozenset(
    {
        "UnauthorizedOperation",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "ExpiredToken",
        "ExpiredTokenException",
        "Forbidden",
        "403",
    }
)


def _classify(code: str, status: int | None) -> type[ShopKpiError]:
    if code in THROTTLING_CODES:
        return Throttled
    if code in NOT_FOUND_CODES or status == 404:
        return NotFound
    if code.startswith("AccessDenied") or code in ACCESS_CODES:
        return AccessDenied
    if code in UNAVAILABLE_CODES or (status is not None and status >= 500):
        return ServiceUnavailable
    return AwsError


def translate(err: BaseException, op: str = "aws", **ctx: Any) -> ShopKpiError:
    """Map a boto3/botocore exception to the project's hierarchy, keeping AWS code and operation in context.

    A :class:`ShopKpiError` is returned unchanged (already translated further down the stack).
    """
    if isinstance(err, ShopKpiError):
        return err
    # boto3's managed transfers wrap the ClientError that actually happened; classify the original.
    last = getattr(err, "last_exception", None)
    if isinstance(err, RetriesExceededError) and isinstance(last, BaseException):
        return translate(last, op, **ctx)
    if isinstance(err, Boto3Error):
        inner = err.__cause__ or err.__context__
        if isinstance(inner, ClientError | BotoCoreError):
            return translate(inner, op, **ctx)
    context: dict[str, Any] = {"operation": op, **ctx}
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        meta = err.response.get("ResponseMetadata", {})
        code = str(error.get("Code") or "Unknown")
        status = meta.get("HTTPStatusCode")
        context.update(aws_code=code, aws_operation=err.operation_name, http_status=status)
        if meta.get("RequestId"):
            context["request_id"] = meta["RequestId"]
        cls = _classify(code, status if isinstance(status, int) else None)
        detail = error.get("Message") or code
        return cls(f"{op}: {code}: {detail}", **context)
    if isinstance(err, BotoCoreError):
        context["aws_code"] = type(err).__name__
        # Network-level failures (connect/read timeouts, dropped connections, truncated bodies) are transient.
        if isinstance(err, ConnectionError | HTTPClientError | IncompleteReadError):
            return ServiceUnavailable(f"{op}: {err}", **context)
        if isinstance(err, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return AccessDenied(f"{op}: {err}", **context)
        return AwsError(f"{op}: {err}", **context)
    context["aws_code"] = type(err).__name__
    if isinstance(err, ResponseParserError):  # an unparsable body, e.g. a 500 page from a proxy: transient
        return ServiceUnavailable(f"{op}: {err}", **context)
    return AwsError(f"{op}: {err}", **context)


@contextmanager
def aws_call(op: str, **ctx: Any) -> Iterator[None]:
    """Translate AWS exceptions raised in the block (or the decorated function) into :class:`ShopKpiError`.

    ``op`` names the operation for logs and error context (``"s3.get_object"``); ``ctx`` adds identifying
    fields (``bucket=..., key=...``). Usable as ``with aws_call(...):`` or as a decorator
    ``@aws_call("...")``.
    """
    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error, ResponseParserError) as e:
        raise translate(e, op, **ctx) from e


# Credentials used when an endpoint (the embedded moto server) is set and the standard chain finds none: the
# local stack accepts any credentials, and a developer should not need an AWS account to run it.
_LOCAL_KEY = "shopkpi-local"


@dataclass
class Clients:
    """The AWS clients of one process. S3 and DynamoDB are built eagerly; the others on first use.

    botocore clients are thread-safe, so one :class:`Clients` is shared by all worker threads.
    """

    s3: S3Client
    dynamodb: DynamoDBClient
    session: boto3.session.Session
    config: Config
    endpoint_url: str | None
    region: str
    _extra: dict[str, BaseClient] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def client(self, service: str) -> Any:
        """A client of any other service with the same endpoint, region and retry policy (cached)."""
        with self._lock:
            if service not in self._extra:
                self._extra[service] = _build(self.session, service, self.endpoint_url, self.region, self.config)
            return self._extra[service]

    @property
    def stepfunctions(self) -> Any:
        return self.client("stepfunctions")

    @property
    def cloudformation(self) -> Any:
        return self.client("cloudformation")

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    @property
    def sns(self) -> Any:
        return self.client("sns")


def client_config(settings: Settings) -> Config:
    """Retries in botocore's standard mode (throttling-aware, with its own backoff) and a connection pool wide
    enough for every parallel DynamoDB writer plus S3 transfer threads: no thread queues for a socket."""
    extra: dict[str, Any] = {}
    if settings.endpoint_url:
        # The embedded server is addressed by host:port; virtual-hosted bucket names would not resolve.
        extra["s3"] = {"addressing_style": "path"}
    return Config(
        region_name=settings.region,
        retries={"mode": "standard", "max_attempts": 8},
        max_pool_connections=max(16, settings.writer_threads * 2),
        connect_timeout=10,
        read_timeout=60,
        tcp_keepalive=True,
        **extra,
    )


def _build(session: boto3.session.Session, service: str, endpoint_url: str | None, region: str, config: Config) -> Any:
    return session.client(service, endpoint_url=endpoint_url, region_name=region, config=config)  # type: ignore[call-overload]


def make_clients(settings: Settings, session: boto3.session.Session | None = None) -> Clients:
    """Build the clients of ``settings``: every call goes to ``settings.endpoint_url`` when it is set, else to
    AWS through the standard credential chain."""
    if session is None:
        session = boto3.session.Session(region_name=settings.region)
        if settings.endpoint_url and session.get_credentials() is None:
            session = boto3.session.Session(
                aws_access_key_id=_LOCAL_KEY, aws_secret_access_key=_LOCAL_KEY, region_name=settings.region
            )
    config = client_config(settings)
    return Clients(
        s3=_build(session, "s3", settings.endpoint_url, settings.region, config),
        dynamodb=_build(session, "dynamodb", settings.endpoint_url, settings.region, config),
        session=session,
        config=config,
        endpoint_url=settings.endpoint_url,
        region=settings.region,
    )
