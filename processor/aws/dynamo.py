"""DynamoDB: the KPI tables (order level, category level) and the Ledger (file outcomes, runs, lock, counter).

Table designs (the same definitions are mirrored in the CloudFormation template):

``<prefix>-order-kpis``: one item per order_date.
    partition ``order_year`` (S, ``"2025"``), sort ``order_date`` (S, ``"2025-03-30"``).
    * one date's order KPIs            -> GetItem(order_year, order_date)
    * order KPIs over a date range     -> Query per year spanned, ``order_date BETWEEN :from AND :to``
    A year partition holds at most 366 small items, so no partition is hot and a range query is a handful of
    calls. One extra item, ``order_year="#index", order_date="years"``, holds the set of years present (a
    string set grown with ADD at publish time): an open-ended range (``kpis daily`` without
    ``--from``/``--to``) reads it to know which year partitions to query, instead of scanning. It never
    appears in a query result because no real year sorts as ``#index``.

``<prefix>-category-kpis``: one item per (category, order_date).
    partition ``category`` (S), sort ``order_date`` (S); GSI ``by_date``: partition ``order_date``, sort
    ``category``, projection ALL.
    * one category over a date range   -> Query base table, ``category = :c AND order_date BETWEEN ...``
    * all categories of one date       -> Query GSI ``by_date``, ``order_date = :d``
    * all categories over a date range -> the dates present come from the order table (every category item has
      an order item for its date), then one GSI query per date.

``<prefix>-ledger`` (single-table design): partition ``pk`` (S), sort ``sk`` (S); GSI ``by_kind``: partition
``kind`` (S), sort ``updated_at`` (S, ISO-8601 UTC with microseconds and ``Z``, so lexical order is time
order), projection ALL.
    * file outcome   ``pk=FILE#<file_id>, sk=OUTCOME, kind=FILE#accepted | FILE#rejected``
      The outcome is part of ``kind`` so that "recent rejected files" (``shopkpi rejects``) is one GSI query;
      "recent files" of any outcome merges the two partitions' newest items.
    * run record     ``pk=RUN#<execution_id>, sk=RUN, kind=RUN``            (``shopkpi runs``: GSI query)
    * merge lock     ``pk=LOCK#merge, sk=LOCK``                               (no ``kind``: not in the GSI)
    * generation     ``pk=COUNTER#generation, sk=COUNTER``                    (no ``kind``: not in the GSI)
    The GSI partitions ``FILE#accepted`` and ``RUN`` take one write per processed file or run, far below the
    per-partition write limit.

No Scan anywhere: every read is a GetItem, a BatchGetItem or a Query on a known partition.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from processor.aws.clients import aws_call
from processor.aws.s3 import event_key, join_uri, split_uri
from processor.errors import AwsError, LockBusy, StaleWriter, Throttled
from processor.model import CategoryKpi, OrderKpi, ValidationResult

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

__all__ = [
    "BY_DATE",
    "BY_KIND",
    "KpiTables",
    "Ledger",
    "PublishStats",
    "TableNames",
    "create_tables",
    "table_definitions",
    "table_names",
]

T = TypeVar("T")
R = TypeVar("R")
#: An item in DynamoDB's wire format: attribute name -> ``{"S": ...}`` / ``{"N": ...}`` / ...
Item = dict[str, Any]

BY_DATE = "by_date"
BY_KIND = "by_kind"

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_YEARS_KEY: Item = {"order_year": {"S": "#index"}, "order_date": {"S": "years"}}
# Bumping this rewrites every KPI item once: the digest covers the item layout, not only the values.
_LAYOUT = b"shopkpi-kpi-item/1\n"

_BATCH_GET_MAX = 100  # DynamoDB limit per BatchGetItem
_BATCH_WRITE_MAX = 25  # DynamoDB limit per BatchWriteItem


# --- table definitions --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TableNames:
    order: str
    category: str
    ledger: str


def table_names(prefix: str) -> TableNames:
    return TableNames(order=f"{prefix}-order-kpis", category=f"{prefix}-category-kpis", ledger=f"{prefix}-ledger")


def _attrs(*names: str) -> list[dict[str, str]]:
    return [{"AttributeName": n, "AttributeType": "S"} for n in names]


def _keys(partition: str, sort: str) -> list[dict[str, str]]:
    return [{"AttributeName": partition, "KeyType": "HASH"}, {"AttributeName": sort, "KeyType": "RANGE"}]


def table_definitions(prefix: str) -> list[dict[str, Any]]:
    """CreateTable requests of the three tables (on-demand billing), in the order order/category/ledger."""
    names = table_names(prefix)
    return [
        {
            "TableName": names.order,
            "AttributeDefinitions": _attrs("order_year", "order_date"),
            "KeySchema": _keys("order_year", "order_date"),
            "BillingMode": "PAY_PER_REQUEST",
        },
        {
            "TableName": names.category,
            "AttributeDefinitions": _attrs("category", "order_date"),
            "KeySchema": _keys("category", "order_date"),
            "BillingMode": "PAY_PER_REQUEST",
            "GlobalSecondaryIndexes": [
                {
                    "IndexName": BY_DATE,
                    "KeySchema": _keys("order_date", "category"),
                    "Projection": {"ProjectionType": "ALL"},
                }
            ],
        },
        {
            "TableName": names.ledger,
            "AttributeDefinitions": _attrs("pk", "sk", "kind", "updated_at"),
            "KeySchema": _keys("pk", "sk"),
            "BillingMode": "PAY_PER_REQUEST",
            "GlobalSecondaryIndexes": [
                {
                    "IndexName": BY_KIND,
                    "KeySchema": _keys("kind", "updated_at"),
                    "Projection": {"ProjectionType": "ALL"},
                }
            ],
        },
    ]


def create_tables(client: DynamoDBClient, prefix: str) -> TableNames:
    """Create the missing tables and wait until all are ACTIVE (for tests and the embedded stack)."""
    for definition in table_definitions(prefix):
        name = definition["TableName"]
        try:
            with aws_call("dynamodb.create_table", table=name):
                client.create_table(**definition)
        except AwsError as e:
            if e.context.get("aws_code") != "ResourceInUseException":  # already there: idempotent
                raise
    for definition in table_definitions(prefix):
        with aws_call("dynamodb.wait_table_exists", table=definition["TableName"]):
            client.get_waiter("table_exists").wait(
                TableName=definition["TableName"], WaiterConfig={"Delay": 1, "MaxAttempts": 120}
            )
    return table_names(prefix)


# --- helpers ------------------------------------------------------------------------------------------------
def _check_date(value: str | None, name: str) -> None:
    if value is not None and not _DATE.match(value):
        raise ValueError(f"{name} must be YYYY-MM-DD, got {value!r}")


def _chunks(seq: Sequence[T], size: int) -> list[Sequence[T]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _n(value: int | Decimal) -> dict[str, str]:
    return {"N": str(value)}


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _int(item: Item, name: str) -> int:
    return int(item[name]["N"])


def _digest(kpi: OrderKpi | CategoryKpi) -> str:
    """Hash of the KPI values only (components and shown figures), never of generation, time or run: two
    computations of the same inputs hash equal, so a republish of unchanged KPIs can be skipped."""
    h = hashlib.sha256(_LAYOUT)
    h.update(msgspec.json.encode(kpi))
    h.update(msgspec.json.encode(kpi.public()))
    return h.hexdigest()[:32]


def _order_item(k: OrderKpi) -> Item:
    return {
        "order_year": _s(k.order_date[:4]),
        "order_date": _s(k.order_date),
        "total_orders": _n(k.total_orders),
        "total_revenue": _n(k.total_revenue),
        "total_items_sold": _n(k.total_items_sold),
        "return_rate": _n(k.return_rate),
        "unique_customers": _n(k.unique_customers),
        "returned_orders": _n(k.returned_orders),
        "revenue_cents": _n(k.revenue_cents),
    }


def _category_item(k: CategoryKpi) -> Item:
    return {
        "category": _s(k.category),
        "order_date": _s(k.order_date),
        "daily_revenue": _n(k.daily_revenue),
        "avg_order_value": _n(k.avg_order_value),
        "avg_return_rate": _n(k.avg_return_rate),
        "orders": _n(k.orders),
        "returned_orders": _n(k.returned_orders),
        "items": _n(k.items),
        "revenue_cents": _n(k.revenue_cents),
    }


def _order_from(item: Item) -> OrderKpi:
    return OrderKpi(
        order_date=item["order_date"]["S"],
        total_orders=_int(item, "total_orders"),
        returned_orders=_int(item, "returned_orders"),
        total_items_sold=_int(item, "total_items_sold"),
        revenue_cents=_int(item, "revenue_cents"),
        unique_customers=_int(item, "unique_customers"),
    )


def _category_from(item: Item) -> CategoryKpi:
    return CategoryKpi(
        category=item["category"]["S"],
        order_date=item["order_date"]["S"],
        orders=_int(item, "orders"),
        returned_orders=_int(item, "returned_orders"),
        items=_int(item, "items"),
        revenue_cents=_int(item, "revenue_cents"),
    )


def _range_condition(date_from: str | None, date_to: str | None, values: Item) -> str:
    """Sort-key condition on ``#d`` (order_date) for optional bounds; fills ``values``."""
    if date_from is not None:
        values[":from"] = _s(date_from)
    if date_to is not None:
        values[":to"] = _s(date_to)
    if date_from is not None and date_to is not None:
        return " AND #d BETWEEN :from AND :to"
    if date_from is not None:
        return " AND #d >= :from"
    if date_to is not None:
        return " AND #d <= :to"
    return ""


