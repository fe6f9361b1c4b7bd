"""Start an ECS task as a local process: what ``ecs:runTask`` does, minus the container runtime.

The task definition registered in moto's ECS is the source of truth (entry point, command, environment), so the
local run exercises the same task definition the stack deploys; only the image is replaced by this checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["EXECUTABLES", "run_task_locally"]

#: Executables of our image, mapped to a command that runs the same code from this checkout's interpreter (the
#: console script need not be on PATH, and the child uses the same virtual environment as the caller).
EXECUTABLES: dict[str, list[str]] = {"shopkpi-task": [sys.executable, "-m", "processor.tasks"]}

# Fake credentials: whatever the developer's shell holds, a local task must never reach a real account.
_LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
_DROPPED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def run_task_locally(
    parameters: Mapping[str, Any],
    *,
    endpoint_url: str,
    ecs_client: Any,
    extra_env: Mapping[str, str],
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start the task described by the ``Parameters`` of an ``ecs:runTask`` state; do not wait for it.

    ``parameters`` uses Step Functions casing (``TaskDefinition``, ``Overrides.ContainerOverrides[]`` with
    ``Name``, ``Command``, ``Environment``). The container is the task definition's only container, else the one
    the first container override names. Its argv is ``entryPoint + command`` (an override's ``Command`` replaces
    ``command``), with :data:`EXECUTABLES` applied to the first word. Its environment, later entries winning:
    ``os.environ``, the container's ``environment``, ``extra_env``, the override's ``Environment``, then the
    endpoint, fake credentials and the client's region. Output goes to ``log_path`` (appended) or is inherited.
    """
    task_definition = ecs_client.describe_task_definition(taskDefinition=parameters["TaskDefinition"])["taskDefinition"]
    overrides: Sequence[Mapping[str, Any]] = parameters.get("Overrides", {}).get("ContainerOverrides", [])
    container = _container(task_definition["containerDefinitions"], overrides)
    override = next((o for o in overrides if o.get("Name") == container["name"]), {})

    command = override["Command"] if "Command" in override else container.get("command", [])
    argv = [*container.get("entryPoint", []), *command]
    if not argv:
        raise ValueError(f"container {container['name']!r} has neither entryPoint nor command")
    argv = [*EXECUTABLES.get(PurePosixPath(argv[0]).name, [argv[0]]), *argv[1:]]

    region = ecs_client.meta.region_name
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env.update({e["name"]: e["value"] for e in container.get("environment", [])})
    env.update(extra_env)
    env.update({e["Name"]: e["Value"] for e in override.get("Environment", [])})
    env.update(_LOCAL_CREDENTIALS, AWS_ENDPOINT_URL=endpoint_url, AWS_DEFAULT_REGION=region, AWS_REGION=region)

    # No stdin, as in a container: a task must never wait on the developer's terminal.
    if log_path is None:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:  # the child keeps its own descriptor; ours can close at once
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _container(definitions: Sequence[Mapping[str, Any]], overrides: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    if len(definitions) == 1:
        return definitions[0]
    wanted = overrides[0].get("Name") if overrides else None
    for definition in definitions:
        if definition["name"] == wanted:
            return definition
    names = [d["name"] for d in definitions]
    raise ValueError(f"cannot tell which of the containers {names} to run: name one in ContainerOverrides")
