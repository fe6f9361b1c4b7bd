"""A template too big for CloudFormation's TemplateBody goes through the deploy bucket (moto)."""

from __future__ import annotations

import boto3
from moto import mock_aws

from processor.aws.artifacts import TEMPLATE_BODY_LIMIT, TemplateStore


@mock_aws
def test_a_template_that_fits_is_sent_inline_and_no_bucket_is_made() -> None:
    s3 = boto3.client("s3", region_name="eu-west-1")
    store = TemplateStore(s3, "shop", "123456789012", "eu-west-1")
    assert store.where("Resources: {}") == {"TemplateBody": "Resources: {}"}
    assert s3.list_buckets()["Buckets"] == []


@mock_aws
def test_a_big_template_goes_to_a_private_encrypted_deploy_bucket_and_cloudformation_reads_it() -> None:
    s3 = boto3.client("s3", region_name="eu-west-1")
    body = "AWSTemplateFormatVersion: '2010-09-09'\nDescription: " + "x" * TEMPLATE_BODY_LIMIT
    body += "\nResources:\n  T:\n    Type: AWS::SNS::Topic\n"
    store = TemplateStore(s3, "shop", "123456789012", "eu-west-1")
    where = store.where(body)
    assert set(where) == {"TemplateURL"}
    assert where == store.where(body)  # the same template, the same object: a second deploy makes no copy
    bucket = "shop-deploy-123456789012-eu-west-1"
    assert s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]["BlockPublicPolicy"]
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert len(s3.list_objects_v2(Bucket=bucket)["Contents"]) == 1
    summary = boto3.client("cloudformation", region_name="eu-west-1").get_template_summary(**where)
    assert summary["ResourceTypes"] == ["AWS::SNS::Topic"]


@mock_aws
def test_a_deploy_bucket_left_half_made_is_private_and_encrypted_after_the_next_deploy() -> None:
    # A first deploy that stopped right after CreateBucket must not leave a bucket without its settings for good.
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="shop-deploy-123456789012-us-east-1")
    TemplateStore(s3, "Shop", "123456789012", "us-east-1").put("Resources: {}\n")
    assert s3.get_public_access_block(Bucket="shop-deploy-123456789012-us-east-1")["PublicAccessBlockConfiguration"][
        "RestrictPublicBuckets"
    ]
    assert s3.get_bucket_lifecycle_configuration(Bucket="shop-deploy-123456789012-us-east-1")["Rules"]
