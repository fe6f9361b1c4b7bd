"""The merge lock (a lease with fencing generations, renewal and hand-over) and the generation counter, two items of
the ledger table: ``pk=LOCK#merge, sk=LOCK`` and ``pk=COUNTER#generation, sk=COUNTER`` (no ``kind``: not in the
GSI). Why the lock makes the KPI publish safe: :meth:`processor.aws.dynamo.KpiTables.publish`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING

import msgspec

from processor.aws.clients import aws_call
from processor.aws.dynamo.batch import Item, decode, encode, get_item, iso_now
from processor.errors import AwsError, LockBusy, StaleWriter

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

_LOCK_KEY: Item = encode({"pk": "LOCK#merge", "sk": "LOCK"})
_COUNTER_KEY: Item = encode({"pk": "COUNTER#generation", "sk": "COUNTER"})
_CONDITION_FAILED = "ConditionalCheckFailedException"


class LockRecord(msgspec.Struct, kw_only=True, frozen=True):
    """The lock item: who holds it, until when (epoch seconds), with which fencing generation, and whether another
    merge handed its work over (``pending``: that merge's owner)."""

    owner: str
    expires_at: int | float
    token: str | None = None
    acquired_at: str | None = None
    generation: int | None = None
    pending: str | None = None


def _epoch(seconds: float) -> Decimal:
    # Fixed-point, never exponent notation: lease times compare as plain numbers in condition expressions.
    return Decimal(f"{seconds:.6f}")


def _condition_failed(err: AwsError) -> bool:
    return err.context.get("aws_code") == _CONDITION_FAILED


class MergeLock:
    """The one merge lock and the generation counter, in the ledger table.

    ``clock`` (epoch seconds) is injectable so lease expiry can be tested without sleeping.
    """

    def __init__(self, client: DynamoDBClient, table: str, *, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.table = table
        self._clock = clock

    def next_generation(self) -> int:
        """Atomically increment the generation counter and return the new value (1 on first use)."""
        with aws_call("dynamodb.update_item", table=self.table, pk="COUNTER#generation"):
            r = self.client.update_item(
                TableName=self.table,
                Key=_COUNTER_KEY,
                UpdateExpression="ADD #v :one",
                ExpressionAttributeNames={"#v": "value"},
                ExpressionAttributeValues=encode({":one": 1}),
                ReturnValues="UPDATED_NEW",
            )
        return int(r["Attributes"]["value"]["N"])

    def acquire(self, owner: str, ttl_s: float) -> int:
        """Take the merge lock for ``ttl_s`` seconds and return this holder's fencing generation.

        Succeeds when there is no lock, the lock's lease has expired, or ``owner`` already holds it (a retried
        task of the same execution need not wait for its own dead lease; the new generation fences the old
        attempt out, provided it calls :meth:`check` with its generation). Raises
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
        taken = self._update(
            owner,
            "SET #o = :o, #e = :e, #t = :t, #a = :a REMOVE #g",
            "attribute_not_exists(#pk) OR #e < :now OR #o = :o",
            names,
            encode(
                {":o": owner, ":e": _epoch(now + ttl_s), ":t": token, ":a": iso_now(self._clock), ":now": _epoch(now)}
            ),
        )
        if taken is None:
            holder = self.holder()
            owner_now, until = (holder.owner, holder.expires_at) if holder else (None, None)
            raise LockBusy(f"merge lock held by {owner_now!r} until {until}", holder=owner_now, expires_at=until)
        generation = self.next_generation()
        bound = self._update(
            owner,
            "SET #g = :g",
            "#t = :t",
            {"#g": "generation", "#t": "token"},
            encode({":g": generation, ":t": token}),
        )
        if bound is None:
            raise LockBusy("merge lock taken over while it was being acquired", owner=owner)
        return generation

    def _update(self, owner: str, update: str, condition: str, names: dict[str, str], values: Item) -> Item | None:
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

    def renew(self, owner: str, generation: int, ttl_s: float) -> None:
        """Extend the lease of ``owner``'s lock (the one that returned ``generation``) to ``ttl_s`` from now.

        Raises :class:`~processor.errors.StaleWriter` when the lease was lost or has already expired: a lapsed
        lease is never revived, since another merge may have taken the lock in the meantime."""
        now = self._clock()
        renewed = self._update(
            owner,
            "SET #e = :e",
            "#o = :o AND #g = :g AND #e > :now",
            {"#o": "owner", "#g": "generation", "#e": "expires_at"},
            encode({":o": owner, ":g": generation, ":e": _epoch(now + ttl_s), ":now": _epoch(now)}),
        )
        if renewed is None:
            raise StaleWriter("merge lock lease lost before it could be renewed", owner=owner)

    def take_pending(self, owner: str, generation: int) -> bool:
        """Clear the hand-over mark of ``owner``'s lock; True when there was one (merge again), False when the
        lock is no longer this holder's."""
        taken = self._update(
            owner,
            "REMOVE #p",
            "#o = :o AND #g = :g AND attribute_exists(#p)",
            {"#o": "owner", "#g": "generation", "#p": "pending"},
            encode({":o": owner, ":g": generation}),
        )
        return taken is not None

    def holder(self) -> LockRecord | None:
        """The lock record (owner, expires_at epoch seconds, generation...), even if expired; None if free."""
        item = self._get()
        return msgspec.convert(decode(item), LockRecord) if item else None

    def check(self, owner: str, generation: int | None = None) -> None:
        """Raise :class:`~processor.errors.StaleWriter` unless ``owner`` holds an unexpired lease (and, when
        ``generation`` is given, the lease that returned it). Call before publishing and between batches."""
        lock = self.holder()
        if lock is None:
            raise StaleWriter("merge lock is no longer held", owner=owner)
        if lock.owner != owner:
            raise StaleWriter(f"merge lock now held by {lock.owner!r}", owner=owner, holder=lock.owner)
        if float(lock.expires_at) <= self._clock():
            raise StaleWriter("merge lock lease expired", owner=owner, expires_at=float(lock.expires_at))
        if generation is not None and lock.generation != generation:
            raise StaleWriter(
                "merge lock re-acquired by a newer attempt",
                owner=owner,
                generation=generation,
                current_generation=lock.generation,
            )

    def hand_over(self, owner: str) -> str | None:
        """Ask the running merge to merge once more before it lets go of the lock: the files this caller's merge
        was for are committed, and the holder's next round will apply them. Returns the holder, or None when the
        lock is free or its lease has expired (then take it instead)."""
        marked = self._update(
            owner,
            "SET #p = :p",
            "attribute_exists(#pk) AND #e > :now AND #o <> :o",
            {"#pk": "pk", "#p": "pending", "#e": "expires_at", "#o": "owner"},
            encode({":p": owner, ":now": _epoch(self._clock()), ":o": owner}),
        )
        return None if marked is None else str(decode(marked).get("owner"))

    def release(self, owner: str, generation: int | None = None, *, unless_pending: bool = False) -> bool:
        """Release the lock if ``owner`` (and, when given, ``generation``) still holds it. Returns whether it
        did; a lock lost to someone else is left alone.

        With ``unless_pending``, a lock another merge handed its work over to (:meth:`hand_over`) is kept: call
        :meth:`take_pending` and merge again."""
        condition = "#o = :o"
        names = {"#o": "owner"}
        values: Item = encode({":o": owner})
        if generation is not None:
            condition += " AND #g = :g"
            names["#g"] = "generation"
            values.update(encode({":g": generation}))
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

    def _get(self) -> Item | None:
        return get_item(self.client, self.table, _LOCK_KEY, pk="LOCK#merge")
