"""The workarounds that let the unchanged ASL definition execute in moto's server mode, as one installable object.

Verified against moto 5.2.1 only (:data:`MOTO_VERSION`; :meth:`MotoPatches.install` refuses any other version,
because each patch reaches into moto internals that move between releases). ``MOTO_NOTES.md`` beside this file
holds the evidence for each gap under the same name as its patch, and what the ASL must avoid because moto cannot
execute it.

The patches act on moto's in-process objects, so moto must run in *this* process: ``ThreadedMotoServer``, or a
wrapper that installs the patches and then calls ``moto.server.main()``. A separate ``moto_server`` process cannot
be patched from outside. Usage::

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    enable_execution()                                  # the setting, see its docstring; not a patch
    with MotoPatches(runner, server_port=port):         # runner(parameters) starts one ECS task, see ecs_runner
        ...

:data:`PATCHES` lists them, in installation order, each named after the moto gap it covers (its docstring holds
the evidence in moto and when to remove it):

=========================================  ========================================================================
``ecs_run_task_cannot_run``                ``ecs:runTask[.sync|.waitForTaskToken]`` calls ``runner(parameters)``;
                                           each Retry attempt of a ``.waitForTaskToken`` task gets a fresh token
``start_execution_fails_after_first``      the second StartExecution in a region no longer fails with a 500
                                           (moto #10077)
``unnamed_executions_collide``             StartExecution without a name gets a unique name, as on AWS
``indexed_json_path_returns_list``         ``$.a[0].b`` selects the value, not a one-element list
``send_task_failure_drops_cause``          SendTaskFailure keeps its ``cause``
``nested_states_error_becomes_runtime``    a ``States.*`` error leaving a Map iteration or Parallel branch keeps
                                           its name
``states_all_catches_uncatchable``         ``States.ALL`` skips ``States.DataLimitExceeded`` and
                                           ``States.Runtime``, as on AWS
``integrations_call_port_5000``            moto's own integrations (sns, sqs, aws-sdk...) call *this* server
``multipart_upload_notifies_twice``        a multipart upload sends one "object created" event, as on AWS
=========================================  ========================================================================
"""

from __future__ import annotations

import copy
import json
import re
import sys
import urllib.request
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, cast

__all__ = ["MOTO_VERSION", "PATCHES", "MotoPatches", "Patch", "Replacement", "Runner", "enable_execution"]

#: The only moto version these patches were verified against.
MOTO_VERSION = "5.2.1"

#: Starts one ECS task from the fully evaluated ``Parameters`` of an ``ecs:runTask`` state (Step Functions casing:
#: ``Cluster``, ``TaskDefinition``, ``Overrides.ContainerOverrides[].Command/Environment``). It must not block: it
#: is called on the execution's worker thread. Its return value is ignored, except by ``ecs:runTask.sync``, which
#: polls it like a :class:`subprocess.Popen` (``poll()`` -> exit code or ``None``) until the task has stopped.
Runner = Callable[[dict[str, Any]], object]

#: One attribute a patch replaces: (owner, attribute name, new value).
Replacement = tuple[Any, str, Any]

#: A patch: given the patch set it belongs to, the replacements that close one moto gap (computed, not applied:
#: :class:`MotoPatches` applies them and remembers what they replaced).
Patch = Callable[["MotoPatches"], list[Replacement]]

_MISSING = object()
# Set on moto's stepfunctions package while a MotoPatches is installed: moto is process-wide, so is the marker.
_MARKER = "_shopkpi_moto_patches"


