"""A brute-force reference implementation of SPEC sections 2 and 3, to check the real pipeline against.

Why it exists: the processor is columnar, chunked, incremental and concurrent; this is none of that. It reads
every file row by row with the ``csv`` module, applies each validation rule literally, merges the accepted rows
into plain dicts (later-arriving file wins per primary key) and computes the KPIs with integer cents. It shares no
code with ``processor/`` (only the public :class:`Reason` codes), so agreement between the two means something.
It is meant for small data: keep it simple and obviously correct rather than fast.

Choices where the SPEC is silent (kept in one place, see also the report of the helper that wrote this):

* Line numbers are physical 1-based lines of the file where the record starts; the header is line 1.
* Header names match case-insensitively once trimmed (SPEC 1); two names equal after that reject the file as
  ``duplicate_column``. A UTF-8 byte-order mark is ignored.
* A row with more or fewer fields than the header is ``malformed_row``; a row that is not valid UTF-8 or holds a NUL
  byte is ``bad_encoding`` (SPEC 2: both row-level); blank lines are skipped and are not rows. Quoting beyond what
  Python's strict ``csv`` reader takes (a quote that does not open or close a field) makes this reference call the
  whole file unreadable: it is not meant to follow the processor's recovery there, and no test feeds it such files.
* A file with no header at all (zero bytes) is ``empty_file``, like a header with no data rows.
* ``duplicate_key`` applies to a row that is otherwise valid and whose key an earlier *valid* row of the same
  file already has: an invalid first occurrence does not cost the next valid one.
* Integers are 64-bit; money must fit Decimal(18, 2) (at most 16 integer digits), else ``bad_type``.
* Timestamps: ``YYYY-MM-DD`` + ``T`` or space + ``HH:MM:SS``, optional ``.fraction`` (1-9 digits, truncated to
  microseconds), optional ``Z`` / ``+HH:MM`` / ``+HHMM`` offset; nothing else (no date-only, no missing seconds).
* Status is compared case-insensitively but not stripped (``" shipped"`` is unknown).
* An item whose order is present with another user_id is dropped as ``user_mismatch`` even if its product is
  missing; an item waits when its order or its product is absent.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

from processor.errors import Reason

INT, STR, MONEY, TS, STATUS = "int", "str", "money", "ts", "status"
STATUSES = frozenset({"processing", "shipped", "delivered", "complete", "returned", "cancelled"})
LATER_TIMESTAMPS = ("shipped_at", "delivered_at", "returned_at")
CENT = Decimal("0.01")


@dataclass(frozen=True)
class Schema:
    """One dataset of SPEC section 1: column -> (kind, required), and the primary key."""

    columns: dict[str, tuple[str, bool]]
    key: str


SCHEMAS: dict[str, Schema] = {
    "products": Schema(
        {
            "id": (INT, True),
            "sku": (STR, False),
            "cost": (MONEY, False),
            "category": (STR, True),
            "name": (STR, False),
            "brand": (STR, False),
            "retail_price": (MONEY, True),
            "department": (STR, False),
        },
        key="id",
    ),
    "orders": Schema(
        {
            "order_id": (INT, True),
            "user_id": (INT, True),
            "status": (STATUS, True),
            "created_at": (TS, True),
            "returned_at": (TS, False),
            "shipped_at": (TS, False),
            "delivered_at": (TS, False),
            "num_of_item": (INT, True),
        },
        key="order_id",
    ),
    "order_items": Schema(
        {
            "id": (INT, True),
            "order_id": (INT, True),
            "user_id": (INT, True),
            "product_id": (INT, True),
            "status": (STATUS, True),
            "created_at": (TS, True),
            "shipped_at": (TS, False),
            "delivered_at": (TS, False),
            "returned_at": (TS, False),
            "sale_price": (MONEY, True),
        },
        key="id",
    ),
}

FileSpec = Path | str | tuple[str, Path | str]


# --- dataset detection ------------------------------------------------------------------------------------------
def detect_dataset(path: Path | str) -> str | None:
    """SPEC 1: the first path segment after ``incoming/``, else the longest dataset name the file name starts with."""
    parts = PurePosixPath(str(path).replace("\\", "/")).parts
    if "incoming" in parts:
        i = parts.index("incoming")
        if i + 2 < len(parts) and parts[i + 1].lower() in SCHEMAS:
            return parts[i + 1].lower()
    stem = parts[-1].lower() if parts else ""
    for suffix in (".gz", ".csv"):
        stem = stem.removesuffix(suffix)
    for name in sorted(SCHEMAS, key=len, reverse=True):
        if stem == name or (stem.startswith(name) and stem[len(name)] in "_-."):
            return name
    return None


# --- value parsing ----------------------------------------------------------------------------------------------
class _Bad(Exception):
    """A value that does not parse as its type."""


_INT_RE = re.compile(r"[+-]?[0-9]+")
_MONEY_RE = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?")
_TS_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(Z|[+-][0-9]{2}:?[0-9]{2})?"
)


def parse_int(text: str) -> int:
    if not _INT_RE.fullmatch(text):
        raise _Bad(text)
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise _Bad(text)
    return value


def parse_money(text: str) -> Decimal:
    """The exact decimal value; the sign and precision rules are checked separately (they have their own codes)."""
    m = _MONEY_RE.fullmatch(text)
    if not m or not (m.group(2) or m.group(3)):
        raise _Bad(text)
    if len(m.group(2).lstrip("0")) > 16:  # Decimal(18, 2)
        raise _Bad(text)
    return Decimal(text)


def money_places(value: Decimal) -> int:
    """Fraction digits that matter: 1.500 has 1, 1.505 has 3."""
    exponent = value.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def parse_ts(text: str) -> datetime:
    """ISO-8601 -> aware UTC datetime (no offset means UTC)."""
    m = _TS_RE.fullmatch(text)
    if not m:
        raise _Bad(text)
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or "").ljust(6, "0")[:6])
    tz = UTC
    if m.group(8) and m.group(8) != "Z":
        sign = -1 if m.group(8)[0] == "-" else 1
        digits = m.group(8)[1:].replace(":", "")
        tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz).astimezone(UTC)
    except (ValueError, OverflowError) as e:
        raise _Bad(text) from e


def _parse(kind: str, text: str) -> Any:
    if kind == INT:
        return parse_int(text)
    if kind == MONEY:
        return parse_money(text)
    if kind == TS:
        return parse_ts(text)
    return text  # STR and STATUS (status is checked by its own rule)


# --- one file ---------------------------------------------------------------------------------------------------
@dataclass
class FileResult:
    """The outcome of validating one file."""

    path: Path
    dataset: str | None
    accepted: bool = False
    reason: Reason | None = None  # file-level reason when rejected
    rows: int = 0  # data rows
    rejects: list[tuple[int, Reason]] = field(default_factory=list)  # (line, reason) of each rejected row
    valid: list[dict[str, Any]] = field(default_factory=list)  # typed valid rows, with "_line"


def check_row(schema: Schema, raw: dict[str, str | None]) -> tuple[Reason | None, dict[str, Any]]:
    """The first rule (in Reason order) a row breaks, or None and the typed row."""
    values = {c: (None if raw.get(c) in (None, "") else raw[c]) for c in schema.columns}
    if any(values[c] is None for c, (_, required) in schema.columns.items() if required):
        return Reason.MISSING_REQUIRED, {}
    row: dict[str, Any] = {}
    try:
        for c, (kind, _) in schema.columns.items():
            text = values[c]
            row[c] = None if text is None else _parse(kind, text)
    except _Bad:
        return Reason.BAD_TYPE, {}
    for c, (kind, _) in schema.columns.items():
        if kind == STATUS and row[c] is not None:
            if row[c].lower() not in STATUSES:
                return Reason.UNKNOWN_STATUS, {}
            row[c] = row[c].lower()
    money = [row[c] for c, (kind, _) in schema.columns.items() if kind == MONEY and row[c] is not None]
    if any(v < 0 for v in money):
        return Reason.NEGATIVE_MONEY, {}
    if any(money_places(v) > 2 for v in money):
        return Reason.MONEY_PRECISION, {}
    if "num_of_item" in row and row["num_of_item"] is not None and row["num_of_item"] < 1:
        return Reason.BAD_QUANTITY, {}
    if "created_at" in row:
        for c in LATER_TIMESTAMPS:
            if c in row and row[c] is not None and row[c] < row["created_at"]:
                return Reason.TIMESTAMP_ORDER, {}
    return None, row


def _read_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 stay as lone surrogates so only their own rows are rejected."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.decompress(data)
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")


def _bad_encoding(record: list[str]) -> bool:
    return any("\x00" in value or any("\udc80" <= ch <= "\udcff" for ch in value) for value in record)


def _records(path: Path) -> list[tuple[int, list[str]]]:
    """(first physical line, fields) of every record, the header included."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    line = 1
    for record in reader:
        records.append((line, record))
        line = reader.line_num + 1
    return records


