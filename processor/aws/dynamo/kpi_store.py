"""The KPI tables (order level, category level): publish under the generation guard with digests, and the reads by
date, date range and category. The table designs and access patterns are in :mod:`processor.aws.dynamo`."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

import msgspec

from processor.aws.clients import aws_call
from processor.aws.dynamo.batch import BATCH_GET_MAX, BATCH_WRITE_MAX, Backoff, Batches, Item, chunks, encode
from processor.aws.dynamo.tables import BY_DATE
from processor.model import CategoryKpi, OrderKpi

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

T = TypeVar("T")
R = TypeVar("R")

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_YEARS_KEY: Item = encode({"order_year": "#index", "order_date": "years"})
# Bumping this rewrites every KPI item once: the digest covers the item layout, not only the values.
_LAYOUT = b"shopkpi-kpi-item/1\n"


def _check_date(value: str | None, name: str) -> None:
    if value is not None and not _DATE.match(value):
        raise ValueError(f"{name} must be YYYY-MM-DD, got {value!r}")


def _int(item: Item, name: str) -> int:
    return int(item[name]["N"])


def _digest(kpi: OrderKpi | CategoryKpi) -> str:
    """Hash of the KPI values only (components and shown figures), never of generation, time or run: two
    computations of the same inputs hash equal, so a republish of unchanged KPIs can be skipped."""
    h = hashlib.sha256(_LAYOUT)
    h.update(msgspec.json.encode(kpi))
    h.update(msgspec.json.encode(kpi.public()))
    return h.hexdigest()[:32]


_ORDER_ATTRS = (
    "order_date",
    "total_orders",
    "total_revenue",
    "total_items_sold",
    "return_rate",
    "unique_customers",
    "returned_orders",
    "revenue_cents",
)
_CATEGORY_ATTRS = (
    "category",
    "order_date",
    "daily_revenue",
    "avg_order_value",
    "avg_return_rate",
    "orders",
    "returned_orders",
    "items",
    "revenue_cents",
)


def _order_item(k: OrderKpi) -> Item:
    return encode({"order_year": k.order_date[:4], **{name: getattr(k, name) for name in _ORDER_ATTRS}})


def _category_item(k: CategoryKpi) -> Item:
    return encode({name: getattr(k, name) for name in _CATEGORY_ATTRS})


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
    values.update(encode({":from": date_from, ":to": date_to}))
    if date_from is not None and date_to is not None:
        return " AND #d BETWEEN :from AND :to"
    if date_from is not None:
        return " AND #d >= :from"
    if date_to is not None:
        return " AND #d <= :to"
    return ""


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


def _triage(
    entries: dict[tuple[str, str, str], _Entry], stored: dict[tuple[str, str, str], tuple[int, str]], generation: int
) -> tuple[list[_Entry], int, int]:
    """The entries to write, and how many are skipped as unchanged and as stale, against the stored (generation,
    digest) of each key."""
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
    return to_write, unchanged, stale


class KpiTables:
    """Reads and writes of the two KPI tables."""

    def __init__(
        self,
        client: DynamoDBClient,
        order_table: str,
        category_table: str,
        threads: int = 4,
        **backoff: Unpack[Backoff],
    ) -> None:
        self.client = client
        self.order_table = order_table
        self.category_table = category_table
        self.threads = max(1, threads)
        self._batches = Batches(client, **backoff)
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
        merge lock (:meth:`~processor.aws.dynamo.MergeLock.acquire`) publishes, and its ``generation`` is a
        fencing token allocated while holding the lock, so generations increase in lock order. Between this
        method's read and its write no other merge can publish unless our lease expired; ``fence`` (e.g. ``lambda:
        lock.check(owner, generation)``) is called before each batch write, so a merge that lost its
        lease stops within one batch with :class:`~processor.errors.StaleWriter`. The one window left is a
        lease expiring *during* a single batch call (milliseconds, against a lease of minutes); items written
        in it carry the older generation, so the next publish of those keys replaces them.

        Removals: ``remove_daily`` (dates) and ``remove_category`` ((category, date) pairs) are items whose group
        no longer has rows; they are deleted under the same rule (an item a newer generation wrote stays).
        ``reconcile=(from, to)`` also removes every stored item of that inclusive range that this publish does not
        hold (a reprocess: whatever the store has, afterwards it holds exactly the recomputed range).
        """
        entries = self._entries(
            daily, category, {"generation": generation, "computed_at": computed_at, "run_id": run_id}
        )
        removals = {(self.order_table, d[:4], d) for d in remove_daily}
        removals |= {(self.category_table, c, d) for c, d in remove_category}
        if reconcile is not None:
            removals |= self._extra_in_range(reconcile, entries)
        for table, pk, sk in removals - set(entries):
            entries[(table, pk, sk)] = _Entry(table, (pk, sk), None, "")

        to_write, unchanged, stale = _triage(entries, self._stored_versions(list(entries.values())), generation)
        self._write(to_write, fence)
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

    def _write(self, to_write: list[_Entry], fence: Callable[[], None] | None) -> None:
        """The years index, then the items, in batches on ``threads`` workers (``fence`` before each batch)."""
        years = sorted({e.key[0] for e in to_write if e.table == self.order_table})
        if years:
            # Index first: a reader must never miss a year whose items exist.
            self._add_years(years)
        if to_write:
            self._parallel(lambda chunk: self._write_batch(chunk, fence), chunks(to_write, BATCH_WRITE_MAX))

    def _entries(
        self, daily: Sequence[OrderKpi], category: Sequence[CategoryKpi], stamp: dict[str, int | str]
    ) -> dict[tuple[str, str, str], _Entry]:
        """The items to put, by (table, partition, sort), each with the ``stamp`` (generation, time, run) and its
        digest; a key given twice, a malformed date or an empty category raises :class:`ValueError` before any
        call."""
        entries: dict[tuple[str, str, str], _Entry] = {}

        def add(table: str, key: tuple[str, str], item: Item, digest: str) -> None:
            if (table, *key) in entries:
                raise ValueError(f"duplicate KPI key {key} for {table} in one publish")
            item.update(encode({**stamp, "digest": digest}))
            entries[(table, *key)] = _Entry(table, key, item, digest)

        for d in daily:
            _check_date(d.order_date, "order_date")
            add(self.order_table, (d.order_date[:4], d.order_date), _order_item(d), _digest(d))
        for c in category:
            _check_date(c.order_date, "order_date")
            if not c.category:
                raise ValueError(f"empty category on {c.order_date}: DynamoDB keys cannot be empty")
            add(self.category_table, (c.category, c.order_date), _category_item(c), _digest(c))
        return entries

    def _extra_in_range(
        self, bounds: tuple[str, str], entries: dict[tuple[str, str, str], _Entry]
    ) -> set[tuple[str, str, str]]:
        """Stored items of the inclusive date range that ``entries`` does not hold.

        Every date of the range is looked up in the category table (a query of its date index each), not only
        the dates with an order item: a category item left on a date whose order item is gone must go too."""
        date_from, date_to = bounds
        stored_days = [k.order_date for k in self.daily(date_from, date_to)]
        out = {(self.order_table, d[:4], d) for d in stored_days}
        first, last = date.fromisoformat(date_from), date.fromisoformat(date_to)
        days = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
        for cats in self._parallel(self._categories_of, days):
            out |= {(self.category_table, c.category, c.order_date) for c in cats}
        return out - set(entries)

    def _stored_versions(self, entries: Sequence[_Entry]) -> dict[tuple[str, str, str], tuple[int, str]]:
        """(table, partition, sort) -> (generation, digest) of the items that exist."""
        found: dict[tuple[str, str, str], tuple[int, str]] = {}
        for items in self._parallel(self._batch_get, chunks(entries, BATCH_GET_MAX)):
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
            spec["Keys"].append(encode({pk: e.key[0], sk: e.key[1]}))
        return self._batches.get(request)

    def _write_batch(self, chunk: Sequence[_Entry], fence: Callable[[], None] | None) -> None:
        if fence is not None:
            fence()
        request: dict[str, list[Any]] = {}
        for e in chunk:
            if e.item is None:
                pk, sk = self._key_names[e.table]
                key = encode({pk: e.key[0], sk: e.key[1]})
                request.setdefault(e.table, []).append({"DeleteRequest": {"Key": key}})
            else:
                request.setdefault(e.table, []).append({"PutRequest": {"Item": e.item}})
        self._batches.write(request)

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
        values: Item = encode({":k": value})
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
            ExpressionAttributeValues=encode({":d": order_date}),
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
                ExpressionAttributeValues=encode({":y": year}),
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
                ExpressionAttributeValues=encode({":d": order_date}),
            )
            return {i["category"]["S"] for i in items}

        return sorted(set[str]().union(*self._parallel(names_on, newest)))

    def date(self, order_date: str) -> tuple[OrderKpi | None, list[CategoryKpi]]:
        """Everything about one date: its order KPIs (GetItem) and all its categories (GSI query)."""
        _check_date(order_date, "order_date")
        key = encode({"order_year": order_date[:4], "order_date": order_date})
        with aws_call("dynamodb.get_item", table=self.order_table, order_date=order_date):
            r = self.client.get_item(TableName=self.order_table, Key=key, ConsistentRead=True)
        item = r.get("Item")
        return (_order_from(dict(item)) if item else None), self._categories_of(order_date)