def enable_execution(endpoint_url: str | None = None) -> None:
    """Turn on moto's Step Functions execution engine (the parser backend); this is a setting, not a patch.

    moto 5.2.1 has no environment variable or command-line flag for it: the switch is
    ``moto.core.config.default_user_config["stepfunctions"]["execute_state_machine"]``, read on every request by
    ``moto.stepfunctions.responses.get_backend``. With ``endpoint_url`` it is set through the server's
    ``POST /moto-api/config`` (``moto_api/_internal/models.py: MotoAPIBackend.set_config``), which also works for a
    server in another process; without, directly in this process. Set it before creating state machines: the
    executing backend is a separate store, machines created before the switch are invisible to it.
    """
    if endpoint_url is None:
        from moto.core.config import default_user_config

        default_user_config["stepfunctions"] = {"execute_state_machine": True}
        return
    body = json.dumps({"stepfunctions": {"execute_state_machine": True}}).encode()
    request = urllib.request.Request(
        endpoint_url.rstrip("/") + "/moto-api/config",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


class MotoPatches:
    """Every patch of :data:`PATCHES`, installed into this process's moto by :meth:`install`, removed by
    :meth:`uninstall` (both idempotent); also a context manager doing both.

    ``runner`` starts the ECS tasks of ``ecs:runTask`` states. ``server_port`` is the port of the in-process moto
    server: moto's own integrations (sns, sqs, aws-sdk) call it through boto3, and without it they call port 5000
    (see :func:`integrations_call_port_5000`). One patch set at a time: moto's internals are process-wide, so
    installing a second one while another is installed is refused.
    """

    def __init__(self, runner: Runner, *, server_port: int | None = None) -> None:
        self.runner = runner
        self.server_port = server_port
        # ecs:runTask.sync: what the runner returned, by the task ARN the integration made up, until it polls it.
        self.sync_handles: dict[str, object] = {}
        # What install() replaced, (owner, attribute, original or _MISSING), in order, for uninstall().
        self._originals: list[tuple[Any, str, Any]] = []
        self._installed: list[str] = []

    @property
    def installed(self) -> list[str]:
        """Names of the patches installed (in order); empty when not installed."""
        return list(self._installed)

    def install(self) -> MotoPatches:
        """Apply every patch, in :data:`PATCHES` order; a second call on an installed set does nothing."""
        import moto.stepfunctions

        if moto.__version__ != MOTO_VERSION:
            raise RuntimeError(
                f"orchestration.local.moto_patches was verified against moto {MOTO_VERSION} only, found "
                f"moto {moto.__version__}: re-verify every patch (see MOTO_NOTES.md) before changing the pin"
            )
        if self._installed:
            return self
        if vars(moto.stepfunctions).get(_MARKER) is not None:
            raise RuntimeError("another MotoPatches is installed in this process: uninstall it first")
        self._replace((moto.stepfunctions, _MARKER, self))
        try:
            for patch in PATCHES:
                for replacement in patch(self):
                    self._replace(replacement)
                self._installed.append(patch.__name__)
        except BaseException:
            self.uninstall()  # never leave moto half patched
            raise
        return self

    def uninstall(self) -> None:
        """Restore everything :meth:`install` replaced, newest first; nothing to do when not installed."""
        for owner, name, original in reversed(self._originals):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._originals.clear()
        self._installed.clear()
        self.sync_handles.clear()

    def _replace(self, replacement: Replacement) -> None:
        owner, name, value = replacement
        self._originals.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)

    def __enter__(self) -> MotoPatches:
        return self.install()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.uninstall()


