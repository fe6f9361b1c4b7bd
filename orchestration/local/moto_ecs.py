"""``ecs:runTask`` for moto's Step Functions engine: the task is started by a runner instead of moto's ECS.

This is the body of the patch :func:`orchestration.local.moto_patches.ecs_run_task_cannot_run` (evidence in
``MOTO_NOTES.md``, section "Patched in the execution engine"). It imports moto 5.2.1 internals at module level, so
only :class:`~orchestration.local.moto_patches.MotoPatches` imports it, after checking the moto version.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from typing import Any, cast

from botocore.exceptions import ClientError
from moto.stepfunctions.parser.api import HistoryEventType, TaskFailedEventDetails
from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName
from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import (
    FailureEvent,
    FailureEventException,
)
from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import StatesErrorNameType
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import ResourceCondition
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_ecs import (
    StateTaskServiceEcs,
)
from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails

from orchestration.local.moto_patches import Runner

__all__ = ["LocalEcsTask"]


class LocalEcsTask(StateTaskServiceEcs):
    """``ecs:runTask[.sync|.waitForTaskToken]`` whose task is started by ``runner``.

    Everything else (TaskScheduled/TaskStarted/TaskSubmitted events, the wait for the task token with
    TimeoutSeconds/HeartbeatSeconds, Retry, Catch, ResultPath) stays moto's. ``sync_handles`` carries what the
    runner returned for a ``.sync`` task, by the task ARN made up here, until the sync resolver takes it; it belongs
    to the :class:`~orchestration.local.moto_patches.MotoPatches` that installed this integration.
    """

    def __init__(self, runner: Runner, sync_handles: dict[str, object]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # moto is untyped
        self._runner = runner
        self._sync_handles = sync_handles

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
        # moto makes the token once per state entry (StateTaskServiceCallback._eval_body), so a Retry attempt would
        # wait on the previous attempt's already-set CallbackEndpoint. Each attempt runs in a fresh frame whose
        # State.RetryCount was copied from the state: attempt 1 uses moto's token, later ones get their own, as on AWS.
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
        # normalised_parameters is a deep copy of the evaluated Parameters ($$.Task.Token already resolved), still
        # in Step Functions casing: moto's normaliser is a stub.
        params = copy.deepcopy(normalised_parameters)
        region, account = resource_runtime_part.region, resource_runtime_part.account
        cluster = str(params.get("Cluster") or "default")
        cluster_arn = cluster if cluster.startswith("arn:") else f"arn:aws:ecs:{region}:{account}:cluster/{cluster}"
        task_arn = f"arn:aws:ecs:{region}:{account}:task/{cluster_arn.rsplit('/', 1)[-1]}/{uuid.uuid4().hex}"
        handle = self._start(env, params)
        if self.resource.condition == ResourceCondition.Sync:
            self._sync_handles[task_arn] = handle
        # The shape of AWS's output (RunTask's response, normalised to Step Functions casing); with
        # .waitForTaskToken it only shows in the TaskSubmitted event, the token's output replaces it.
        task = {
            "TaskArn": task_arn,
            "ClusterArn": cluster_arn,
            "TaskDefinitionArn": params.get("TaskDefinition"),
            "LastStatus": "PROVISIONING",
            "DesiredStatus": "RUNNING",
            "LaunchType": params.get("LaunchType", "FARGATE"),
            "Overrides": params.get("Overrides", {}),
        }
        env.stack.append({"Tasks": [task], "Failures": []})

    def _start(self, env: Any, params: dict[str, Any]) -> object:
        """The runner's handle for the started task; its failure as the state's error."""
        try:
            return self._runner(params)
        except ClientError as e:
            # What AWS reports for a RunTask the ECS API rejected (unknown task definition, cluster...).
            code = e.response.get("Error", {}).get("Code", "AmazonECSException")
            raise self._task_failed(env, f"ECS.{code}", str(e)) from e
        except Exception as e:
            raise self._task_failed(env, "States.TaskFailed", f"{type(e).__name__}: {e}", states_error=True) from e

    def _build_sync_resolver(
        self, env: Any, resource_runtime_part: Any, normalised_parameters: dict[str, Any], state_credentials: Any
    ) -> Callable[[], Any]:
        task: dict[str, Any] = env.stack.pop()["Tasks"][0]
        handle = self._sync_handles.pop(task["TaskArn"], None)
        poll = getattr(handle, "poll", None)

        def resolve() -> dict[str, Any] | None:
            code = poll() if callable(poll) else 0
            if code is None:
                return None
            if code != 0:
                # Our choice, not checked against AWS (which reports the stopped task): a non-zero exit fails the
                # state, so a crashed task cannot pass for a successful one locally.
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
