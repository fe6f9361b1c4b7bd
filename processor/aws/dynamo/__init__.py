"""DynamoDB: the KPI tables (order level, category level), the ledger (file outcomes, runs) and the merge lock.

One module per job:

* :mod:`~processor.aws.dynamo.tables`     the table definitions; ``create_tables`` for tests and the embedded stack
* :mod:`~processor.aws.dynamo.kpi_store`  :class:`KpiTables`: publish under the generation guard, reads
* :mod:`~processor.aws.dynamo.ledger`     :class:`Ledger`: file outcomes and runs, as :class:`FileRecord` and
  :class:`RunRecord`
* :mod:`~processor.aws.dynamo.merge_lock` :class:`MergeLock`: the lease lock, hand-over and the generation counter
* :mod:`~processor.aws.dynamo.batch`      the one item codec, single-item reads, batch reads and writes with retries

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

from processor.aws.dynamo.kpi_store import KpiTables, PublishStats
from processor.aws.dynamo.ledger import FileRecord, Ledger, RunRecord
from processor.aws.dynamo.merge_lock import LockRecord, MergeLock
from processor.aws.dynamo.tables import BY_DATE, BY_KIND, TableNames, create_tables, table_definitions, table_names

__all__ = [
    "BY_DATE",
    "BY_KIND",
    "FileRecord",
    "KpiTables",
    "Ledger",
    "LockRecord",
    "MergeLock",
    "PublishStats",
    "RunRecord",
    "TableNames",
    "create_tables",
    "table_definitions",
    "table_names",
]