# --- the patches, in installation order --------------------------------------------------------------------------
def ecs_run_task_cannot_run(patches: MotoPatches) -> list[Replacement]:
    """moto's ``ecs:runTask`` integration cannot run; replace it with one that calls ``patches.runner``.

    Verified on moto 5.2.1: ``StateTaskServiceEcs._eval_service_task``
    (``stepfunctions/parser/asl/component/state/exec/state_task/service/state_task_service_ecs.py``) passes the
    Step Functions-cased Parameters straight to boto3 because ``StateTaskService._normalise_parameters`` is a
    no-op stub, so botocore's serializer fails with ``KeyError: 'Cluster'`` and the state fails with
    ``States.Runtime``; ``_normalise_response`` is a stub too (``response["Tasks"]`` would fail next), and moto's
    ECS would only record the task anyway, never run it.

    The only extension point is the service-integration factory: ``state_task_factory.state_task_for`` calls the
    module-global ``state_task_service_for`` at parse time (once per execution), so that name is rebound to return
    :class:`orchestration.local.moto_ecs.LocalEcsTask` for ``ecs``. That class also covers the gap
    ``retry_reuses_task_token``: each Retry attempt of a ``.waitForTaskToken`` task gets a fresh token, as on AWS.

    Remove when moto implements ``_normalise_parameters`` for ECS *and* runs tasks (it will not: use a real
    container runtime then), or drop only the token refresh once moto makes a token per attempt.

    Evidence: the row of this name in ``MOTO_NOTES.md#patched-in-the-execution-engine-moto_patchespy``.
    """
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import state_task_factory

    from orchestration.local.moto_ecs import LocalEcsTask  # imports moto internals: only after the version check

    original = getattr(state_task_factory, "state_task_service_for")  # noqa: B009 - not re-exported for mypy

    def state_task_service_for(service_name: str) -> Any:
        if service_name == "ecs":
            return LocalEcsTask(patches.runner, patches.sync_handles)
        return original(service_name)

    return [(state_task_factory, "state_task_service_for", state_task_service_for)]


def start_execution_fails_after_first(patches: MotoPatches) -> list[Replacement]:
    """After one execution, every StartExecution in the region fails with a 500 (getmoto/moto#10077).

    Verified on moto 5.2.1: ``StepFunctionsParserBackend.start_execution`` (``stepfunctions/parser/models.py``)
    snapshots the machine with ``copy.deepcopy(state_machine)``. The machine holds its ``executions`` (each with a
    live ``Environment`` holding an ``RLock``) and ``backend`` (every other machine and its executions), so the copy
    raises ``TypeError: cannot pickle '_thread.RLock' object`` once any execution exists.

    The snapshot only needs the definition and settings, so ``StateMachineInstance.__deepcopy__`` now copies
    everything except ``executions`` (empty in the copy) and ``backend`` (shared). Remove once the pinned moto
    contains the fix (#10093, after 5.2.1).

    Evidence: the row of this name in ``MOTO_NOTES.md#patched-in-the-execution-engine-moto_patchespy``.
    """
    from moto.stepfunctions.models import StateMachineInstance

    def __deepcopy__(self: Any, memo: dict[int, Any]) -> Any:
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in vars(self).items():
            if key == "executions":
                setattr(clone, key, [])
            elif key == "backend":
                setattr(clone, key, value)
            else:
                setattr(clone, key, copy.deepcopy(value, memo))
        return clone

    return [(StateMachineInstance, "__deepcopy__", __deepcopy__)]


def unnamed_executions_collide(patches: MotoPatches) -> list[Replacement]:
    """StartExecution without ``name`` gets the name ``None``, so the next one collides.

    Verified on moto 5.2.1: ``StepFunctionsParserBackend.start_execution`` uses ``name`` as given (the non-executing
    backend draws a uuid, the parser backend does not): the ARN ends in ``:None``, and a second unnamed start of the
    same machine either returns the first execution (same input, still running: the idempotency rule of
    ``StateMachine._handle_name_input_idempotency``) or fails with ``ExecutionAlreadyExists``. EventBridge-style
    starts pass ``name=""`` and hit the same path. We draw a uuid4 name, as AWS does. Remove when the parser
    backend generates names itself.

    Evidence: the row of this name in ``MOTO_NOTES.md#patched-in-the-execution-engine-moto_patchespy``.
    """
    from moto.stepfunctions.parser.models import StepFunctionsParserBackend

    original = StepFunctionsParserBackend.start_execution

    def start_execution(
        self: Any,
        state_machine_arn: str,
        name: str | None = None,
        execution_input: str | None = None,
        trace_header: str | None = None,
    ) -> Any:
        return cast(Any, original)(self, state_machine_arn, name or str(uuid.uuid4()), execution_input, trace_header)

    return [(StepFunctionsParserBackend, "start_execution", start_execution)]


