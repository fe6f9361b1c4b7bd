"""The merge's task steps, under the merge lock (an item of the ledger table on AWS; a file lock locally).

=================  ===============================================================================================
``merge``          apply the files committed since the last merge and publish what moved (with ``--from``/``--to``,
                   also republish and reconcile that range); a merge that finds the lock taken hands its work over.
                   A first load above ``SHOPKPI_FANOUT_ROWS`` is only planned (:mod:`processor.fanout`): the answer
                   is ``fanout``, and the lock stays held for the parts.
``merge-part``     one part of a fanned-out first load, renewing the planning merge's lease.
``merge-finish``   the fan-out's final step: commit, publish, merge what was handed over, let go of the lock.
``merge-fallback`` after a failed part or final step: let go of the fan-out's lock and merge as one task.
=================  ===============================================================================================
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from processor import fanout
from processor.errors import ConfigError, LockBusy, StalePlan
from processor.log import context, get_logger
from processor.merge import Publication, Publisher, merge
from processor.model import CategoryKpi, MergeResult, OrderKpi
from processor.pipeline import merge_local
from processor.settings import Settings
from processor.state import current_kpis, load_head
from processor.store import LocalStore
from processor.workspace import Workspace, scratch_dir

if TYPE_CHECKING:
    from processor.aws.dynamo import KpiTables, MergeLock

log = get_logger("task")


def run_merge(settings: Settings, ws: Workspace, force: tuple[str, str] | None) -> dict[str, Any]:
    """Merge what was committed since the last merge: into the KPI tables under the merge lock, or (a local
    workspace, which has no tables) under the staging directory's file lock, answering the KPIs it now holds."""
    if ws.kpis is None or ws.ledger is None:
        if not isinstance(ws.staging, LocalStore):
            raise ConfigError("SHOPKPI_LEDGER_TABLE, SHOPKPI_ORDER_TABLE and SHOPKPI_CATEGORY_TABLE must be set")
        with scratch_dir(settings, "merge") as scratch:
            result = merge_local(ws.staging, settings, scratch, force)
        daily, category = current_kpis(ws.staging)
        return {**msgspec.structs.asdict(result), "kpis": _kpis(daily, category)}
    lock = _merge_lock(ws)
    owner = f"{settings.execution_id}/{uuid.uuid4().hex[:8]}"
    try:
        generation = lock.acquire(owner, settings.lock_ttl_s)
    except LockBusy:
        # Another merge runs. A plain merge (not a reprocess, whose dates are its own) hands its work over: its files
        # are committed, and the running merge merges again before it lets go of the lock. So a burst of executions
        # does not queue on the lock (and fail once its retries run out) for work one merge does. Never to an
        # attempt of this same execution: that is this state's earlier attempt, which timed out and is stopping
        # (it lets go of the lock as it stops), so wait for the lock (LockBusy is retried) and merge here.
        running = lock.holder()
        own = running is not None and running.owner.split("/", 1)[0] == settings.execution_id
        holder = lock.hand_over(owner) if force is None and not own else None
        if holder is None:
            raise
        log.info("merge.handed_over", holder=holder)
        return {"handed_over_to": holder}
    started = datetime.now(UTC).isoformat()
    # The lease is renewed with every heartbeat, so a long merge keeps it; a merge that lost it stops before its
    # next write (fence) and never moves the head.
    ws.lease = lambda: lock.renew(owner, generation, settings.lock_ttl_s)
    ws.on_abandon = lambda: lock.release(owner, generation)
    keep_lock = False
    try:
        if force is None:
            with scratch_dir(settings, "merge") as scratch:
                plan = fanout.plan(
                    ws.staging,
                    generation=generation,
                    scratch=scratch,
                    buckets=settings.buckets,
                    parts=settings.merge_parts,
                    min_rows=settings.fanout_rows,
                    rows_per_pass=settings.merge_rows,
                    owner=owner,
                    lease=generation,
                    started=started,
                )
            if plan is not None:  # the parts and the final step work under this lock, which the final step releases
                keep_lock = True
                return {"fanout": {"plan": plan.key, "parts": list(range(len(plan.parts))), "owner": owner}}
        result, rounds = _merge_rounds(settings, ws, ws.kpis, lock, owner, generation, force)
        summary = {**msgspec.structs.asdict(result), "rounds": rounds}
        ws.ledger.record_run(settings.execution_id, "merged", started, datetime.now(UTC).isoformat(), summary)
        return summary
    finally:
        ws.lease = ws.on_abandon = None
        if not keep_lock:
            lock.release(owner, generation)


def _fanout_lock(settings: Settings, ws: Workspace, plan_key: str) -> tuple[MergeLock, fanout.MergePlan]:
    """The merge lock a fanned-out merge's planning task took, and its plan; the lease is renewed with every
    heartbeat of this task too. Stops (StaleWriter) when the lease was lost: another merge may be running."""
    if ws.ledger is None or ws.kpis is None:
        raise ConfigError("merge-part and merge-finish run on AWS (locally, shopkpi process runs parts in threads)")
    lock = _merge_lock(ws)
    plan = fanout.load_plan(ws.staging, plan_key)
    lock.check(plan.owner, plan.lease)
    ws.lease = lambda: lock.renew(plan.owner, plan.lease, settings.lock_ttl_s)
    return lock, plan


