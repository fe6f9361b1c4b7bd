"""The ECR repository of the processor image: find or create it, and the ``docker login`` it needs.

Used by ``shopkpi deploy`` (:mod:`orchestration.deploy`), never inside a task. Part of the one adapter layer: clients
are passed in, every call goes through :func:`processor.aws.clients.aws_call`, so callers see only
:class:`~processor.errors.ShopKpiError` subclasses.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from processor.aws.clients import aws_call
from processor.errors import ShopKpiError

__all__ = ["Registry", "RegistryLogin"]


@dataclass(frozen=True)
class RegistryLogin:
    """What ``docker login`` needs: ECR hands out a 12-hour password for the fixed user ``AWS``."""

    username: str
    password: str
    endpoint: str


class Registry:
    """The ECR repository the processor image is pushed to.

    The repository lives outside the stack on purpose: the image must be pushed *before* the stack's task definition
    can reference it, and images should survive deleting and recreating the stack.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def repository_uri(self, name: str) -> str | None:
        """The repository's URI (``<account>.dkr.ecr.<region>.amazonaws.com/<name>``), or None when it is absent."""
        try:
            with aws_call("ecr.describe_repositories", repository=name):
                found = self.client.describe_repositories(repositoryNames=[name])["repositories"]
        except ShopKpiError as e:
            if e.context.get("aws_code") == "RepositoryNotFoundException":
                return None
            raise
        return str(found[0]["repositoryUri"]) if found else None

    def ensure_repository(self, name: str) -> str:
        """Create the repository unless it exists; return its URI."""
        uri = self.repository_uri(name)
        if uri is not None:
            return uri
        try:
            with aws_call("ecr.create_repository", repository=name):
                created = self.client.create_repository(
                    repositoryName=name,
                    # Scanning on push is free for basic scanning and flags known CVEs in the base image early.
                    imageScanningConfiguration={"scanOnPush": True},
                )
        except ShopKpiError as e:
            # Two deploys racing: the other one created it between our describe and create.
            if e.context.get("aws_code") != "RepositoryAlreadyExistsException":
                raise
            again = self.repository_uri(name)
            if again is None:
                raise
            return again
        return str(created["repository"]["repositoryUri"])

    def login(self) -> RegistryLogin:
        with aws_call("ecr.get_authorization_token"):
            data = self.client.get_authorization_token()["authorizationData"][0]
        user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
        return RegistryLogin(username=user, password=password, endpoint=str(data["proxyEndpoint"]))