# A definite path: only names and literal indices, no wildcard, slice, filter, union or recursive descent.
_DEFINITE_PATH = re.compile(r"^\$(?:\.[^.\[\]*,?@()]+|\[\d+\]|\['[^']*'\])*$")


def indexed_json_path_returns_list(patches: MotoPatches) -> list[Replacement]:
    """``$.a[0].b`` returns ``[b]`` instead of ``b``.

    Verified on moto 5.2.1: ``extract_json`` (``stepfunctions/parser/asl/utils/json_path.py``) wraps the match in a
    list whenever the matched node's parent was reached by an index (``matches[0].context.path`` is an ``Index``,
    a workaround for moto issue #7825 about ``$.a[*].b``), and unwraps only paths that *end* in ``[n]``. AWS
    returns the single value for every definite path. We answer definite paths (names and literal indices only)
    with their one match and leave every other path to moto's function.

    ``extract_json`` is imported by name into many modules (``string_expression``, ``argument``, ``states``, the
    Choice operators...), so the module attribute is rebound (for later imports) and so is every copy already
    imported. Remove when moto returns the value for definite paths.

    Evidence: the row of this name in ``MOTO_NOTES.md#patched-in-the-execution-engine-moto_patchespy``.
    """
    from jsonpath_ng.ext.parser import parse  # the parser moto's extract_json uses
    from moto.stepfunctions.parser.asl.utils import json_path

    original = json_path.extract_json

    def extract_json(path: str, data: Any) -> Any:
        if _DEFINITE_PATH.match(path):
            matches = parse(path).find(data)
            if len(matches) == 1:
                return matches[0].value
        return original(path, data)

    return [
        (module, "extract_json", extract_json)
        for name, module in list(sys.modules.items())
        if name.startswith("moto.stepfunctions.parser.") and vars(module).get("extract_json") is original
    ]


def send_task_failure_drops_cause(patches: MotoPatches) -> list[Replacement]:
    """SendTaskFailure drops its ``cause``.

    Verified on moto 5.2.1: ``StepFunctionResponse.send_task_failure`` (``stepfunctions/responses.py``) reads only
    ``taskToken`` and ``error`` and calls the backend without ``cause``, although
    ``StepFunctionsParserBackend.send_task_failure`` accepts it: the state's error output is
    ``{"Error": "<code>", "Cause": null}`` and the TaskFailed event has no cause, so the message our tasks send (and
    the ASL forwards to SNS and the dead-letter queue) is lost. We pass it through when the executing backend is
    active (the non-executing backend's method takes no cause). Remove when the response handler passes ``cause``.

    Evidence: the row of this name in ``MOTO_NOTES.md#patched-in-the-execution-engine-moto_patchespy``.
    """
    from moto.core.responses import EmptyResult
    from moto.stepfunctions.parser.models import StepFunctionsParserBackend
    from moto.stepfunctions.responses import StepFunctionResponse

    def send_task_failure(self: Any) -> Any:
        backend = self.stepfunction_backend
        token, error = self._get_param("taskToken"), self._get_param("error")
        if isinstance(backend, StepFunctionsParserBackend):
            backend.send_task_failure(token, error=error, cause=self._get_param("cause"))
        else:
            backend.send_task_failure(token, error=error)
        return EmptyResult()

    return [(StepFunctionResponse, "send_task_failure", send_task_failure)]


