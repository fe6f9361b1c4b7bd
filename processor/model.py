"""Records that cross module and process boundaries: KPI rows, file outcomes, task results.

msgspec Structs: typed, cheap, and encoded to the JSON the state machine, the ledger and the CLI exchange.
Money is carried as integer cents and rates as exact components; rounding happens only when shown or stored
(:mod:`processor.kpis`).
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal

import msgspec

CENT = Decimal("0.01")


def cents_to_decimal(cents: int) -> Decimal:
    return (Decimal(cents) / 100).quantize(CENT)


def ratio(numerator: int | Decimal, denominator: int, scale: int = 1) -> Decimal:
    """``scale * numerator / denominator`` rounded half-up to 2 decimals, exactly (0 when denominator is 0)."""
    if denominator == 0:
        return Decimal("0.00")
    return (Decimal(numerator) * scale / Decimal(denominator)).quantize(CENT, rounding=ROUND_HALF_UP)


# Decimals as JSON numbers written with their digits (``10.50``), never through a binary float (``10.5``,
# ``1.000000000000005e+16``): SPEC section 3.
_JSON = msgspec.json.Encoder(decimal_format="number")


def _json_ready(value: object) -> object:
    if isinstance(value, Decimal):
        # Every Decimal a user sees is money, a rate or an average: exactly two places, even if one was not quantized.
        return value.quantize(CENT, rounding=ROUND_HALF_UP)
    if isinstance(value, datetime | date):
        # isoformat keeps the "+00:00" offsets ``runs --json`` has always printed (msgspec would write "Z").
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def to_json(value: object, *, indent: int = 0) -> bytes:
    """The JSON users and tools read (``--json``, the dashboard's API): money and rates as exact 2-decimal numbers."""
    data = _JSON.encode(_json_ready(value))
    return msgspec.json.format(data, indent=indent) if indent else data


class OrderKpi(msgspec.Struct, frozen=True, kw_only=True):
    """Order-level KPIs of one order_date, with the exact components every figure derives from."""

    order_date: str  # YYYY-MM-DD (UTC date of the order's created_at)
    total_orders: int
    returned_orders: int
    total_items_sold: int
    revenue_cents: int
    unique_customers: int

    @property
    def total_revenue(self) -> Decimal:
        return cents_to_decimal(self.revenue_cents)

    @property
    def return_rate(self) -> Decimal:
        return ratio(self.returned_orders, self.total_orders, 100)

    def public(self) -> dict[str, object]:
        """The brief's fields, as ``kpis daily --json`` prints them."""
        return {
            "order_date": self.order_date,
            "total_orders": self.total_orders,
            "total_revenue": self.total_revenue,
            "total_items_sold": self.total_items_sold,
            "return_rate": self.return_rate,
            "unique_customers": self.unique_customers,
        }


class CategoryKpi(msgspec.Struct, frozen=True, kw_only=True):
    """Category-level KPIs of one (category, order_date)."""

    category: str
    order_date: str
    orders: int  # distinct orders of that date containing an item of the category
    returned_orders: int  # of those, orders in which an item of the category was returned
    items: int
    revenue_cents: int

    @property
    def daily_revenue(self) -> Decimal:
        return cents_to_decimal(self.revenue_cents)

    @property
    def avg_order_value(self) -> Decimal:
        return ratio(Decimal(self.revenue_cents) / 100, self.orders)

    @property
    def avg_return_rate(self) -> Decimal:
        return ratio(self.returned_orders, self.orders, 100)

    def public(self) -> dict[str, object]:
        """The brief's fields, as ``kpis category --json`` prints them."""
        return {
            "category": self.category,
            "order_date": self.order_date,
            "daily_revenue": self.daily_revenue,
            "avg_order_value": self.avg_order_value,
            "avg_return_rate": self.avg_return_rate,
        }


class ValidationResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the validation task returns to the state machine (and records in the ledger)."""

    file_id: str
    source: str
    dataset: str | None
    outcome: str  # "accepted" | "rejected"
    reason: str | None = None  # file-level reason code when rejected
    message: str | None = None
    rows: int = 0
    valid_rows: int = 0
    rejected_rows: int = 0
    rejects_by_reason: dict[str, int] = msgspec.field(default_factory=dict)
    arrival: str | None = None  # ISO-8601 UTC arrival time: orders versions, later wins
    segment: str | None = None  # staged segment key (accepted files)
    rejects: str | None = None  # where the rejected rows are kept
    report: str | None = None  # where the JSON report is kept
    seconds: float = 0.0


class MergeResult(msgspec.Struct, kw_only=True):
    """What the merge (KPI) step returns: what it applied, what it published and what still waits."""

    generation: int
    segments: int  # committed segments (files staged so far)
    files_merged: int  # of those, files this merge applied (the delivery)
    groups_recomputed: int  # order groups whose contribution was recomputed
    dates: list[str]  # dates whose order KPIs were published or removed
    daily_kpis: int  # order-level KPI items published
    category_kpis: int  # category-level KPI items published
    removed_kpis: int  # KPI items removed because their group no longer has rows
    published: int  # items written or removed in the KPI store (unchanged and newer ones are skipped)
    pending: dict[str, int]  # items waiting for their order / product
    orphans: dict[str, int]  # of those, waiting longer than the grace period
    late_rejects: dict[str, int]  # items rejected at merge time (user_mismatch), as the state stands
    conflicts: int  # primary keys delivered with different values by different files
    state_rows: dict[str, int] = msgspec.field(default_factory=dict)  # rows held by each keyed table
    seconds: float = 0.0
