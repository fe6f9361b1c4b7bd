"""The three tables' definitions (mirrored in the CloudFormation template) and their creation for tests and the
embedded stack (on AWS, CloudFormation creates them). The designs and access patterns are in
:mod:`processor.aws.dynamo`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from processor.aws.clients import aws_call
from processor.errors import AwsError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

BY_DATE = "by_date"
BY_KIND = "by_kind"


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