def nested_states_error_becomes_runtime(patches: MotoPatches) -> list[Replacement]:
    """An uncaught ``States.*`` error inside a Map iteration or a Parallel branch becomes ``States.Runtime``.

    Verified on moto 5.2.1: when an inline Map iteration (``IterationWorker._eval_job`` in
    ``state_map/iteration/iteration_worker.py``) or a Parallel branch (``BranchesDecl._eval_body`` in
    ``state_parallel/branches_decl.py``) ends in error, moto re-raises it on the parent as
    ``CustomErrorName(error)``, whose constructor rejects names starting with ``States.``: a task's
    ``States.Timeout`` (or ``States.TaskFailed``...) not caught inside the iterator makes the Map fail with
    ``States.Runtime`` ("Custom Error Names MUST NOT begin with the prefix 'States.'"), which no Retry or Catch on
    the Map matches as AWS would. Custom names (our tasks' error codes) propagate fine.

    Both modules look ``CustomErrorName`` up as a module global, so we rebind it there to a factory returning the
    proper ``StatesErrorName`` for known ``States.*`` names. Remove when moto builds the parent's error name with
    ``StatesErrorName`` for those.

    Evidence: the row of this name in ``MOTO_NOTES.md#patched-in-the-execution-engine-moto_patchespy``.
    """
    from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
    from moto.stepfunctions.parser.asl.component.state.exec.state_map.iteration import iteration_worker
    from moto.stepfunctions.parser.asl.component.state.exec.state_parallel import branches_decl

    def error_name_for(error_name: str | None) -> Any:
        if error_name is not None and error_name.startswith("States."):
            try:
                return StatesErrorName.from_name(error_name)
            except ValueError:  # not a name moto knows: keep moto's behaviour
                pass
        return CustomErrorName(error_name=error_name)

    return [(module, "CustomErrorName", error_name_for) for module in (iteration_worker, branches_decl)]


def states_all_catches_uncatchable(patches: MotoPatches) -> list[Replacement]:
    """moto is laxer than AWS: ``States.ALL`` matches ``States.DataLimitExceeded`` and ``States.Runtime``.

    Verified on moto 5.2.1: ``ErrorEqualsDecl._eval_body`` (``component/common/error_name/error_equals_decl.py``)
    matches every error when the list holds ``States.ALL``. AWS documents the two exceptions: a state whose output
    passes 256 KiB, or whose paths do not resolve, is not caught by a ``States.ALL`` Catch or Retry (only a rule
    that names ``States.DataLimitExceeded`` catches the first; nothing catches the second). Without this, a failure
    path that works here would not run on AWS. Keep it: it makes the embedded stack as strict as AWS.

    Evidence: the row of this name in ``MOTO_NOTES.md#patched-in-the-execution-engine-moto_patchespy``.
    """
    from moto.stepfunctions.parser.asl.component.common.error_name.error_equals_decl import ErrorEqualsDecl
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import (
        StatesErrorNameType,
    )

    original = ErrorEqualsDecl._eval_body
    uncatchable = [
        StatesErrorName(typ=StatesErrorNameType.StatesStatesDataLimitExceeded),
        StatesErrorName(typ=StatesErrorNameType.StatesRuntime),
    ]
    wildcard = StatesErrorName(typ=StatesErrorNameType.StatesALL)

    def _eval_body(self: Any, env: Any) -> None:
        error_name = env.stack[-1]
        if wildcard in self.error_names and error_name in uncatchable:
            env.stack.pop()
            env.stack.append(False)
            return
        original(self, env)

    return [(ErrorEqualsDecl, "_eval_body", _eval_body)]


