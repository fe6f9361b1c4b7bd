"""Every workaround that lets the unchanged ASL definition execute in moto's server mode, in one place.

Verified against moto 5.2.1 only (:data:`MOTO_VERSION`; :func:`install` refuses any other version, because each
patch reaches into moto internals that move between releases). ``MOTO_NOTES.md`` beside this file holds the
evidence behind each patch and what the ASL must avoid because moto cannot execute it.

The patches act on moto's in-process objects, so moto must run in *this* process: ``ThreadedMotoServer``, or a
wrapper that calls :func:`install` and then ``moto.server.main()``. A separate ``moto_server`` process cannot be
patched from outside. Usage::

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    enable_execution()                  # the setting, see its docstring; not a patch
    install(runner, server_port=port)   # runner(parameters) starts one ECS task, see ecs_runner

Patches, each documented in its function (the gap, the evidence in moto, how to remove it):

==================================  ===============================================================================
``_patch_ecs_integration``          gap (a): ``ecs:runTask[.sync|.waitForTaskToken]`` calls ``runner(parameters)``;
                                    each Retry attempt of a ``.waitForTaskToken`` task gets a fresh token
``_patch_execution_snapshot``       the second StartExecution in a region no longer fails with a 500 (moto #10077)
``_patch_unnamed_executions``       gap (g): StartExecution without a name gets a unique name, as on AWS
``_patch_json_path``                gap (f): ``$.a[0].b`` selects the value, not a one-element list
``_patch_task_failure_cause``       SendTaskFailure keeps its ``cause`` (moto drops it)
``_patch_nested_states_errors``     a ``States.*`` error leaving a Map iteration or Parallel branch keeps its name
``_patch_integration_port``         gap (e): moto's own integrations (sns, sqs, aws-sdk...) call *this* server
==================================  ===============================================================================
"""

from __future__ import annotations

import copy
import json
import re
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any, cast

__all__ = ["MOTO_VERSION", "Runner", "enable_execution", "install", "installed", "uninstall"]

#: The only moto version these patches were verified against.
MOTO_VERSION = "5.2.1"

#: Starts one ECS task from the fully evaluated ``Parameters`` of an ``ecs:runTask`` state (Step Functions casing:
#: ``Cluster``, ``TaskDefinition``, ``Overrides.ContainerOverrides[].Command/Environment``). It must not block: it
#: is called on the execution's worker thread. Its return value is ignored, except by ``ecs:runTask.sync``, which
#: polls it like a :class:`subprocess.Popen` (``poll()`` -> exit code or ``None``) until the task has stopped.
Runner = Callable[[dict[str, Any]], object]

_lock = threading.Lock()
_runner: Runner | None = None
_server_port: int | None = None
_installed: list[str] = []
# What each patch replaced, (owner, attribute, original or _MISSING), in patching order, for uninstall().
_MISSING = object()
_originals: list[tuple[Any, str, Any]] = []
# ecs:runTask.sync: what the runner returned, by the task ARN we made up, until the sync resolver takes it.
_handles: dict[str, object] = {}


def installed() -> list[str]:
    """Names of the patches installed so far (in order)."""
    return list(_installed)


def _set(owner: Any, name: str, value: Any) -> None:
    """``setattr`` that remembers the original for :func:`uninstall`."""
    _originals.append((owner, name, vars(owner).get(name, _MISSING)))
    setattr(owner, name, value)


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


def install(runner: Runner, *, server_port: int | None = None) -> None:
    """Install every patch (idempotent: a second call only replaces ``runner`` and ``server_port``).

    ``server_port`` is the port of the in-process moto server; moto's own integrations (sns, sqs, aws-sdk) call it
    through boto3, and without it they call port 5000 (see :func:`_patch_integration_port`).
    """
    import moto

    if moto.__version__ != MOTO_VERSION:
        raise RuntimeError(
            f"orchestration.local.moto_patches was verified against moto {MOTO_VERSION} only, found "
            f"moto {moto.__version__}: re-verify every patch (see MOTO_NOTES.md) before changing the pin"
        )
    global _runner, _server_port
    with _lock:
        _runner = runner
        if server_port is not None:
            _server_port = server_port
        for patch in (
            _patch_ecs_integration,
            _patch_execution_snapshot,
            _patch_unnamed_executions,
            _patch_json_path,
            _patch_task_failure_cause,
            _patch_nested_states_errors,
            _patch_states_all,
            _patch_integration_port,
        ):
            if patch.__name__ not in _installed:
                patch()
                _installed.append(patch.__name__)


def uninstall() -> None:
    """Restore everything :func:`install` replaced (for tests sharing the process with other moto users)."""
    global _runner, _server_port
    with _lock:
        for owner, name, original in reversed(_originals):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        _originals.clear()
        _installed.clear()
        _handles.clear()
        _runner = None
        _server_port = None


