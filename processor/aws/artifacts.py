"""Where ``shopkpi deploy`` puts a template too big to send inline.

CloudFormation takes at most 51,200 bytes as ``TemplateBody``; a bigger template must be read from S3
(``TemplateURL``, up to 1 MB), which is how the AWS CLI (``aws cloudformation deploy --s3-bucket``) and SAM do it.
The stack's own landing bucket does not exist before the stack's first deployment, so the template goes to a bucket
of its own, outside the stack: ``<stack>-deploy-<account>-<region>``, created on first need (private, encrypted,
objects expire after 30 days), holding ``templates/<sha256>.yaml``.

Used by ``shopkpi deploy`` (:mod:`orchestration.deploy`), never inside a task. Part of the one adapter layer: the
client is passed in, every call goes through :func:`processor.aws.clients.aws_call`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from processor.aws.clients import aws_call
from processor.errors import ShopKpiError

__all__ = ["TEMPLATE_BODY_LIMIT", "TemplateStore"]

#: The most bytes CloudFormation accepts as an inline ``TemplateBody``.
TEMPLATE_BODY_LIMIT = 51_200


class TemplateStore:
    """The deploy bucket of one stack, account and region."""

    def __init__(self, client: Any, stack: str, account: str, region: str) -> None:
        self.client = client
        self.region = region
        self.bucket = f"{stack.lower()}-deploy-{account}-{region}"

    def where(self, body: str) -> dict[str, str]:
        """The argument that hands ``body`` to CloudFormation: ``TemplateBody`` when it fits, else ``TemplateURL``
        of a copy put in the deploy bucket (created first if need be)."""
        if len(body.encode()) <= TEMPLATE_BODY_LIMIT:
            return {"TemplateBody": body}
        return {"TemplateURL": self.put(body)}

    def put(self, body: str) -> str:
        self.ensure_bucket()
        key = f"templates/{hashlib.sha256(body.encode()).hexdigest()}.yaml"
        with aws_call("s3.put_object", bucket=self.bucket, key=key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body.encode(), ContentType="text/yaml")
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{key}"

    def ensure_bucket(self) -> None:
        """Create the bucket if need be, then (again, every time: a first run may have stopped half-way) block
        public access, encrypt and expire its objects; each of these calls is idempotent."""
        try:
            with aws_call("s3.head_bucket", bucket=self.bucket):
                self.client.head_bucket(Bucket=self.bucket)
        except ShopKpiError as e:
            if e.context.get("aws_code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            where = {"CreateBucketConfiguration": {"LocationConstraint": self.region}}
            with aws_call("s3.create_bucket", bucket=self.bucket):
                # us-east-1 is the one region that refuses its own name as a location constraint
                self.client.create_bucket(Bucket=self.bucket, **({} if self.region == "us-east-1" else where))
        with aws_call("s3.put_bucket_settings", bucket=self.bucket):
            self.client.put_public_access_block(
                Bucket=self.bucket,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
            )
            self.client.put_bucket_encryption(
                Bucket=self.bucket,
                ServerSideEncryptionConfiguration={
                    "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
                },
            )
            # a template is needed only while its change set is created and executed
            self.client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket,
                LifecycleConfiguration={
                    "Rules": [
                        {"ID": "expire-templates", "Status": "Enabled", "Filter": {"Prefix": "templates/"},
                         "Expiration": {"Days": 30}}
                    ]
                },
            )  # fmt: skip
