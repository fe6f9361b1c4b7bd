"""``shopkpi deploy``: build and push the processor image, then create or update the stack through a change set.

The flow, in the order that keeps a failed deploy cheap:

1. credentials (STS ``GetCallerIdentity``): nothing else makes sense without them, and the account id names the
   registry;
2. Docker (unless an image is given): checked before anything is created in the account;
3. the image: ``docker build`` (``linux/amd64``, what the task definition runs), ``docker login`` with an ECR token,
   ``docker push``, tagged with the git commit;
4. a change set of the rendered template (:func:`orchestration.template.render_template`), sent inline or, when
   it is bigger than CloudFormation takes inline, from the deploy bucket (:mod:`processor.aws.artifacts`): CREATE
   when the stack does not exist, UPDATE otherwise. "No changes" ends the deploy successfully; the plan is shown
   before executing;
5. ``--dry-run`` stops here and deletes the change set (and the empty stack a CREATE change set leaves behind);
6. execute, follow the stack's events until it settles, and return its outputs, or raise naming each failed
   resource and its reason.

Every AWS call goes through the adapter layer (:mod:`processor.aws.cloudformation`, :mod:`processor.aws.ecr`);
Docker runs as a subprocess.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from orchestration.template import render_template
from processor.aws import make_clients
from processor.aws.artifacts import TemplateStore
from processor.aws.clients import Clients, aws_call
from processor.aws.cloudformation import Change, ChangeSet, ChangeSets, Stacks, event_line
from processor.aws.ecr import Registry
from processor.errors import AccessDenied, AwsError, ConfigError, ShopKpiError
from processor.settings import Settings

__all__ = [
    "NO_CREDENTIALS",
    "NO_DOCKER",
    "DeployResult",
    "Plan",
    "build_and_push",
    "check_credentials",
    "deploy",
    "docker_problem",
    "image_tag",
]

ROOT = Path(__file__).resolve().parent.parent
NO_CREDENTIALS = (
    "no AWS credentials found: configure a profile (aws configure, or aws sso login) and set AWS_PROFILE, "
    "or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
)
NO_DOCKER = "Docker is required to build the image; install it or pass --skip-image --image-uri URI"
#: A first deploy creates a VPC, an ECS cluster and a dozen more resources: usually 3-6 minutes, rarely more.
STACK_TIMEOUT_S = 3600.0
#: Parameters the deploy sets itself; a --param for them would silently fight the dedicated option.
_RESERVED = {"EnvironmentName": "--stack (SHOPKPI_STACK)", "ImageUri": "--image-uri"}
#: The image runs on Fargate X86_64 (the task definition's RuntimePlatform); building for the host's architecture on
#: an ARM laptop would push an image that cannot start.
PLATFORM = "linux/amd64"
_CREDENTIAL_CODES = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"})

Status = Literal["planned", "unchanged", "deployed"]


@dataclass(frozen=True)
class Plan:
    """What a change set would do: the stack, the change set type and its resource changes."""

    stack: str
    account: str
    region: str
    kind: str  # CREATE | UPDATE
    changes: tuple[Change, ...]
    #: The parameters the stack gets: those given, and those kept at the stack's current value (see ``kept``).
    parameters: dict[str, str]
    #: Parameters not given that keep their deployed (non-default) value, as ``aws cloudformation deploy`` does.
    kept: tuple[str, ...] = ()
    #: The image deployed; None when the stack keeps its current one (``--skip-image`` on an existing stack).
    image_uri: str | None = None


@dataclass(frozen=True)
class DeployResult:
    plan: Plan
    #: planned: dry run, nothing changed; unchanged: the stack already matched; deployed: the change set ran.
    status: Status
    #: The stack's outputs (BucketName, StateMachineArn, ...); empty after a dry run.
    outputs: dict[str, str] = field(default_factory=dict)


def deploy(
    settings: Settings,
    *,
    image_uri: str | None,
    skip_image: bool,
    dry_run: bool,
    parameters: dict[str, str],
    progress: Callable[[str], None],
    on_plan: Callable[[Plan], None] | None = None,
) -> DeployResult:
    """Deploy (or, with ``dry_run``, plan) the stack ``settings.stack``; see the module docstring for the steps.

    ``image_uri`` deploys that image and builds nothing; ``skip_image`` without it keeps the stack's current image.
    ``parameters`` are further template parameters (``AlertEmail``, ``TaskCpu``...); parameters not given keep their
    deployed value on an update. ``progress`` receives one line per step and per stack event; ``on_plan`` receives
    the plan before it is executed (without it, the plan goes to ``progress`` line by line).
    """
    stack = settings.stack
    given = _given_parameters(stack, parameters)
    clients = make_clients(settings)
    account = check_credentials(clients)
    progress(f"{'planning' if dry_run else 'deploying'} stack {stack} in account {account}, region {clients.region}")

    stacks = Stacks(clients.cloudformation)
    sets = ChangeSets(clients.cloudformation)
    status = stacks.status(stack)
    _check_deployable(stacks, stack, status)
    # A stack left in REVIEW_IN_PROGRESS (an earlier CREATE change set never executed) has no template yet: AWS
    # accepts only another CREATE change set for it.
    kind = "CREATE" if status in (None, "REVIEW_IN_PROGRESS") else "UPDATE"

    image = _image(clients, settings, account, image_uri, skip_image, dry_run, kind, progress)
    if image is not None:
        given["ImageUri"] = image

    # inline when it fits CloudFormation's TemplateBody limit, else through the deploy bucket (TemplateURL)
    template = TemplateStore(clients.s3, stack, account, clients.region).where(render_template())
    kept = _kept_parameters(sets, stacks, stack, template, given) if kind == "UPDATE" else {}
    change_set_id, stack_id = sets.create(stack, template, given, kind=kind, keep_previous=list(kept))
    pending = _PendingChangeSet(sets, stacks, change_set_id, stack_id, made_stack=status is None)
    try:
        computed = sets.wait(change_set_id, stack_id)
    except BaseException:
        pending.discard()
        raise
    plan = Plan(stack, account, clients.region, kind, computed.changes, {**given, **kept}, tuple(kept), image)
    return _conclude(plan, computed, pending, dry_run=dry_run, progress=progress, on_plan=on_plan)


def _kept_parameters(
    sets: ChangeSets, stacks: Stacks, stack: str, template: Mapping[str, str], given: Mapping[str, str]
) -> dict[str, str]:
    """The deployed values an update keeps, by name (sorted): those not given that differ from their default.

    CloudFormation resets every parameter that is not passed to its default; a deploy that forgets --alert-email
    must not unsubscribe the alerts. Only values that differ from the default are kept, so an unchanged stack still
    yields an empty change set.
    """
    defaults = sets.template_defaults(template)
    previous = stacks.parameters(stack)
    kept = sorted(k for k in defaults if k not in given and k in previous and previous[k] != defaults[k])
    return {k: previous[k] for k in kept}


def _conclude(
    plan: Plan,
    computed: ChangeSet,
    pending: _PendingChangeSet,
    *,
    dry_run: bool,
    progress: Callable[[str], None],
    on_plan: Callable[[Plan], None] | None,
) -> DeployResult:
    """Steps 4-6 once the change set is computed: nothing to do, a failed change set, the dry run, or execute."""
    stack = plan.stack
    if computed.no_change:
        # Whatever the change list says (moto lists phantom Modify entries), such a change set changes nothing.
        pending.sets.delete(pending.change_set_id, pending.stack_id)
        progress(f"no changes: stack {stack} already matches the template and parameters; change set deleted")
        return DeployResult(replace(plan, changes=()), "unchanged", pending.stacks.outputs(stack))
    if computed.status != "CREATE_COMPLETE":
        pending.discard()
        raise AwsError(
            f"the change set for stack {stack} failed: {computed.reason or computed.status}",
            stack=stack,
            status=computed.status,
        )

    _show(plan, progress, on_plan)
    if dry_run:
        pending.discard()
        progress("dry run: change set deleted, nothing was changed")
        return DeployResult(plan, "planned")

    stacks = pending.stacks
    tail = stacks.events(pending.stack_id)
    pending.sets.execute(pending.change_set_id, pending.stack_id)
    progress(f"executing the change set ({plan.kind.lower()}); following stack events")
    final = stacks.wait(pending.stack_id, STACK_TIMEOUT_S, tail=tail, progress=lambda e: progress(event_line(e)))
    progress(f"stack {stack} is {final}")
    return DeployResult(plan, "deployed", stacks.outputs(pending.stack_id))


# --- steps -----------------------------------------------------------------------------------------------------------
def check_credentials(clients: Clients) -> str:
    """The account id of the caller; a clear :class:`ConfigError` when there are no usable credentials."""
    if clients.session.get_credentials() is None:
        raise ConfigError(NO_CREDENTIALS)
    try:
        with aws_call("sts.get_caller_identity"):
            identity = clients.client("sts").get_caller_identity()
    except AccessDenied as e:
        if e.context.get("aws_code") in _CREDENTIAL_CODES:
            raise ConfigError(f"{NO_CREDENTIALS} ({e.message})") from e
        raise ConfigError(f"AWS rejected the credentials ({e.message}): refresh them or choose another profile") from e
    return str(identity["Account"])


def _given_parameters(stack: str, parameters: Mapping[str, str]) -> dict[str, str]:
    for key, option in _RESERVED.items():
        if key in parameters:
            raise ConfigError(f"parameter {key} is set by shopkpi deploy itself; use {option}")
    return {"EnvironmentName": stack, **parameters}


def _check_deployable(stacks: Stacks, stack: str, status: str | None) -> None:
    if status is None or status == "REVIEW_IN_PROGRESS":
        return
    if status in ("ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "DELETE_FAILED", "UPDATE_ROLLBACK_FAILED"):
        # AWS refuses to update these; saying why and what to do beats its "is in ROLLBACK_COMPLETE state".
        why = stacks.failures(stack)
        hint = (
            "continue the rollback (aws cloudformation continue-update-rollback) and deploy again"
            if status == "UPDATE_ROLLBACK_FAILED"
            else f"delete it (aws cloudformation delete-stack --stack-name {stack}) and deploy again"
        )
        raise AwsError(f"stack {stack} is {status} and cannot be updated ({why}): {hint}", stack=stack, status=status)
    if status.endswith("_IN_PROGRESS"):
        raise AwsError(f"stack {stack} is busy ({status}); wait for it to finish and deploy again", stack=stack)


def _image(
    clients: Clients,
    settings: Settings,
    account: str,
    image_uri: str | None,
    skip_image: bool,
    dry_run: bool,
    kind: str,
    progress: Callable[[str], None],
) -> str | None:
    """The image URI to deploy, or None to keep the stack's current one."""
    if image_uri:
        progress(f"image: {image_uri} (given, nothing built)")
        return image_uri
    if skip_image:
        if kind == "CREATE":
            raise ConfigError(f"--skip-image needs --image-uri URI: stack {settings.stack} has no image yet")
        progress("image: keeping the stack's current image")
        return None
    registry = Registry(clients.client("ecr"))
    name = settings.stack
    if dry_run:
        # A dry run changes nothing: no repository, no build, no push. It names the image a deploy would push and
        # warns now if that deploy would fail for want of Docker.
        uri = registry.repository_uri(name) or f"{account}.dkr.ecr.{clients.region}.amazonaws.com/{name}"
        problem = docker_problem()
        if problem:
            progress(f"note: {NO_DOCKER} ({problem}); a real deploy would stop here")
        image = f"{uri}:{image_tag()}"
        progress(f"image: {image} (would be built and pushed)")
        return image
    return build_and_push(registry, name, progress)