def _current_runner() -> Runner:
    runner = _runner
    if runner is None:  # pragma: no cover - install() sets it before any patch can run
        raise RuntimeError("moto_patches.install(runner) was not called")
    return runner


# --- (a) ecs:runTask ------------------------------------------------------------------------------------------
def _patch_ecs_integration() -> None:
    """Gap (a): moto's ``ecs:runTask`` integration cannot run; replace it with one that calls the runner.

    Verified on moto 5.2.1: ``StateTaskServiceEcs._eval_service_task``
    (``stepfunctions/parser/asl/component/state/exec/state_task/service/state_task_service_ecs.py``) passes the
    Step Functions-cased Parameters straight to boto3 because ``StateTaskService._normalise_parameters`` is a
    no-op stub, so botocore's serializer fails with ``KeyError: 'Cluster'`` and the state fails with
    ``States.Runtime``; ``_normalise_response`` is a stub too (``response["Tasks"]`` would fail next), and moto's
    ECS would only record the task anyway, never run it.

    The only extension point is the service-integration factory: ``state_task_factory.state_task_for`` calls the
    module-global ``state_task_service_for`` at parse time (once per execution), so we rebind that name to return
    :class:`_LocalEcsTask` for ``ecs``. Everything else (TaskScheduled/TaskStarted/TaskSubmitted events, the
    wait for the task token with TimeoutSeconds/HeartbeatSeconds, Retry, Catch, ResultPath) stays moto's.

    The subclass also gives each Retry attempt of a ``.waitForTaskToken`` task a fresh token: moto 5.2.1 makes the
    token once per state entry (``StateTaskServiceCallback._eval_body``), so attempt 2 waited on attempt 1's
    ``CallbackEndpoint``, whose event is already set, and failed instantly with attempt 1's error without waiting
    for the new task. AWS issues a new token per attempt.

    Remove when moto implements ``_normalise_parameters`` for ECS *and* runs tasks (it will not: use a real
    container runtime then), or drop only the token refresh once moto makes a token per attempt.
    """
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import state_task_factory

    original = getattr(state_task_factory, "state_task_service_for")  # noqa: B009 - not re-exported for mypy
    local_ecs = _local_ecs_task_class()

    def state_task_service_for(service_name: str) -> Any:
        if service_name == "ecs":
            return local_ecs()
        return original(service_name)

    _set(state_task_factory, "state_task_service_for", state_task_service_for)