def merge_part(task: fanout.PartTask, settings: Settings, ws: Workspace) -> dict[str, Any]:
    """One part of a fanned-out first load (processor.fanout)."""
    lock, plan = _fanout_lock(settings, ws, task.plan)
    with context(part=task.part), scratch_dir(settings, "merge") as scratch:
        done = fanout.run_part(ws.staging, plan, task.part, scratch, fence=lambda: lock.check(plan.owner, plan.lease))
    return {"part": task.part, "rows": done.rows, "groups": done.groups, "seconds": done.seconds}


def merge_finish(plan_key: str, settings: Settings, ws: Workspace) -> dict[str, Any]:
    """The final step of a fanned-out first load: commit, publish, then merge again what was handed over
    meanwhile, and let go of the lock."""
    generation = fanout.plan_generation(plan_key)
    if load_head(ws.staging).generation >= generation:  # a retry of a final step that committed
        return {"generation": generation, "already_merged": True}
    lock, plan = _fanout_lock(settings, ws, plan_key)
    assert ws.kpis is not None and ws.ledger is not None
    started = plan.started or datetime.now(UTC).isoformat()  # the run is the whole fan-out: plan, parts, this
    ws.on_abandon = lambda: lock.release(plan.owner, plan.lease)
    fence, publish = _publisher(settings, ws.kpis, lock, plan.owner, plan.lease)
    try:
        with context(stage="merge"), scratch_dir(settings, "merge") as scratch:
            result, _, _ = fanout.finish(
                ws.staging, plan, scratch, publish=publish, fence=fence, orphan_grace_s=settings.orphan_grace_s
            )
        rounds = 1
        if not lock.release(plan.owner, plan.lease, unless_pending=True) and lock.take_pending(plan.owner, plan.lease):
            result, more = _merge_rounds(settings, ws, ws.kpis, lock, plan.owner, plan.lease, None)
            rounds += more
        summary = {**msgspec.structs.asdict(result), "rounds": rounds, "parts": len(plan.parts)}
        ws.ledger.record_run(settings.execution_id, "merged", started, datetime.now(UTC).isoformat(), summary)
        return summary
    finally:
        ws.lease = ws.on_abandon = None
        lock.release(plan.owner, plan.lease)


def _merge_rounds(
    settings: Settings,
    ws: Workspace,
    tables: KpiTables,
    lock: MergeLock,
    owner: str,
    generation: int,
    force: tuple[str, str] | None,
) -> tuple[MergeResult, int]:
    """Merge and publish, again as long as another merge handed its files over meanwhile; (last result, rounds)."""
    fence, publish = _publisher(settings, tables, lock, owner, generation)
    rounds = 0
    while True:
        rounds += 1
        with context(stage="merge"), scratch_dir(settings, "merge") as scratch:
            result, _, _ = merge(
                ws.staging,
                generation=generation,
                scratch=scratch,
                publish=publish,
                force_dates=force if rounds == 1 else None,
                buckets=settings.buckets,
                orphan_grace_s=settings.orphan_grace_s,
                rows_per_pass=settings.merge_rows,
                fence=fence,
            )
        if lock.release(owner, generation, unless_pending=True) or not lock.take_pending(owner, generation):
            return result, rounds  # released (or lost: the fence stopped any write) -- else a merge handed over
        log.info("merge.again", round=rounds + 1)


def merge_fallback(plan_key: str, error: dict[str, Any] | None, settings: Settings, ws: Workspace) -> dict[str, Any]:
    """A part or the final step of a fan-out failed (``error``, as Step Functions caught it): let go of the lock the
    fan-out holds, if it still does, and merge as one task. Nothing of the fan-out was committed (a final step that
    committed answered, or is answered on its retry); the next merge sweeps its files."""
    if ws.ledger is None or ws.kpis is None:
        raise ConfigError("merge-fallback runs on AWS")
    log.warning("fanout.failed", plan=plan_key, error=error, message="merging as one task instead")
    try:
        plan = fanout.load_plan(ws.staging, plan_key)
    except StalePlan:
        plan = None  # swept: another merge took over after the lease ran out; merging again finds what is left
    if plan is not None:
        _merge_lock(ws).release(plan.owner, plan.lease)
    result = run_merge(dataclasses.replace(settings, merge_parts=1), ws, None)
    return {**result, "fanout_failed": error or {}}


def _merge_lock(ws: Workspace) -> MergeLock:
    """The merge lock: an item of the ledger table."""
    from processor.aws.dynamo import MergeLock

    assert ws.ledger is not None
    return MergeLock(ws.ledger.client, ws.ledger.table)


def _publisher(
    settings: Settings, tables: KpiTables, lock: MergeLock, owner: str, generation: int
) -> tuple[Callable[[], None], Publisher]:
    """The fence (raises once the lease is lost) and the publisher of a merge holding the lock."""
    computed_at = datetime.now(UTC).isoformat()

    def fence() -> None:
        lock.check(owner, generation)

    def publish(pub: Publication, gen: int) -> int:
        fence()
        stats = tables.publish(
            pub.daily,
            pub.category,
            gen,
            computed_at,
            settings.execution_id,
            fence=fence,
            remove_daily=pub.gone_daily,
            remove_category=pub.gone_category,
            reconcile=pub.reconcile,
        )
        return int(stats.written + stats.removed)

    return fence, publish


def _kpis(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi]) -> dict[str, Any]:
    return {"daily": [k.public() for k in daily], "category": [k.public() for k in category]}