def docker_problem() -> str | None:
    """Why Docker cannot build here, or None when it can: the client must exist and reach a daemon."""
    exe = shutil.which("docker")
    if exe is None:
        return "no docker executable on PATH"
    try:
        proc = subprocess.run(
            [exe, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"docker info failed: {e}"
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        return f"docker info failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"
    return None


def _require_docker() -> str:
    problem = docker_problem()
    exe = shutil.which("docker")
    if problem or exe is None:
        raise ConfigError(f"{NO_DOCKER} ({problem})")
    return exe


def image_tag() -> str:
    """The git commit (short sha) of the working tree; with uncommitted changes or without git, a timestamp too.

    A tag names one build: two builds of different uncommitted trees must not share a tag, or tasks would run
    whichever was pushed last.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    try:
        sha = _git("rev-parse", "--short=12", "HEAD")
        # Untracked files count: a new module not yet added to git is still in the build context.
        dirty = _git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return stamp
    return f"{sha}-dirty-{stamp}" if dirty else sha


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def build_and_push(registry: Registry, repository: str, progress: Callable[[str], None]) -> str:
    """Build the image from the repository's Dockerfile, push it to ECR, return its URI (``repo:tag``)."""
    exe = _require_docker()
    repo_uri = registry.ensure_repository(repository)
    image = f"{repo_uri}:{image_tag()}"
    progress(f"image: building {image} for {PLATFORM}")
    _docker(exe, "build", "--platform", PLATFORM, "-t", image, ".")
    login = registry.login()
    progress(f"image: logging in to {login.endpoint}")
    _docker(exe, "login", "--username", login.username, "--password-stdin", login.endpoint, secret=login.password)
    progress(f"image: pushing {image}")
    _docker(exe, "push", image)
    return image


def _docker(exe: str, *args: str, secret: str | None = None) -> None:
    # Docker's own output goes to our stderr (fd 2) as it happens: stdout carries only the command's answer, and a
    # build can take minutes. The registry password goes through stdin, never the command line (visible in ps).
    proc = subprocess.run(
        [exe, *args],
        cwd=ROOT,
        input=secret.encode() if secret is not None else None,
        stdin=None if secret is not None else subprocess.DEVNULL,
        stdout=2,
        stderr=2,
        check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(f"docker {args[0]} failed (exit status {proc.returncode}); its output is above")


# --- helpers ---------------------------------------------------------------------------------------------------------
def _show(plan: Plan, progress: Callable[[str], None], on_plan: Callable[[Plan], None] | None) -> None:
    counts: dict[str, int] = {}
    for c in plan.changes:
        counts[c.action] = counts.get(c.action, 0) + 1
    replaced = sum(1 for c in plan.changes if c.replacement in ("True", "Conditional"))
    summary = ", ".join(f"{n} {action.lower()}" for action, n in counts.items()) or "no resource changes"
    progress(f"plan: {plan.kind} {plan.stack}: {summary}" + (f"; {replaced} may be replaced" if replaced else ""))
    if on_plan is not None:
        on_plan(plan)
        return
    for c in plan.changes:
        extra = f" (replacement: {c.replacement})" if c.replacement else ""
        progress(f"  {c.action:<7} {c.logical_id} {c.resource_type}{extra}")


@dataclass(frozen=True)
class _PendingChangeSet:
    """A change set created and not yet executed, and whether creating it also created the (empty) stack."""

    sets: ChangeSets
    stacks: Stacks
    change_set_id: str
    stack_id: str
    made_stack: bool

    def discard(self) -> None:
        """Delete the change set, and the empty REVIEW_IN_PROGRESS stack it created; best effort, since this runs
        while another error may be on its way out."""
        with contextlib.suppress(ShopKpiError):
            self.sets.delete(self.change_set_id, self.stack_id)
        if self.made_stack:
            with contextlib.suppress(ShopKpiError):
                self.stacks.delete(self.stack_id)
