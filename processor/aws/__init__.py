"""The AWS adapter: the only package that calls boto3.

Clients are built by :func:`make_clients` and passed in; every AWS exception leaves this package already
translated into :mod:`processor.errors` (see :func:`aws_call`).
"""

from processor.aws.clients import Clients, aws_call, client_config, make_clients, translate
from processor.aws.dynamo import (
    BY_DATE,
    BY_KIND,
    KpiTables,
    Ledger,
    PublishStats,
    TableNames,
    create_tables,
    table_definitions,
    table_names,
)
from processor.aws.s3 import CHUNK_SIZE, ObjectInfo, S3Store, is_s3_uri, join_uri, split_uri

__all__ = [
    "BY_DATE",
    "BY_KIND",
    "CHUNK_SIZE",
    "Clients",
    "KpiTables",
    "Ledger",
    "ObjectInfo",
    "PublishStats",
    "S3Store",
    "TableNames",
    "aws_call",
    "client_config",
    "create_tables",
    "is_s3_uri",
    "join_uri",
    "make_clients",
    "split_uri",
    "table_definitions",
    "table_names",
    "translate",
]