def _header_reason(schema: Schema, header: list[str]) -> Reason | None:
    names = [h.strip().lower() for h in header]
    if len(set(names)) < len(names):
        return Reason.DUPLICATE_COLUMN
    if any(c not in names for c in schema.columns if schema.columns[c][1]):
        return Reason.MISSING_COLUMN
    return None


def check_file(path: Path | str, dataset: str | None = None, max_invalid_share: float = 0.05) -> FileResult:
    """Validate one file (SPEC 2): file-level rules, then each row; ``dataset`` None means detect it."""
    path = Path(path)
    dataset = dataset or detect_dataset(path)
    result = FileResult(path, dataset)
    if dataset is None or dataset not in SCHEMAS:
        result.reason = Reason.UNKNOWN_DATASET
        return result
    schema = SCHEMAS[dataset]
    try:
        records = _records(path)
    except (OSError, EOFError, zlib.error, csv.Error):
        result.reason = Reason.UNREADABLE
        return result
    if not records:
        result.reason = Reason.EMPTY_FILE
        return result
    header = records[0][1]
    if _bad_encoding(header):
        result.reason = Reason.UNREADABLE
        return result
    result.reason = _header_reason(schema, header)
    if result.reason is not None:
        return result
    names = [h.strip().lower() for h in header]
    data = [(line, record) for line, record in records[1:] if record]
    if not data:
        result.reason = Reason.EMPTY_FILE
        return result
    result.rows = len(data)
    seen: set[Any] = set()
    for line, record in data:
        reason: Reason | None = None
        if len(record) != len(names):
            reason = Reason.MALFORMED_ROW
        elif _bad_encoding(record):
            reason = Reason.BAD_ENCODING
        else:
            reason, row = check_row(schema, dict(zip(names, record, strict=True)))
            if reason is None and row[schema.key] in seen:
                reason = Reason.DUPLICATE_KEY
        if reason is not None:
            result.rejects.append((line, reason))
            continue
        seen.add(row[schema.key])
        row["_line"] = line
        result.valid.append(row)
    if Fraction(len(result.rejects), result.rows) > Fraction(str(max_invalid_share)):
        result.reason = Reason.TOO_MANY_INVALID
        return result
    result.accepted = True
    return result