def _local_ecs_task_class() -> type[Any]:
    # Imported here, not at module level: install() checks the moto version before touching its internals.
    from botocore.exceptions import ClientError
    from moto.stepfunctions.parser.api import HistoryEventType, TaskFailedEventDetails
    from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import (
        FailureEvent,
        FailureEventException,
    )
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import (
        StatesErrorNameType,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import ResourceCondition
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_ecs import (
        StateTaskServiceEcs,
    )
    from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails

    class _LocalEcsTask(StateTaskServiceEcs):
        """``ecs:runTask`` whose task is started by the runner instead of moto's ECS."""

        def _task_failed(self, env: Any, error: str, cause: str, *, states_error: bool = False) -> Exception:
            name = StatesErrorName(typ=StatesErrorNameType.StatesTaskFailed) if states_error else None
            details = TaskFailedEventDetails(
                resourceType=self._get_sfn_resource_type(), resource=self._get_sfn_resource(), error=error, cause=cause
            )
            return FailureEventException(
                failure_event=FailureEvent(
                    env=env,
                    error_name=name or CustomErrorName(error_name=error),
                    event_type=HistoryEventType.TaskFailed,
                    # EventDetails is a TypedDict with one key set at a time, as moto itself builds it.
                    event_details=cast(EventDetails, {"taskFailedEventDetails": details}),
                )
            )

        def _eval_execution(self, env: Any) -> None:
            # Each attempt runs in a fresh frame whose State.RetryCount was copied from the state; attempt 1 uses
            # the token _eval_body made, later attempts get their own (see _patch_ecs_integration).
            context = env.states.context_object
            if (
                self.resource.condition == ResourceCondition.WaitForTaskToken
                and context.context_object_data["State"]["RetryCount"] > 0
            ):
                env.callback_pool_manager.add(context.update_task_token())
            super()._eval_execution(env)

        def _eval_service_task(
            self, env: Any, resource_runtime_part: Any, normalised_parameters: dict[str, Any], state_credentials: Any
        ) -> None:
            # normalised_parameters is a deep copy of the evaluated Parameters ($$.Task.Token already resolved),
            # still in Step Functions casing: the stub normaliser did not touch it.
            params = copy.deepcopy(normalised_parameters)
            region, account = resource_runtime_part.region, resource_runtime_part.account
            cluster = str(params.get("Cluster") or "default")
            cluster_arn = cluster if cluster.startswith("arn:") else f"arn:aws:ecs:{region}:{account}:cluster/{cluster}"
            task_arn = f"arn:aws:ecs:{region}:{account}:task/{cluster_arn.rsplit('/', 1)[-1]}/{uuid.uuid4().hex}"
            try:
                handle = _current_runner()(params)
            except ClientError as e:
                # What AWS reports for a RunTask the ECS API rejected (unknown task definition, cluster...).
                code = e.response.get("Error", {}).get("Code", "AmazonECSException")
                raise self._task_failed(env, f"ECS.{code}", str(e)) from e
            except Exception as e:
                raise self._task_failed(env, "States.TaskFailed", f"{type(e).__name__}: {e}", states_error=True) from e
            if self.resource.condition == ResourceCondition.Sync:
                _handles[task_arn] = handle
            # The shape of AWS's output (RunTask's response, normalised to Step Functions casing); with
            # .waitForTaskToken it only shows in the TaskSubmitted event, the token's output replaces it.
            env.stack.append(
                {
                    "Tasks": [
                        {
                            "TaskArn": task_arn,
                            "ClusterArn": cluster_arn,
                            "TaskDefinitionArn": params.get("TaskDefinition"),
                            "LastStatus": "PROVISIONING",
                            "DesiredStatus": "RUNNING",
                            "LaunchType": params.get("LaunchType", "FARGATE"),
                            "Overrides": params.get("Overrides", {}),
                        }
                    ],
                    "Failures": [],
                }
            )

        def _build_sync_resolver(
            self, env: Any, resource_runtime_part: Any, normalised_parameters: dict[str, Any], state_credentials: Any
        ) -> Callable[[], Any]:
            task: dict[str, Any] = env.stack.pop()["Tasks"][0]
            handle = _handles.pop(task["TaskArn"], None)
            poll = getattr(handle, "poll", None)

            def resolve() -> dict[str, Any] | None:
                code = poll() if callable(poll) else 0
                if code is None:
                    return None
                if code != 0:
                    # Our choice, not checked against AWS (which reports the stopped task): a non-zero exit
                    # fails the state, so a crashed task cannot pass for a successful one locally.
                    raise self._task_failed(
                        env,
                        "States.TaskFailed",
                        f"Essential container in task exited (exit code {code})",
                        states_error=True,
                    )
                return {
                    **task,
                    "LastStatus": "STOPPED",
                    "StopCode": "EssentialContainerExited",
                    "Containers": [{"ExitCode": code}],
                }

            return resolve

    return _LocalEcsTask


# --- moto #10077: second StartExecution ----------------------------------------------------------------------
def _patch_execution_snapshot() -> None:
    """Not in the colleague's list: after one execution, every StartExecution in the region fails with a 500.

    Verified on moto 5.2.1: ``StepFunctionsParserBackend.start_execution`` (``stepfunctions/parser/models.py``)
    snapshots the machine with ``copy.deepcopy(state_machine)``. The machine holds its ``executions`` (each with a
    live ``Environment`` holding an ``RLock``) and ``backend`` (every other machine and its executions), so the copy
    raises ``TypeError: cannot pickle '_thread.RLock' object`` once any execution exists. Reported upstream as
    getmoto/moto#10077 (fixed by #10093, after 5.2.1).

    The snapshot only needs the definition and settings, so ``StateMachineInstance.__deepcopy__`` now copies
    everything except ``executions`` (empty in the copy) and ``backend`` (shared). Remove once the pinned moto
    contains #10093.
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

    _set(StateMachineInstance, "__deepcopy__", __deepcopy__)


# --- (g) executions without a name ---------------------------------------------------------------------------
def _patch_unnamed_executions() -> None:
    """Gap (g): StartExecution without ``name`` gets the name ``None``, so the next one collides.

    Verified on moto 5.2.1: ``StepFunctionsParserBackend.start_execution`` uses ``name`` as given (the non-executing
    backend draws a uuid, the parser backend does not): the ARN ends in ``:None``, and a second unnamed start of the
    same machine either returns the first execution (same input, still running: the idempotency rule of
    ``StateMachine._handle_name_input_idempotency``) or fails with ``ExecutionAlreadyExists``. EventBridge-style
    starts pass ``name=""`` and hit the same path. We draw a uuid4 name, as AWS does. Remove when the parser
    backend generates names itself.
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

    _set(StepFunctionsParserBackend, "start_execution", start_execution)


# --- (f) JSONPath with an index in the middle ----------------------------------------------------------------
# A definite path: only names and literal indices, no wildcard, slice, filter, union or recursive descent.
_DEFINITE_PATH = re.compile(r"^\$(?:\.[^.\[\]*,?@()]+|\[\d+\]|\['[^']*'\])*$")


def _patch_json_path() -> None:
    """Gap (f): ``$.a[0].b`` returns ``[b]`` instead of ``b``.

    Verified on moto 5.2.1: ``extract_json`` (``stepfunctions/parser/asl/utils/json_path.py``) wraps the match in a
    list whenever the matched node's parent was reached by an index (``matches[0].context.path`` is an ``Index``,
    a workaround for moto issue #7825 about ``$.a[*].b``), and unwraps only paths that *end* in ``[n]``. AWS
    returns the single value for every definite path. We answer definite paths (names and literal indices only)
    with their one match and leave every other path to moto's function.

    ``extract_json`` is imported by name into many modules (``string_expression``, ``argument``, ``states``, the
    Choice operators...), so the module attribute is rebound (for later imports) and so is every copy already
    imported. Remove when moto returns the value for definite paths.
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

    for name, module in list(sys.modules.items()):
        if name.startswith("moto.stepfunctions.parser.") and vars(module).get("extract_json") is original:
            _set(module, "extract_json", extract_json)


# --- SendTaskFailure's cause ---------------------------------------------------------------------------------
def _patch_task_failure_cause() -> None:
    """Not in the colleague's list: SendTaskFailure drops its ``cause``.

    Verified on moto 5.2.1: ``StepFunctionResponse.send_task_failure`` (``stepfunctions/responses.py``) reads only
    ``taskToken`` and ``error`` and calls the backend without ``cause``, although
    ``StepFunctionsParserBackend.send_task_failure`` accepts it: the state's error output is
    ``{"Error": "<code>", "Cause": null}`` and the TaskFailed event has no cause, so the message our tasks send (and
    the ASL forwards to SNS and the dead-letter queue) is lost. We pass it through when the executing backend is
    active (the non-executing backend's method takes no cause). Remove when the response handler passes ``cause``.
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

    _set(StepFunctionResponse, "send_task_failure", send_task_failure)


# --- States.* errors leaving a Map iteration or a Parallel branch --------------------------------------------
def _patch_nested_states_errors() -> None:
    """Not in the colleague's list: an uncaught ``States.*`` error inside a Map or Parallel becomes States.Runtime.

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

    for module in (iteration_worker, branches_decl):
        _set(module, "CustomErrorName", error_name_for)


# --- States.ALL as AWS reads it ------------------------------------------------------------------------------
def _patch_states_all() -> None:
    """Stricter than moto: ``States.ALL`` does not match ``States.DataLimitExceeded`` nor ``States.Runtime``.

    Verified on moto 5.2.1: ``ErrorEqualsDecl._eval_body`` (``component/common/error_name/error_equals_decl.py``)
    matches every error when the list holds ``States.ALL``. AWS documents the two exceptions: a state whose output
    passes 256 KiB, or whose paths do not resolve, is not caught by a ``States.ALL`` Catch or Retry (only a rule
    that names ``States.DataLimitExceeded`` catches the first; nothing catches the second). Without this, a failure
    path that works here would not run on AWS. Keep it: it makes the embedded stack as strict as AWS.
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

    _set(ErrorEqualsDecl, "_eval_body", _eval_body)


# --- (e) port of moto's own integrations ---------------------------------------------------------------------
def _patch_integration_port() -> None:
    """Gap (e): integrations moto runs through boto3 call ``http://localhost:$MOTO_PORT``, default 5000.

    Verified on moto 5.2.1: ``boto_client_for`` (``stepfunctions/parser/asl/utils/boto_client.py``) targets
    ``localhost:{moto.settings.moto_server_port()}``, i.e. ``$MOTO_PORT`` or ``"5000"``, whenever the in-process
    mock is off (always, in server mode). ``moto.server.main`` sets ``MOTO_PORT``; ``ThreadedMotoServer`` does not.
    So ``sns:publish``, ``sqs:sendMessage``, ``aws-sdk:*``, ``events:putEvents``, ``states:startExecution``...
    states miss a server on a free port. We rebind that module's ``moto_server_port`` to the ``server_port`` given
    to :func:`install` (falling back to moto's answer), instead of setting ``MOTO_PORT``, which every child process
    would inherit. Our ECS integration does not use it. Remove when ThreadedMotoServer sets the port itself.
    """
    from moto.stepfunctions.parser.asl.utils import boto_client

    original = getattr(boto_client, "moto_server_port")  # noqa: B009 - not re-exported for mypy

    def moto_server_port() -> str:
        return str(_server_port) if _server_port is not None else original()

    _set(boto_client, "moto_server_port", moto_server_port)
