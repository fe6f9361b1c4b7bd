"""One exception hierarchy and one set of reason codes for the whole project.

Every error a task can raise carries a stable ``code``. The codes are a public contract: they appear in rejection
reports, in the file ledger, in structured logs and in the state machine's Retry/Catch lists (an ECS task that fails
exits with a result naming its code, and the state machine matches on it). Renaming one is a breaking change.

Errors split in two families:

* :class:`RetryableError` -- the same input may succeed if tried again (throttling, a lock held by another run, a
  transient network or service error). The state machine retries these with backoff.
* :class:`TerminalError` -- trying again cannot help (a malformed file, a missing resource, a permission problem).
  The state machine routes these to the failure path at once.

Row-level rejections are not exceptions: a bad row is data, kept with its :class:`Reason`. File-level rejections are
:class:`FileRejected` (terminal), whose code is also a :class:`Reason`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why a row or a whole file was rejected. Values are stable codes (see docs/validation.md)."""

    # file-level
    UNREADABLE = "unreadable"  # cannot be read or decompressed (gzip), or its header row cannot be read
    DUPLICATE_COLUMN = "duplicate_column"  # two header names are the same once trimmed and case-folded
    UNKNOWN_DATASET = "unknown_dataset"  # neither the path nor the file name names a dataset
    MISSING_COLUMN = "missing_column"  # a required column is absent from the header
    EMPTY_FILE = "empty_file"  # a header but no data rows
    TOO_MANY_INVALID = "too_many_invalid"  # invalid rows exceed SHOPKPI_MAX_INVALID_SHARE
    # row-level, in the order they are checked (a row gets the first that applies)
    RECORD_TOO_LONG = "record_too_long"  # longer than SHOPKPI_MAX_RECORD_KB (skipped unread past a prefix)
    MALFORMED_ROW = "malformed_row"  # wrong number of fields, or a quote that does not open or close a field
    BAD_ENCODING = "bad_encoding"  # not valid UTF-8, or a NUL byte
    MISSING_REQUIRED = "missing_required"
    BAD_TYPE = "bad_type"
    UNKNOWN_STATUS = "unknown_status"
    NEGATIVE_MONEY = "negative_money"
    MONEY_PRECISION = "money_precision"
    BAD_QUANTITY = "bad_quantity"  # num_of_item < 1
    TIMESTAMP_ORDER = "timestamp_order"  # shipped/delivered/returned before created_at
    DUPLICATE_KEY = "duplicate_key"  # primary key repeats an earlier row of the same file
    # found when the merge joins items to their orders
    USER_MISMATCH = "user_mismatch"  # item user_id differs from its order's
    # references that stay unresolved past SHOPKPI_ORPHAN_GRACE (reported, never dropped)
    ORPHAN_ORDER = "orphan_order"
    ORPHAN_PRODUCT = "orphan_product"


class ShopKpiError(Exception):
    """Base of every error the project raises on purpose."""

    code = "internal"
    retryable = False

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "retryable": self.retryable, "message": self.message, **self.context}


class RetryableError(ShopKpiError):
    code = "retryable"
    retryable = True


class TerminalError(ShopKpiError):
    code = "terminal"


# --- retryable -----------------------------------------------------------------------------------------------
class Throttled(RetryableError):
    code = "ShopKpi.Throttled"


class ServiceUnavailable(RetryableError):
    code = "ShopKpi.ServiceUnavailable"


class LockBusy(RetryableError):
    """Another merge holds the staging lock; the merge is retried after a backoff."""

    code = "ShopKpi.LockBusy"


class StaleWriter(RetryableError):
    """This merge lost its lock (lease expired) before publishing; a fresh attempt starts from the new state."""

    code = "ShopKpi.StaleWriter"


# --- terminal ------------------------------------------------------------------------------------------------
class FileRejected(TerminalError):
    """The whole input file is rejected; ``reason`` is a file-level :class:`Reason`."""

    code = "ShopKpi.FileRejected"

    def __init__(self, reason: Reason, message: str, **context: Any) -> None:
        super().__init__(message, reason=str(reason), **context)
        self.reason = reason


class NotFound(TerminalError):
    code = "ShopKpi.NotFound"


class AccessDenied(TerminalError):
    code = "ShopKpi.AccessDenied"


class ConfigError(TerminalError):
    code = "ShopKpi.ConfigError"


class StalePlan(TerminalError):
    """A fanned-out merge's plan no longer applies (its lease ran out and another merge moved the state on, or a
    part never finished); the files it planned are merged by the next merge."""

    code = "ShopKpi.StalePlan"


class InternalError(TerminalError):
    """An unexpected exception (a bug): reported at once instead of leaving the workflow to time out."""

    code = "ShopKpi.Internal"


class AwsError(TerminalError):
    """An AWS error that is neither transient nor one of the specific cases above."""

    code = "ShopKpi.AwsError"


#: Codes the state machine retries (with the States/ECS errors it adds itself).
RETRYABLE_CODES = tuple(c.code for c in (Throttled, ServiceUnavailable, LockBusy, StaleWriter))
#: Codes that go straight to the failure path.
TERMINAL_CODES = tuple(
    c.code for c in (FileRejected, NotFound, AccessDenied, ConfigError, AwsError, StalePlan, InternalError)
)