def reference_rejects(path: Path | str, dataset: str | None = None) -> list[tuple[int, str]]:
    """(line, reason code) of each rejected row of one file; [] when the file cannot be checked row by row."""
    return [(line, str(reason)) for line, reason in check_file(path, dataset, max_invalid_share=1.0).rejects]


# --- the union of all files and the KPIs --------------------------------------------------------------------------
@dataclass
class Run:
    """Everything the reference derives from a sequence of files (for tests that want more than the KPIs)."""

    files: list[FileResult]
    products: dict[int, dict[str, Any]]
    orders: dict[int, dict[str, Any]]
    items: dict[int, dict[str, Any]]
    counted: list[dict[str, Any]]  # items whose order and product are present, same user
    waiting: list[dict[str, Any]]  # items whose order or product is absent
    user_mismatch: list[dict[str, Any]]
    conflicts: int  # keys delivered again with different values
    daily: list[dict[str, Any]]
    category: list[dict[str, Any]]


def _file_list(files: Iterable[FileSpec]) -> list[tuple[str | None, Path]]:
    out: list[tuple[str | None, Path]] = []
    for f in files:
        if isinstance(f, tuple):
            out.append((f[0], Path(f[1])))
        else:
            out.append((None, Path(f)))
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "_line"} == {k: v for k, v in b.items() if k != "_line"}