class _Retrier:
    """Exponential backoff with full jitter for the items DynamoDB hands back unprocessed (partial throttling:
    botocore's own retries only cover requests that fail as a whole)."""

    def __init__(self, max_attempts: int, base_delay: float, max_delay: float, sleep: Callable[[float], None]):
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep

    def wait(self, attempt: int) -> None:
        self.sleep(random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt)))


@dataclass(frozen=True, slots=True)
class _Entry:
    table: str
    key: tuple[str, str]  # (partition value, sort value)
    item: Item | None  # None: delete the item
    digest: str


@dataclass(frozen=True, slots=True)
class PublishStats:
    written: int  # items put
    unchanged: int  # skipped: the stored digest equals the new one (or a removal of an absent item)
    stale: int  # skipped: the stored item comes from a newer generation
    removed: int = 0  # items deleted: their group no longer has rows
    daily_written: int = 0
    category_written: int = 0


class KpiTables:
    """Reads and writes of the two KPI tables."""

    def __init__(
        self,
        client: DynamoDBClient,
        order_table: str,
        category_table: str,
        threads: int = 4,
        *,
        max_attempts: int = 8,
        base_delay: float = 0.05,
        max_delay: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.order_table = order_table
        self.category_table = category_table
        self.threads = max(1, threads)
        self._retry = _Retrier(max_attempts, base_delay, max_delay, sleep)
        self._key_names = {
            order_table: ("order_year", "order_date"),
            category_table: ("category", "order_date"),
        }

    # --- publish --------------------------------------------------------------------------------------------
    def publish(
        self,
        daily: Sequence[OrderKpi],
        category: Sequence[CategoryKpi],
        generation: int,
        computed_at: str,
        run_id: str,
        *,
        fence: Callable[[], None] | None = None,
        remove_daily: Sequence[str] = (),
        remove_category: Sequence[tuple[str, str]] = (),
        reconcile: tuple[str, str] | None = None,
    ) -> PublishStats:
        """Write the KPIs of one merge, skipping items that are unchanged or owned by a newer generation.

        Steps: BatchGetItem the stored ``generation`` and ``digest`` of every key; drop keys whose stored
        generation is newer (``stale``) or whose digest equals the new one (``unchanged``: not even
        ``computed_at`` moves, so reprocessing unchanged inputs changes nothing); BatchWriteItem the rest in
        chunks of 25 on ``threads`` workers. Unprocessed keys/items are retried with exponential backoff and
        jitter; after ``max_attempts`` the call raises :class:`~processor.errors.Throttled` (retryable: a
        rerun skips what is already written, by digest).

        Why read-then-write without a condition is safe: BatchWriteItem cannot be conditional, so the "never
        replace a newer computation" rule is enforced by who may write, not per item. Only the holder of the
        merge lock (:meth:`Ledger.acquire_lock`) publishes, and its ``generation`` is a fencing token
        allocated while holding the lock, so generations increase in lock order. Between this method's read
        and its write no other merge can publish unless our lease expired; ``fence`` (e.g. ``lambda:
        ledger.check_lock(owner, generation)``) is called before each batch write, so a merge that lost its
        lease stops within one batch with :class:`~processor.errors.StaleWriter`. The one window left is a
        lease expiring *during* a single batch call (milliseconds, against a lease of minutes); items written
        in it carry the older generation, so the next publish of those keys replaces them.

        Removals: ``remove_daily`` (dates) and ``remove_category`` ((category, date) pairs) are items whose group
        no longer has rows; they are deleted under the same rule (an item a newer generation wrote stays).
        ``reconcile=(from, to)`` also removes every stored item of that inclusive range that this publish does not
        hold (a reprocess: whatever the store has, afterwards it holds exactly the recomputed range).
        """
        entries: dict[tuple[str, str, str], _Entry] = {}

        def add(table: str, key: tuple[str, str], item: Item, digest: str) -> None:
            if (table, *key) in entries:
                raise ValueError(f"duplicate KPI key {key} for {table} in one publish")
            item.update(generation=_n(generation), computed_at=_s(computed_at), run_id=_s(run_id), digest=_s(digest))
            entries[(table, *key)] = _Entry(table, key, item, digest)

        for d in daily:
            _check_date(d.order_date, "order_date")
            add(self.order_table, (d.order_date[:4], d.order_date), _order_item(d), _digest(d))
        for c in category:
            _check_date(c.order_date, "order_date")
            if not c.category:
                raise ValueError(f"empty category on {c.order_date}: DynamoDB keys cannot be empty")
            add(self.category_table, (c.category, c.order_date), _category_item(c), _digest(c))
        removals = {(self.order_table, d[:4], d) for d in remove_daily}
        removals |= {(self.category_table, c, d) for c, d in remove_category}
        if reconcile is not None:
            removals |= self._extra_in_range(reconcile, entries)
        for table, pk, sk in removals - set(entries):
            entries[(table, pk, sk)] = _Entry(table, (pk, sk), None, "")

        stored = self._stored_versions(list(entries.values()))
        to_write: list[_Entry] = []
        unchanged = stale = 0
        for full_key, entry in entries.items():
            old = stored.get(full_key)
            if old is not None and old[0] > generation:
                stale += 1
            elif (old is not None and old[1] == entry.digest) or (old is None and entry.item is None):
                unchanged += 1  # the same figures, or a removal of what is not there
            else:
                to_write.append(entry)

        years = sorted({e.key[0] for e in to_write if e.table == self.order_table})
        if years:
            # Index first: a reader must never miss a year whose items exist.
            self._add_years(years)
        if to_write:
            self._parallel(lambda chunk: self._write_batch(chunk, fence), _chunks(to_write, _BATCH_WRITE_MAX))
        daily_written = sum(1 for e in to_write if e.table == self.order_table and e.item is not None)
        removed = sum(1 for e in to_write if e.item is None)
        return PublishStats(
            written=len(to_write) - removed,
            removed=removed,
            unchanged=unchanged,
            stale=stale,
            daily_written=daily_written,
            category_written=len(to_write) - removed - daily_written,
        )

    def _extra_in_range(
        self, bounds: tuple[str, str], entries: dict[tuple[str, str, str], _Entry]
    ) -> set[tuple[str, str, str]]:
        """Stored items of the inclusive date range that ``entries`` does not hold."""
        date_from, date_to = bounds
        stored_days = [k.order_date for k in self.daily(date_from, date_to)]
        days = set(stored_days) | {k[2] for k in entries if k[0] == self.order_table}
        out = {(self.order_table, d[:4], d) for d in stored_days}
        for cats in self._parallel(self._categories_of, sorted(days)):
            out |= {(self.category_table, c.category, c.order_date) for c in cats}
        return out - set(entries)

    def _stored_versions(self, entries: Sequence[_Entry]) -> dict[tuple[str, str, str], tuple[int, str]]:
        """(table, partition, sort) -> (generation, digest) of the items that exist."""
        found: dict[tuple[str, str, str], tuple[int, str]] = {}
        for items in self._parallel(self._batch_get, _chunks(entries, _BATCH_GET_MAX)):
            for table, item in items:
                pk, sk = self._key_names[table]
                gen = _int(item, "generation") if "generation" in item else 0
                found[(table, item[pk]["S"], item[sk]["S"])] = (gen, item.get("digest", {}).get("S", ""))
        return found

    def _batch_get(self, chunk: Sequence[_Entry]) -> list[tuple[str, Item]]:
        request: dict[str, Any] = {}
        for e in chunk:
            pk, sk = self._key_names[e.table]
            spec = request.setdefault(
                e.table,
                {
                    "Keys": [],
                    "ProjectionExpression": "#p, #s, #g, #h",
                    "ExpressionAttributeNames": {"#p": pk, "#s": sk, "#g": "generation", "#h": "digest"},
                    "ConsistentRead": True,
                },
            )
            spec["Keys"].append({pk: _s(e.key[0]), sk: _s(e.key[1])})
        out: list[tuple[str, Item]] = []
        for attempt in range(self._retry.max_attempts):
            with aws_call("dynamodb.batch_get_item", tables=sorted(request)):
                response = self.client.batch_get_item(RequestItems=request)
            for table, items in response.get("Responses", {}).items():
                out.extend((table, dict(item)) for item in items)
            request = dict(response.get("UnprocessedKeys") or {})
            if not request:
                return out
            self._retry.wait(attempt)
        raise Throttled(
            f"dynamodb.batch_get_item: keys still unprocessed after {self._retry.max_attempts} attempts",
            operation="dynamodb.batch_get_item",
            unprocessed=sum(len(v["Keys"]) for v in request.values()),
        )

    def _write_batch(self, chunk: Sequence[_Entry], fence: Callable[[], None] | None) -> None:
        if fence is not None:
            fence()
        request: dict[str, list[Any]] = {}
        for e in chunk:
            if e.item is None:
                pk, sk = self._key_names[e.table]
                key = {pk: _s(e.key[0]), sk: _s(e.key[1])}
                request.setdefault(e.table, []).append({"DeleteRequest": {"Key": key}})
            else:
                request.setdefault(e.table, []).append({"PutRequest": {"Item": e.item}})
        for attempt in range(self._retry.max_attempts):
            with aws_call("dynamodb.batch_write_item", tables=sorted(request)):
                response = self.client.batch_write_item(RequestItems=request)
            request = dict(response.get("UnprocessedItems") or {})
            if not request:
                return
            self._retry.wait(attempt)
        raise Throttled(
            f"dynamodb.batch_write_item: items still unprocessed after {self._retry.max_attempts} attempts",
            operation="dynamodb.batch_write_item",
            unprocessed=sum(len(v) for v in request.values()),
        )

    def _add_years(self, years: list[str]) -> None:
        with aws_call("dynamodb.update_item", table=self.order_table, item="years-index"):
            self.client.update_item(
                TableName=self.order_table,
                Key=_YEARS_KEY,
                UpdateExpression="ADD #y :y",
                ExpressionAttributeNames={"#y": "years"},
                ExpressionAttributeValues={":y": {"SS": years}},
            )

    def _parallel(self, fn: Callable[[T], R], chunks: Sequence[T]) -> list[R]:
        """``fn`` over ``chunks`` on up to ``threads`` workers; the first failure cancels unstarted ones."""
        if len(chunks) <= 1 or self.threads == 1:
            return [fn(c) for c in chunks]
        with ThreadPoolExecutor(max_workers=min(self.threads, len(chunks)), thread_name_prefix="ddb") as pool:
            futures = [pool.submit(fn, c) for c in chunks]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    # --- reads ----------------------------------------------------------------------------------------------
    def _query(self, op: str, **request: Any) -> Iterator[Item]:
        paginator = self.client.get_paginator("query")
        with aws_call(op, table=request.get("TableName"), index=request.get("IndexName")):
            for page in paginator.paginate(**request):
                yield from (dict(i) for i in page.get("Items", []))

    def _partition_query(
        self, table: str, key: str, value: str, date_from: str | None, date_to: str | None
    ) -> Iterator[Item]:
        """One partition of a KPI table, its ``order_date`` sort key within the (optional, inclusive) bounds."""
        values: Item = {":k": _s(value)}
        condition = "#k = :k" + _range_condition(date_from, date_to, values)
        return self._query(
            "dynamodb.query",
            TableName=table,
            KeyConditionExpression=condition,
            ExpressionAttributeNames={"#k": key, **({"#d": "order_date"} if "#d" in condition else {})},
            ExpressionAttributeValues=values,
            ConsistentRead=True,
        )

    def years(self) -> list[str]:
        """The years that have order KPIs, ascending (from the years index item)."""
        with aws_call("dynamodb.get_item", table=self.order_table, item="years-index"):
            r = self.client.get_item(TableName=self.order_table, Key=_YEARS_KEY, ConsistentRead=True)
        return sorted(r.get("Item", {}).get("years", {}).get("SS", []))

    def _years_for(self, date_from: str | None, date_to: str | None) -> list[str]:
        if date_from is not None and date_to is not None and int(date_to[:4]) - int(date_from[:4]) < 4:
            # A short bounded range: querying its years directly is cheaper than reading the index first.
            return [str(y) for y in range(int(date_from[:4]), int(date_to[:4]) + 1)]
        lo = date_from[:4] if date_from else "0000"
        hi = date_to[:4] if date_to else "9999"
        return [y for y in self.years() if lo <= y <= hi]

    def daily(self, date_from: str | None = None, date_to: str | None = None) -> list[OrderKpi]:
        """Order KPIs with ``date_from <= order_date <= date_to`` (bounds inclusive, each optional), by date.

        One Query per year partition spanned; without bounds the years come from the years index item.
        """
        _check_date(date_from, "date_from")
        _check_date(date_to, "date_to")
        if date_from is not None and date_to is not None and date_from > date_to:
            return []

        def year_query(year: str) -> list[OrderKpi]:
            items = self._partition_query(self.order_table, "order_year", year, date_from, date_to)
            return [_order_from(i) for i in items]

        per_year = self._parallel(year_query, self._years_for(date_from, date_to))
        return [k for year in per_year for k in year]

    def category(
        self, category: str | None = None, date_from: str | None = None, date_to: str | None = None
    ) -> list[CategoryKpi]:
        """Category KPIs in the date range (bounds inclusive, optional), ordered by (order_date, category).

        With ``category``: one Query on the base table. Without: the dates present in the range (from the
        order table) and one Query per date on the ``by_date`` GSI.
        """
        _check_date(date_from, "date_from")
        _check_date(date_to, "date_to")
        if date_from is not None and date_to is not None and date_from > date_to:
            return []
        if category is not None:
            items = self._partition_query(self.category_table, "category", category, date_from, date_to)
            return [_category_from(i) for i in items]
        dates = [k.order_date for k in self.daily(date_from, date_to)]
        per_date = self._parallel(self._categories_of, dates)
        return [k for day in per_date for k in day]

    def _categories_of(self, order_date: str) -> list[CategoryKpi]:
        items = self._query(
            "dynamodb.query",
            TableName=self.category_table,
            IndexName=BY_DATE,
            KeyConditionExpression="#d = :d",
            ExpressionAttributeNames={"#d": "order_date"},
            ExpressionAttributeValues={":d": _s(order_date)},
        )
        return [_category_from(i) for i in items]

    def category_names(self, dates: int = 92) -> list[str]:
        """The category names that have KPIs on the newest ``dates`` dates, sorted: the names to offer when a
        category matched nothing. Reads keys only, no Scan: the newest dates from the order table (newest year
        first), then one ``by_date`` query per date projecting ``category``."""
        newest: list[str] = []
        for year in reversed(self.years()):
            items = self._query(
                "dynamodb.query",
                TableName=self.order_table,
                KeyConditionExpression="#y = :y",
                ProjectionExpression="#d",
                ExpressionAttributeNames={"#y": "order_year", "#d": "order_date"},
                ExpressionAttributeValues={":y": _s(year)},
                ScanIndexForward=False,
                ConsistentRead=True,
            )
            newest += [i["order_date"]["S"] for i in items][: dates - len(newest)]
            if len(newest) >= dates:
                break

        def names_on(order_date: str) -> set[str]:
            items = self._query(
                "dynamodb.query",
                TableName=self.category_table,
                IndexName=BY_DATE,
                KeyConditionExpression="#d = :d",
                ProjectionExpression="#c",
                ExpressionAttributeNames={"#d": "order_date", "#c": "category"},
                ExpressionAttributeValues={":d": _s(order_date)},
            )
            return {i["category"]["S"] for i in items}

        return sorted(set[str]().union(*self._parallel(names_on, newest)))

    def date(self, order_date: str) -> tuple[OrderKpi | None, list[CategoryKpi]]:
        """Everything about one date: its order KPIs (GetItem) and all its categories (GSI query)."""
        _check_date(order_date, "order_date")
        key = {"order_year": _s(order_date[:4]), "order_date": _s(order_date)}
        with aws_call("dynamodb.get_item", table=self.order_table, order_date=order_date):
            r = self.client.get_item(TableName=self.order_table, Key=key, ConsistentRead=True)
        item = r.get("Item")
        return (_order_from(dict(item)) if item else None), self._categories_of(order_date)


# --- ledger -------------------------------------------------------------------------------------------------
_SERIALIZER = TypeSerializer()
_DESERIALIZER = TypeDeserializer()
_LOCK_KEY: Item = {"pk": _s("LOCK#merge"), "sk": _s("LOCK")}
_COUNTER_KEY: Item = {"pk": _s("COUNTER#generation"), "sk": _s("COUNTER")}
_OUTCOMES = ("accepted", "rejected")
#: Outcomes a file record can show: ``failed`` is written by the workflow's failure path, not by a task.
_LISTED = (*_OUTCOMES, "failed")
_CONDITION_FAILED = "ConditionalCheckFailedException"


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


def _serialize(record: dict[str, Any]) -> Item:
    plain = _to_dynamo(msgspec.to_builtins(record, builtin_types=(Decimal,)))
    return {k: _SERIALIZER.serialize(v) for k, v in plain.items() if v is not None}


def _deserialize(item: Item) -> dict[str, Any]:
    return {k: _from_dynamo(_DESERIALIZER.deserialize(v)) for k, v in item.items()}


def _epoch(seconds: float) -> Decimal:
    # Fixed-point, never exponent notation: lease times compare as plain numbers in condition expressions.
    return Decimal(f"{seconds:.6f}")


def _failure_key(source: str) -> Item:
    """Key of the failure record of an S3 object, as the state machine's RecordFailedSource state writes it: the
    SHA-256 of its location in the workflow's input (keys URL-encoded as in S3 events; hashed because an encoded key
    can pass DynamoDB's 2,048-byte limit on a partition key)."""
    bucket, key = split_uri(source)
    digest = hashlib.sha256(join_uri(bucket, event_key(key)).encode()).hexdigest()
    return {"pk": _s(f"SOURCE#{digest}"), "sk": _s("FAILED")}


def _condition_failed(err: AwsError) -> bool:
    return err.context.get("aws_code") == _CONDITION_FAILED


class Ledger:
    """File outcomes, runs, the merge lock and the generation counter, in one table.

    ``clock`` (epoch seconds) is injectable so lease expiry can be tested without sleeping.
    """

    def __init__(self, client: DynamoDBClient, table: str, *, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.table = table
        self._clock = clock

    def _now_iso(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _put(self, op: str, record: dict[str, Any]) -> None:
        with aws_call(op, table=self.table, pk=record["pk"]):
            self.client.put_item(TableName=self.table, Item=_serialize(record))

    def _get(self, key: Item) -> Item | None:
        with aws_call("dynamodb.get_item", table=self.table, pk=key["pk"]["S"]):
            r = self.client.get_item(TableName=self.table, Key=key, ConsistentRead=True)
        item = r.get("Item")
        return dict(item) if item else None

    @staticmethod
    def _public(item: Item) -> dict[str, Any]:
        record = _deserialize(item)
        for internal in ("pk", "sk", "kind"):
            record.pop(internal, None)
        return record

    def _recent(self, kind: str, limit: int) -> list[Item]:
        """The newest ``limit`` items of one GSI partition, newest first."""
        out: list[Item] = []
        request: dict[str, Any] = {
            "TableName": self.table,
            "IndexName": BY_KIND,
            "KeyConditionExpression": "#k = :k",
            "ExpressionAttributeNames": {"#k": "kind"},
            "ExpressionAttributeValues": {":k": _s(kind)},
            "ScanIndexForward": False,
        }
        while len(out) < limit:
            with aws_call("dynamodb.query", table=self.table, index=BY_KIND, kind=kind):
                r = self.client.query(**request, Limit=limit - len(out))
            out.extend(dict(i) for i in r.get("Items", []))
            if "LastEvaluatedKey" not in r:
                break
            request["ExclusiveStartKey"] = r["LastEvaluatedKey"]
        return out

    # --- files ----------------------------------------------------------------------------------------------
    def record_file(self, result: ValidationResult, execution: str) -> None:
        """Record (or replace, when a file is processed again) the outcome of one file.

        A failure the workflow recorded for the same S3 object before it was validated is cleared: it has an outcome
        now.
        """
        if result.outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {_OUTCOMES}, got {result.outcome!r}")
        record: dict[str, Any] = msgspec.structs.asdict(result)
        record.update(
            pk=f"FILE#{result.file_id}",
            sk="OUTCOME",
            kind=f"FILE#{result.outcome}",
            execution=execution,
            updated_at=self._now_iso(),
        )
        self._put("dynamodb.put_item", record)
        if result.source.startswith("s3://"):
            with aws_call("dynamodb.delete_item", table=self.table, source=result.source):
                self.client.delete_item(TableName=self.table, Key=_failure_key(result.source))

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        item = self._get({"pk": _s(f"FILE#{file_id}"), "sk": _s("OUTCOME")})
        return self._public(item) if item else None

    def get_failure(self, source: str) -> dict[str, Any] | None:
        """The failure the workflow recorded for an S3 object (``s3://bucket/key``) whose validation never ended
        (a task that crashed, hung or could not start): it has no file id yet, so it is found by its location."""
        item = self._get(_failure_key(source))
        return self._public(item) if item else None

    def files(self, limit: int = 50, outcome: str | None = None) -> list[dict[str, Any]]:
        """The most recent file outcomes, newest first; ``outcome`` keeps only accepted, rejected or failed files."""
        if outcome is not None and outcome not in _LISTED:
            raise ValueError(f"outcome must be one of {_LISTED}, got {outcome!r}")
        if limit <= 0:
            return []
        items = [i for o in ([outcome] if outcome else _LISTED) for i in self._recent(f"FILE#{o}", limit)]
        items.sort(key=lambda i: str(i["updated_at"]["S"]), reverse=True)
        return [self._public(i) for i in items[:limit]]

    # --- runs -----------------------------------------------------------------------------------------------
    def record_run(
        self,
        execution_id: str,
        status: str,
        started_at: str,
        ended_at: str | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        """Record (or update: the whole record is replaced) one run; call at start and again at the end."""
        self._put(
            "dynamodb.put_item",
            {
                "pk": f"RUN#{execution_id}",
                "sk": "RUN",
                "kind": "RUN",
                "execution_id": execution_id,
                "status": status,
                "started_at": started_at,
                "ended_at": ended_at,
                "summary": summary,
                "updated_at": self._now_iso(),
            },
        )

    def get_run(self, execution_id: str) -> dict[str, Any] | None:
        item = self._get({"pk": _s(f"RUN#{execution_id}"), "sk": _s("RUN")})
        return self._public(item) if item else None

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recently recorded runs, newest (last updated) first."""
        return [self._public(i) for i in self._recent("RUN", limit)] if limit > 0 else []

    # --- generation counter and merge lock ------------------------------------------------------------------
    def next_generation(self) -> int:
        """Atomically increment the generation counter and return the new value (1 on first use)."""
        with aws_call("dynamodb.update_item", table=self.table, pk="COUNTER#generation"):
            r = self.client.update_item(
                TableName=self.table,
                Key=_COUNTER_KEY,
                UpdateExpression="ADD #v :one",
                ExpressionAttributeNames={"#v": "value"},
                ExpressionAttributeValues={":one": _n(1)},
                ReturnValues="UPDATED_NEW",
            )
        return int(r["Attributes"]["value"]["N"])

    def acquire_lock(self, owner: str, ttl_s: float) -> int:
        """Take the merge lock for ``ttl_s`` seconds and return this holder's fencing generation.

        Succeeds when there is no lock, the lock's lease has expired, or ``owner`` already holds it (a retried
        task of the same execution need not wait for its own dead lease; the new generation fences the old
        attempt out, provided it calls :meth:`check_lock` with its generation). Raises
        :class:`~processor.errors.LockBusy` otherwise.

        The generation is allocated *after* the lease is taken and then bound to it with a condition on this
        lease's token, so generations increase in the order the lock was held: a holder whose lease lapsed
        before its generation was bound fails here instead of publishing with a number newer than its
        successor's.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        now = self._clock()
        token = uuid.uuid4().hex
        names = {
            "#pk": "pk",
            "#o": "owner",
            "#e": "expires_at",
            "#t": "token",
            "#a": "acquired_at",
            "#g": "generation",
        }
        try:
            with aws_call("dynamodb.update_item", table=self.table, pk="LOCK#merge", owner=owner):
                self.client.update_item(
                    TableName=self.table,
                    Key=_LOCK_KEY,
                    UpdateExpression="SET #o = :o, #e = :e, #t = :t, #a = :a REMOVE #g",
                    ConditionExpression="attribute_not_exists(#pk) OR #e < :now OR #o = :o",
                    ExpressionAttributeNames=names,
                    ExpressionAttributeValues={
                        ":o": _s(owner),
                        ":e": _n(_epoch(now + ttl_s)),
                        ":t": _s(token),
                        ":a": _s(self._now_iso()),
                        ":now": _n(_epoch(now)),
                    },
                )
        except AwsError as e:
            if not _condition_failed(e):
                raise
            holder = self.lock_holder() or {}
            raise LockBusy(
                f"merge lock held by {holder.get('owner')!r} until {holder.get('expires_at')}",
                holder=holder.get("owner"),
                expires_at=holder.get("expires_at"),
            ) from None
        generation = self.next_generation()
        try:
            with aws_call("dynamodb.update_item", table=self.table, pk="LOCK#merge", owner=owner):
                self.client.update_item(
                    TableName=self.table,
                    Key=_LOCK_KEY,
                    UpdateExpression="SET #g = :g",
                    ConditionExpression="#t = :t",
                    ExpressionAttributeNames={"#g": "generation", "#t": "token"},
                    ExpressionAttributeValues={":g": _n(generation), ":t": _s(token)},
                )
        except AwsError as e:
            if not _condition_failed(e):
                raise
            raise LockBusy("merge lock taken over while it was being acquired", owner=owner) from None
        return generation

    def _update_lock(self, owner: str, update: str, condition: str, names: dict[str, str], values: Item) -> Item | None:
        """One conditional update of the lock item: its new attributes, or None when the condition failed."""
        try:
            with aws_call("dynamodb.update_item", table=self.table, pk="LOCK#merge", owner=owner):
                r = self.client.update_item(
                    TableName=self.table,
                    Key=_LOCK_KEY,
                    UpdateExpression=update,
                    ConditionExpression=condition,
                    ExpressionAttributeNames=names,
                    ExpressionAttributeValues=values,
                    ReturnValues="ALL_NEW",
                )
        except AwsError as e:
            if not _condition_failed(e):
                raise
            return None
        return dict(r["Attributes"])

    def renew_lock(self, owner: str, generation: int, ttl_s: float) -> None:
        """Extend the lease of ``owner``'s lock (the one that returned ``generation``) to ``ttl_s`` from now.

        Raises :class:`~processor.errors.StaleWriter` when the lease was lost or has already expired: a lapsed
        lease is never revived, since another merge may have taken the lock in the meantime."""
        now = self._clock()
        renewed = self._update_lock(
            owner,
            "SET #e = :e",
            "#o = :o AND #g = :g AND #e > :now",
            {"#o": "owner", "#g": "generation", "#e": "expires_at"},
            {":o": _s(owner), ":g": _n(generation), ":e": _n(_epoch(now + ttl_s)), ":now": _n(_epoch(now))},
        )
        if renewed is None:
            raise StaleWriter("merge lock lease lost before it could be renewed", owner=owner)

    def take_pending(self, owner: str, generation: int) -> bool:
        """Clear the hand-over mark of ``owner``'s lock; True when there was one (merge again), False when the
        lock is no longer this holder's."""
        taken = self._update_lock(
            owner,
            "REMOVE #p",
            "#o = :o AND #g = :g AND attribute_exists(#p)",
            {"#o": "owner", "#g": "generation", "#p": "pending"},
            {":o": _s(owner), ":g": _n(generation)},
        )
        return taken is not None

    def lock_holder(self) -> dict[str, Any] | None:
        """The lock record (owner, expires_at epoch seconds, generation...), even if expired; None if free."""
        item = self._get(_LOCK_KEY)
        return self._public(item) if item else None

    def check_lock(self, owner: str, generation: int | None = None) -> None:
        """Raise :class:`~processor.errors.StaleWriter` unless ``owner`` holds an unexpired lease (and, when
        ``generation`` is given, the lease that returned it). Call before publishing and between batches."""
        item = self._get(_LOCK_KEY)
        if item is None:
            raise StaleWriter("merge lock is no longer held", owner=owner)
        lock = _deserialize(item)
        if lock.get("owner") != owner:
            raise StaleWriter(f"merge lock now held by {lock.get('owner')!r}", owner=owner, holder=lock.get("owner"))
        if float(lock.get("expires_at", 0)) <= self._clock():
            raise StaleWriter("merge lock lease expired", owner=owner, expires_at=float(lock.get("expires_at", 0)))
        if generation is not None and lock.get("generation") != generation:
            raise StaleWriter(
                "merge lock re-acquired by a newer attempt",
                owner=owner,
                generation=generation,
                current_generation=lock.get("generation"),
            )

    def hand_over(self, owner: str) -> str | None:
        """Ask the running merge to merge once more before it lets go of the lock: the files this caller's merge
        was for are committed, and the holder's next round will apply them. Returns the holder, or None when the
        lock is free or its lease has expired (then take it instead)."""
        marked = self._update_lock(
            owner,
            "SET #p = :p",
            "attribute_exists(#pk) AND #e > :now AND #o <> :o",
            {"#pk": "pk", "#p": "pending", "#e": "expires_at", "#o": "owner"},
            {":p": _s(owner), ":now": _n(_epoch(self._clock())), ":o": _s(owner)},
        )
        return None if marked is None else str(_deserialize(marked).get("owner"))

    def release_lock(self, owner: str, generation: int | None = None, *, unless_pending: bool = False) -> bool:
        """Release the lock if ``owner`` (and, when given, ``generation``) still holds it. Returns whether it
        did; a lock lost to someone else is left alone.

        With ``unless_pending``, a lock another merge handed its work over to (:meth:`hand_over`) is kept: call
        :meth:`take_pending` and merge again."""
        condition = "#o = :o"
        names = {"#o": "owner"}
        values: Item = {":o": _s(owner)}
        if generation is not None:
            condition += " AND #g = :g"
            names["#g"] = "generation"
            values[":g"] = _n(generation)
        if unless_pending:
            condition += " AND attribute_not_exists(#p)"
            names["#p"] = "pending"
        try:
            with aws_call("dynamodb.delete_item", table=self.table, pk="LOCK#merge", owner=owner):
                self.client.delete_item(
                    TableName=self.table,
                    Key=_LOCK_KEY,
                    ConditionExpression=condition,
                    ExpressionAttributeNames=names,
                    ExpressionAttributeValues=values,
                )
        except AwsError as e:
            if not _condition_failed(e):
                raise
            return False
        return True
