"""What the table modules share: the one item codec (Python values <-> DynamoDB's wire format), single-item reads,
and batch reads and writes that retry what DynamoDB hands back unprocessed."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack

import msgspec
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from processor.aws.clients import aws_call
from processor.errors import Throttled

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

T = TypeVar("T")
#: An item in DynamoDB's wire format: attribute name -> ``{"S": ...}`` / ``{"N": ...}`` / ...
Item = dict[str, Any]

BATCH_GET_MAX = 100  # DynamoDB limit per BatchGetItem
BATCH_WRITE_MAX = 25  # DynamoDB limit per BatchWriteItem

_SERIALIZER = TypeSerializer()
_DESERIALIZER = TypeDeserializer()


# --- the codec ----------------------------------------------------------------------------------------------
def _to_dynamo(value: Any) -> Any:
    """Python values -> values TypeSerializer accepts (floats become exact Decimals of their repr)."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {str(k): _to_dynamo(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_dynamo(v) for v in value]
    return value


def _from_dynamo(value: Any) -> Any:
    """TypeDeserializer output -> plain JSON-able values (integral Decimals become int, others float)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _from_dynamo(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_dynamo(v) for v in value]
    if isinstance(value, set):
        return sorted(_from_dynamo(v) for v in value)
    return value


def _attribute(value: Any) -> dict[str, Any]:
    # Strings and numbers directly (the KPI items are thousands of them per publish); the rest through boto3.
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return {"N": str(value)}
    return dict(_SERIALIZER.serialize(_to_dynamo(value)))


def encode(record: Mapping[str, Any]) -> Item:
    """A record (attribute name -> Python value: str, int, float, Decimal, bool, lists, dicts, Structs) as an item,
    or a key, or expression values. ``None`` attributes are left out; floats are stored as the exact decimal of their
    ``repr``; Decimals keep their digits (fixed-point in, fixed-point out)."""
    plain = msgspec.to_builtins(dict(record), builtin_types=(Decimal,))
    return {k: _attribute(v) for k, v in plain.items() if v is not None}


def decode(item: Item) -> dict[str, Any]:
    """An item as plain JSON-able values: numbers as int when integral, else float; sets as sorted lists."""
    return {k: _from_dynamo(_DESERIALIZER.deserialize(v)) for k, v in item.items()}


def chunks(seq: Sequence[T], size: int) -> list[Sequence[T]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def iso_now(clock: Callable[[], float]) -> str:
    """``clock``'s time as ISO-8601 UTC with microseconds and ``Z``: lexical order is time order."""
    return datetime.fromtimestamp(clock(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def get_item(client: DynamoDBClient, table: str, key: Item, **context: Any) -> Item | None:
    """One item by its key, read consistently; None when there is none."""
    with aws_call("dynamodb.get_item", table=table, **context):
        r = client.get_item(TableName=table, Key=key, ConsistentRead=True)
    item = r.get("Item")
    return dict(item) if item else None


# --- batches ------------------------------------------------------------------------------------------------
class Backoff(TypedDict, total=False):
    """Retries of unprocessed keys and items: attempts (default 8), first and largest delay in seconds (0.05, 5.0),
    and the sleep (injectable for tests)."""

    max_attempts: int
    base_delay: float
    max_delay: float
    sleep: Callable[[float], None]


class Batches:
    """BatchGetItem and BatchWriteItem, with exponential backoff and full jitter for the keys and items DynamoDB
    hands back unprocessed (partial throttling: botocore's own retries only cover requests that fail as a whole).
    After ``max_attempts`` a call raises :class:`~processor.errors.Throttled` (retryable)."""

    def __init__(self, client: DynamoDBClient, **backoff: Unpack[Backoff]) -> None:
        self.client = client
        self.max_attempts = backoff.get("max_attempts", 8)
        self.base_delay = backoff.get("base_delay", 0.05)
        self.max_delay = backoff.get("max_delay", 5.0)
        self.sleep = backoff.get("sleep", time.sleep)

    def _wait(self, attempt: int) -> None:
        self.sleep(random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt)))

    def get(self, request: dict[str, Any]) -> list[tuple[str, Item]]:
        """The items of one BatchGetItem request (table -> keys and projection), as (table, item) pairs."""
        out: list[tuple[str, Item]] = []
        for attempt in range(self.max_attempts):
            with aws_call("dynamodb.batch_get_item", tables=sorted(request)):
                response = self.client.batch_get_item(RequestItems=request)
            for table, items in response.get("Responses", {}).items():
                out.extend((table, dict(item)) for item in items)
            request = dict(response.get("UnprocessedKeys") or {})
            if not request:
                return out
            self._wait(attempt)
        raise Throttled(
            f"dynamodb.batch_get_item: keys still unprocessed after {self.max_attempts} attempts",
            operation="dynamodb.batch_get_item",
            unprocessed=sum(len(v["Keys"]) for v in request.values()),
        )

    def write(self, request: dict[str, list[Any]]) -> None:
        """One BatchWriteItem request (table -> put and delete requests), until every item is processed."""
        for attempt in range(self.max_attempts):
            with aws_call("dynamodb.batch_write_item", tables=sorted(request)):
                response = self.client.batch_write_item(RequestItems=request)
            request = dict(response.get("UnprocessedItems") or {})
            if not request:
                return
            self._wait(attempt)
        raise Throttled(
            f"dynamodb.batch_write_item: items still unprocessed after {self.max_attempts} attempts",
            operation="dynamodb.batch_write_item",
            unprocessed=sum(len(v) for v in request.values()),
        )