def _half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, for non-negative integers."""
    return (2 * numerator + denominator) // (2 * denominator)


def _hundredths(value: int) -> Decimal:
    """An integer count of hundredths as a 2-decimal Decimal: 1234 -> 12.34."""
    return (Decimal(value) / 100).quantize(CENT)


def _cents(value: Decimal) -> int:
    cents = value * 100
    assert cents == cents.to_integral_value()
    return int(cents)


def _is_returned(row: dict[str, Any]) -> bool:
    return bool(row["status"] == "returned" or row["returned_at"] is not None)


def reference_run(files: Sequence[FileSpec], max_invalid_share: float = 0.05) -> Run:
    """Validate ``files`` in arrival order, merge the accepted rows, and compute the KPIs of SPEC 3.

    One long function on purpose: an oracle should read top to bottom like the SPEC it restates, with no structure
    of its own to get wrong."""
    results = [check_file(p, ds, max_invalid_share) for ds, p in _file_list(files)]
    tables: dict[str, dict[Any, dict[str, Any]]] = {name: {} for name in SCHEMAS}
    conflicts = 0
    for r in results:
        if not r.accepted or r.dataset is None:
            continue
        table, key = tables[r.dataset], SCHEMAS[r.dataset].key
        for row in r.valid:
            old = table.get(row[key])
            if old is not None and not _same(old, row):
                conflicts += 1
            table[row[key]] = row  # the later-arriving file wins
    products, orders, items = tables["products"], tables["orders"], tables["order_items"]

    counted, waiting, mismatch = [], [], []
    for item in items.values():
        order = orders.get(item["order_id"])
        if order is not None and order["user_id"] != item["user_id"]:
            mismatch.append(item)
        elif order is None or item["product_id"] not in products:
            waiting.append(item)
        else:
            counted.append(item)

    def order_date(order: dict[str, Any]) -> str:
        return str(order["created_at"].astimezone(UTC).date())

    day_orders: dict[str, set[int]] = {}
    day_users: dict[str, set[int]] = {}
    day_returned: dict[str, set[int]] = {}
    for oid, order in orders.items():
        d = order_date(order)
        day_orders.setdefault(d, set()).add(oid)
        day_users.setdefault(d, set()).add(order["user_id"])
        if _is_returned(order):
            day_returned.setdefault(d, set()).add(oid)
    day_revenue: dict[str, int] = {}
    day_items: dict[str, int] = {}
    cat_orders: dict[tuple[str, str], set[int]] = {}
    cat_returned: dict[tuple[str, str], set[int]] = {}
    cat_revenue: dict[tuple[str, str], int] = {}
    for item in counted:
        d = order_date(orders[item["order_id"]])
        cents = _cents(item["sale_price"])
        day_revenue[d] = day_revenue.get(d, 0) + cents
        day_items[d] = day_items.get(d, 0) + 1
        cat_day = (products[item["product_id"]]["category"], d)
        cat_orders.setdefault(cat_day, set()).add(item["order_id"])
        cat_revenue[cat_day] = cat_revenue.get(cat_day, 0) + cents
        if _is_returned(item):
            cat_returned.setdefault(cat_day, set()).add(item["order_id"])

    daily = [
        {
            "order_date": d,
            "total_orders": len(day_orders[d]),
            "total_revenue": _hundredths(day_revenue.get(d, 0)),
            "total_items_sold": day_items.get(d, 0),
            "return_rate": _hundredths(_half_up(10_000 * len(day_returned.get(d, ())), len(day_orders[d]))),
            "unique_customers": len(day_users[d]),
        }
        for d in sorted(day_orders)
    ]
    category = [
        {
            "category": cat,
            "order_date": d,
            "daily_revenue": _hundredths(cat_revenue[(cat, d)]),
            "avg_order_value": _hundredths(_half_up(cat_revenue[(cat, d)], len(cat_orders[(cat, d)]))),
            "avg_return_rate": _hundredths(
                _half_up(10_000 * len(cat_returned.get((cat, d), ())), len(cat_orders[(cat, d)]))
            ),
        }
        for cat, d in sorted(cat_orders, key=lambda k: (k[1], k[0]))
    ]
    return Run(results, products, orders, items, counted, waiting, mismatch, conflicts, daily, category)


def reference_kpis(files: Sequence[FileSpec], max_invalid_share: float = 0.05) -> dict[str, list[dict[str, Any]]]:
    """``{"daily": [...], "category": [...]}`` with the objects of ``shopkpi kpis --json`` (Decimal values).

    ``files`` are in arrival order: paths (dataset from the name) or ``(dataset, path)`` tuples.
    """
    run = reference_run(files, max_invalid_share)
    return {"daily": run.daily, "category": run.category}