def integrations_call_port_5000(patches: MotoPatches) -> list[Replacement]:
    """Integrations moto runs through boto3 call ``http://localhost:$MOTO_PORT``, default 5000.

    Verified on moto 5.2.1: ``boto_client_for`` (``stepfunctions/parser/asl/utils/boto_client.py``) targets
    ``localhost:{moto.settings.moto_server_port()}``, i.e. ``$MOTO_PORT`` or ``"5000"``, whenever the in-process
    mock is off (always, in server mode). ``moto.server.main`` sets ``MOTO_PORT``; ``ThreadedMotoServer`` does not.
    So ``sns:publish``, ``sqs:sendMessage``, ``aws-sdk:*``, ``events:putEvents``, ``states:startExecution``...
    states miss a server on a free port. We rebind that module's ``moto_server_port`` to ``patches.server_port``
    (falling back to moto's answer), instead of setting ``MOTO_PORT``, which every child process would inherit.
    Our ECS integration does not use it. Remove when ThreadedMotoServer sets the port itself.

    Evidence: the row of this name in ``MOTO_NOTES.md#patched-in-the-execution-engine-moto_patchespy``.
    """
    from moto.stepfunctions.parser.asl.utils import boto_client

    original = getattr(boto_client, "moto_server_port")  # noqa: B009 - not re-exported for mypy

    def moto_server_port() -> str:
        return str(patches.server_port) if patches.server_port is not None else original()

    return [(boto_client, "moto_server_port", moto_server_port)]


def multipart_upload_notifies_twice(patches: MotoPatches) -> list[Replacement]:
    """A multipart upload sends two "object created" events.

    Verified on moto 5.2.1: ``S3Backend.complete_multipart_upload`` (``s3/models.py``) stores the object with
    ``put_object``, which sends ``ObjectCreated:Put``, then sends ``ObjectCreated:CompleteMultipartUpload`` itself;
    AWS sends only the second. Every file above boto3's multipart threshold (16 MiB for our uploads) was validated
    and transformed twice on the embedded stack (harmless for the KPIs, a file id being its ETag, but twice the work,
    and the two transforms raced to archive it). The replacement stores the object without a notification and
    keeps the rest of moto's steps. Remove when moto sends one event.

    Evidence: the row of this name in ``MOTO_NOTES.md#patched-in-the-execution-engine-moto_patchespy``.
    """
    from moto.s3 import notifications
    from moto.s3.models import FakeKey, S3Backend

    def complete_multipart_upload(self: S3Backend, bucket_name: str, multipart_id: str, body: Any) -> FakeKey | None:
        bucket = self.get_bucket(bucket_name)
        multipart = bucket.multiparts[multipart_id]
        value, etag, checksum_details = multipart.complete(body)
        if value is None:
            return None
        del bucket.multiparts[multipart_id]
        key = self.put_object(
            bucket_name, multipart.key_name, value, storage=multipart.storage, etag=etag, multipart=multipart,
            encryption=multipart.sse_encryption, kms_key_id=multipart.kms_key_id, disable_notification=True,
        )  # fmt: skip
        key.set_metadata(multipart.metadata)
        if checksum_details:
            key.checksum_algorithm = multipart.metadata.get("x-amz-checksum-algorithm")
            key.checksum_type, key.checksum_value, key.checksum_parts = checksum_details
        self.put_object_tagging(key, multipart.tags)
        self.put_object_acl(bucket_name=bucket_name, key_name=key.name, acl=multipart.acl, disable_notification=True)
        notifications.send_event(
            self.account_id,
            notifications.S3NotificationEvent.OBJECT_CREATED_COMPLETE_MULTIPART_UPLOAD_EVENT,
            bucket,
            bucket.keys.get(multipart.key_name),
        )
        return key

    return [(S3Backend, "complete_multipart_upload", complete_multipart_upload)]


#: Every patch, in installation order; each function's name is the gap's name in ``MOTO_NOTES.md``.
PATCHES: tuple[Patch, ...] = (
    ecs_run_task_cannot_run,
    start_execution_fails_after_first,
    unnamed_executions_collide,
    indexed_json_path_returns_list,
    send_task_failure_drops_cause,
    nested_states_error_becomes_runtime,
    states_all_catches_uncatchable,
    integrations_call_port_5000,
    multipart_upload_notifies_twice,
)
