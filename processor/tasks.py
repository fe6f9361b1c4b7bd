"""The ECS task entry points (``shopkpi-task``): what runs inside the container, one command per workflow step.

=================  ===============================================================================================
``validate``       stream one landed file from S3 (or a local path), validate it, upload its staged segment, report
                   and rejected rows; record the outcome. Result: ``accepted`` or ``rejected`` (both exit 0: a bad
                   file is an expected outcome, not a task failure), or ``split`` for a file above
                   ``SHOPKPI_SPLIT_MB``, with the byte ranges the workflow validates in parallel.
``validate-part``  validate one byte range of a split file.
``combine``        the split file's one outcome, report and segment (its parts' staged files, as pieces).
``transform``      commit an accepted file's segment into the staging area (it becomes visible to merges) and move
                   the original to ``archive/``.
``quarantine``     move a rejected file's original to ``rejected/`` beside its report and rejected rows.
``merge`` ...      the merge and a fanned-out first load's steps: :mod:`processor.merge_task`.
=================  ===============================================================================================

Each command prints its result as one JSON line on stdout (``{"event": "task.result", ...}``) and, when the
``SHOPKPI_TASK_TOKEN`` environment variable holds a Step Functions task token, reports it with SendTaskSuccess or
SendTaskFailure (error = the project's error code). Exit codes: 0 done, 1 retryable error, 2 terminal error.

Each step is written once against a :class:`Workspace`: the landing area (:mod:`processor.landing`: the landing
bucket, or local files) and the staging area (:mod:`processor.store`), plus, on AWS, the ledger and the KPI tables.
The landing bucket's layout is in :mod:`processor.landing`; ``incoming/<dataset>/...`` is what the trigger watches,
``staging/`` holds the typed, deduplicated staging area (see :mod:`processor.stage`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import orjson

from processor import fanout, split
from processor.combine import PartOutput, StagedPiece, combine
from processor.errors import ConfigError, InternalError, NotFound, ShopKpiError
from processor.log import configure, context, get_logger
from processor.merge_task import merge_fallback, merge_finish, merge_part, run_merge
from processor.model import ValidationResult
from processor.pipeline import segment_for, validate_stream
from processor.schema import detect_dataset
from processor.settings import Settings
from processor.stage import Piece, Segment, commit_manifest, file_id_for, is_committed, segment_key
from processor.workspace import Workspace, scratch_dir

if TYPE_CHECKING:
    from processor.aws.callback import Callback

log = get_logger("task")
T = TypeVar("T")


# --- validate ------------------------------------------------------------------------------------------------
class LandedEvent(msgspec.Struct, frozen=True):
    """One landed file as the workflow passes it to ``validate --event`` (the Pipe's input template): the key
    URL-encoded as S3 writes it in its events, the ETag when the event had one."""

    bucket: str
    key: str
    etag: str | None = None

    @property
    def source(self) -> str:
        from processor.aws.s3 import join_uri, key_from_event

        return join_uri(self.bucket, key_from_event(self.key))


def validate_event(event: LandedEvent, settings: Settings, ws: Workspace) -> dict[str, Any]:
    """Validate the file of a landing event. Its object may be gone because an earlier run of the same event (an
    at-least-once queue) archived or quarantined it: then there is nothing to do. Gone without a trace of that, the
    file is lost (a key that was never in the bucket): a failure, so the workflow alerts, never a silent skip."""
    source = event.source
    if not ws.landing.exists(source):
        if event.etag is not None and ws.landing.get_report(file_id_for(source, event.etag)) is not None:
            log.info("file.gone", source=source, message="already validated by an earlier delivery of its event")
            return {"source": source, "outcome": "skipped", "duplicate": True, "message": "source already processed"}
        raise NotFound(f"{source} does not exist and was never processed (event key {event.key!r})", source=source)
    return validate(source, settings, ws)


def validate(source: str, settings: Settings, ws: Workspace) -> dict[str, Any]:
    """Stream one file through validation; upload its staged segment (not yet committed), its report and its
    rejected rows; record the outcome in the ledger. A big file is only planned here: the answer is ``split``, with
    the byte ranges the workflow validates in parallel (``validate-part``) and then puts together (``combine``)."""
    file_id, arrival = ws.landing.identity(source)
    if is_committed(ws.staging, file_id):
        log.info("file.duplicate", file_id=file_id)
        return {"file_id": file_id, "source": source, "outcome": "accepted", "duplicate": True}
    planned = split.plan(ws.landing, source, settings)
    if planned is not None:
        header_end, cuts = planned
        parts = split.parts_of(header_end, cuts, ws.landing.size(source))
        log.info("file.split", file_id=file_id, parts=len(parts))
        plan = split.Split(
            file_id=file_id, source=source, arrival=arrival.astimezone(UTC).isoformat(), header_end=header_end,
            parts=parts,
        )  # fmt: skip
        return {"file_id": file_id, "source": source, "outcome": "split", "split": msgspec.to_builtins(plan)}
    with scratch_dir(settings, "validate") as tmp:
        # Streamed straight from S3 (gunzipped on the fly): the file never lands on disk, only its staged segment.
        with ws.landing.open(source) as stream:
            v = validate_stream(
                stream, source=source, file_id=file_id, arrival=arrival, settings=settings, work_dir=tmp
            )
        segment = None
        if v.output is not None:
            segment = (v.output.segment, segment_for(v, arrival))
        return _keep(ws, settings, v.result, v.report, segment, v.rejects_csv)


def _keep(
    ws: Workspace,
    settings: Settings,
    result: ValidationResult,
    report: dict[str, Any],
    segment: tuple[Path, Segment] | Segment | None,
    rejects: Path | None,
) -> dict[str, Any]:
    """Upload a file's staged segment (not yet committed; a segment of pieces is in place already), report and
    rejected rows; record its outcome."""
    report = dict(report)
    if isinstance(segment, tuple):
        ws.staging.put_file(segment[0], segment[1].key)
        segment = segment[1]
    if segment is not None:
        report["segment"] = msgspec.to_builtins(segment)
    report = ws.landing.put_report(result.file_id, report, rejects)
    if ws.ledger is not None:
        ws.ledger.record_file(result, settings.execution_id)
    return {k: report[k] for k in report if k != "samples"}


def validate_part(job: split.PartJob, settings: Settings, ws: Workspace) -> dict[str, Any]:
    """Validate one byte range of a split file (no invalid-row threshold: the combine step applies it to the
    whole file) and leave what it found in the staging store for the combine step."""
    file_id, _ = ws.landing.identity(job.source)
    if file_id != job.file_id:
        raise NotFound(f"{job.source} changed after it was split: its new version is validated on its own event")
    stream = split.PartStream(ws.landing, job.source, job.header_end, job.part)
    whole_file_rules_later = dataclasses.replace(settings, max_invalid_share=1.0)
    with scratch_dir(settings, "validate") as tmp, stream.open() as body:
        # Whole rows, not facts: any row of a part may repeat a key of an earlier part, and the combine step
        # reports such rows from what the part staged.
        v = validate_stream(
            body, source=job.source, file_id=file_id, arrival=datetime.fromisoformat(job.arrival),
            settings=whole_file_rules_later, work_dir=tmp, facts=False,
        )  # fmt: skip
        keys = {what: split.part_key(file_id, job.part.part, what) for what in ("parquet", "csv", "json")}
        if v.output is not None:
            ws.staging.put_file(v.output.segment, keys["parquet"])
        if v.rejects_csv is not None and v.rejects_csv.exists():
            ws.staging.put_file(v.rejects_csv, keys["csv"])
        kept = split.PartKept(
            report=v.report,
            newlines=stream.newlines,
            segment=keys["parquet"] if v.output is not None else None,
            rejects=keys["csv"] if v.rejects_csv is not None and v.rejects_csv.exists() else None,
        )
        ws.staging.put_bytes(keys["json"], msgspec.json.encode(kept))
    return {"file_id": file_id, "part": job.part.part, "rows": v.result.rows, "rejected_rows": v.result.rejected_rows}


def combine_parts(plan: split.Split, settings: Settings, ws: Workspace) -> dict[str, Any]:
    """The whole file's outcome from its parts' (see processor.combine); then as ``validate`` for a whole file.

    The file's report is the last thing written before the parts go, so a report found means the file was combined
    already: by an earlier attempt of this step, or by the execution of another delivery of the same object, which
    shares its parts. Then the answer is that report, and any part left behind is removed."""
    try:
        outputs = _part_outputs(plan, ws)
    except NotFound:
        outputs = None
    if outputs is None:
        done_before = ws.landing.get_report(plan.file_id)
        if done_before is None:
            raise InternalError(f"a part of {plan.source} left no result: its task did not finish")
        _remove_parts(plan, ws)
        return {k: done_before[k] for k in done_before if k != "samples"}
    with scratch_dir(settings, "validate") as tmp:
        done = combine(plan, outputs, detect_dataset(plan.source), settings.max_invalid_share, tmp)
        segment = None
        if done.pieces is not None and done.result.dataset is not None:
            arrival = datetime.fromisoformat(plan.arrival)
            segment = Segment(
                file_id=plan.file_id, dataset=done.result.dataset, source=done.result.source,
                arrival_us=int(arrival.timestamp() * 1_000_000), rows=done.result.valid_rows, buckets=done.buckets,
                key=segment_key(done.result.dataset, plan.file_id),
                pieces=_stage_pieces(plan, done.pieces, done.result.dataset, ws),
            )  # fmt: skip
        answer = _keep(ws, settings, done.result, done.report, segment, done.rejects)
    _remove_parts(plan, ws)  # their successors (segment, report, rejected rows) are written: now they can go
    return answer


def _stage_pieces(plan: split.Split, pieces: list[StagedPiece], dataset: str, ws: Workspace) -> list[Piece]:
    """The parts' staged rows copied where segments live, as they are (S3: a server-side copy, no byte passes
    through this task), with the lines each drops: the pieces of the file's segment, committed by transform."""
    staged = []
    base = segment_key(dataset, plan.file_id).removesuffix(".parquet")
    for piece in pieces:
        key = f"{base}/part-{piece.part:03d}.parquet"
        ws.staging.copy(split.part_key(plan.file_id, plan.parts[piece.part].part, "parquet"), key)
        dropped = None
        if piece.dropped is not None:
            dropped = f"{base}/part-{piece.part:03d}.dropped.parquet"
            ws.staging.put_file(piece.dropped, dropped)
        staged.append(Piece(key=key, shift=piece.shift, dropped=dropped))
    return staged


def _part_outputs(plan: split.Split, ws: Workspace) -> list[PartOutput] | None:
    """What each part left (its files fetched), or None when a part's result is missing."""
    outputs = []
    for part in plan.parts:
        data = ws.staging.get_bytes(split.part_key(plan.file_id, part.part, "json"))
        if data is None:
            return None
        kept = msgspec.json.decode(data, type=split.PartKept)
        outputs.append(
            PartOutput(
                report=kept.report,
                newlines=kept.newlines,
                segment=ws.staging.local_path(kept.segment) if kept.segment else None,
                rejects=ws.staging.local_path(kept.rejects) if kept.rejects else None,
            )
        )
    return outputs


def _remove_parts(plan: split.Split, ws: Workspace) -> None:
    for part in plan.parts:
        for what in ("parquet", "csv", "json"):
            ws.staging.delete(split.part_key(plan.file_id, part.part, what))


# --- transform / quarantine ----------------------------------------------------------------------------------
def _load_report(file_id: str, ws: Workspace) -> dict[str, Any]:
    report = ws.landing.get_report(file_id)
    if report is None:
        raise ConfigError(f"no validation report for {file_id}: run validate first")
    return report


def transform(file_id: str, ws: Workspace) -> dict[str, Any]:
    """Commit an accepted file's segment (merges see it from now on), then archive its original."""
    report = _load_report(file_id, ws)
    if report.get("outcome") != "accepted" or "segment" not in report:
        raise ConfigError(f"{file_id} was not accepted by validation; nothing to transform")
    seg = msgspec.convert(report["segment"], type=Segment)
    fresh = commit_manifest(ws.staging, seg)
    archived = ws.landing.archive(seg.source, report["arrival"])
    return {"file_id": file_id, "committed": fresh, "archived": archived, "buckets": len(seg.buckets)}


def quarantine(file_id: str, ws: Workspace) -> dict[str, Any]:
    """Move a rejected file's original beside its report and rejected rows (a local file stays where it is)."""
    report = _load_report(file_id, ws)
    if report.get("outcome") == "accepted":  # the workflow quarantines rejected files only; a person may mistype
        raise ConfigError(f"{file_id} was accepted by validation; nothing to quarantine (transform it instead)")
    return {"file_id": file_id, "quarantined": ws.landing.quarantine(file_id, report), "reason": report.get("reason")}


# --- command line --------------------------------------------------------------------------------------------
def _callback(ws: Workspace, settings: Settings) -> Callback | None:
    """The Step Functions callback of this task, when it was started with a task token."""
    token = os.environ.get("SHOPKPI_TASK_TOKEN")
    if not token:
        return None
    from processor.aws import make_clients
    from processor.aws.callback import Callback

    clients = ws.clients if ws.clients is not None else make_clients(settings)
    return Callback(clients.stepfunctions, token)


def _report_result(result: dict[str, Any] | None, error: ShopKpiError | None, callback: Callback | None) -> int:
    """Print the result line, send it to Step Functions; return the exit status.

    A result Step Functions did not take is a failure of the task, reported as such (its cause names why), so the
    state fails at once instead of waiting for a heartbeat timeout.
    """
    body = {
        "event": "task.result",
        "ok": error is None,
        **(result or {}),
        **({"error": error.to_dict()} if error else {}),
    }
    sys.stdout.buffer.write(orjson.dumps(body, default=str) + b"\n")
    sys.stdout.flush()
    status = 0 if error is None else 1 if error.retryable else 2
    if callback is None:
        return status
    try:
        if error is None:
            callback.succeed(result or {})
        else:
            callback.fail(error.code, error.message)
        return status
    except ShopKpiError as e:
        log.error("task.report_failed", code=e.code, message=e.message)
        if error is None:
            try:
                callback.fail(e.code, f"the task finished but its result was not accepted: {e.message}")
            except ShopKpiError as again:
                log.error("task.report_failed", code=again.code, message=again.message)
        return 1 if e.retryable else 2


def _json(kind: type[T]) -> Callable[[str], T]:
    """An argument given as JSON of ``kind``; a wrong one is told what is wrong (argparse prints it with usage)."""

    def parse(text: str) -> T:
        try:
            return msgspec.json.decode(text, type=kind)
        except msgspec.ValidationError as e:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {e}") from None
        except msgspec.DecodeError as e:
            raise argparse.ArgumentTypeError(f"not JSON: {e}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    # --staging is accepted before or after the command (``shopkpi-task validate f.csv --staging DIR``): the
    # subcommands share it through a parent whose default is SUPPRESS, so a value given first is not reset.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--staging", default=argparse.SUPPRESS, help=_STAGING_HELP)
    p = argparse.ArgumentParser(prog="shopkpi-task", description="shopkpi ECS task entry points")
    p.add_argument("--staging", help=_STAGING_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", parents=[common], help="validate one file (s3:// URI or local path)")
    what = v.add_mutually_exclusive_group(required=True)
    what.add_argument("source", nargs="?", help="s3://bucket/key or a local path")
    what.add_argument(
        "--event",
        type=_json(LandedEvent),
        help='the landed file as the workflow passes it: {"bucket", "key" (URL-encoded as in S3 events), "etag"}',
    )
    vp = sub.add_parser(
        "validate-part", parents=[common], help="validate one byte range of a big file (after validate split it)"
    )
    vp.add_argument(
        "job",
        type=_json(split.PartJob),
        help='JSON: {"file_id", "source", "arrival", "header_end", "part": {"part", "start", "end"}}',
    )
    c = sub.add_parser("combine", parents=[common], help="the whole file's validation result from its parts'")
    c.add_argument(
        "split",
        type=_json(split.Split),
        help="JSON: the split as validate answered it",
    )
    t = sub.add_parser(
        "transform", parents=[common], help="commit an accepted file's staged segment and archive the original"
    )
    t.add_argument("file_id")
    q = sub.add_parser("quarantine", parents=[common], help="move a rejected file to rejected/ with its report")
    q.add_argument("file_id")
    mp = sub.add_parser(
        "merge-part", parents=[common], help="one part of a first load's merge (after merge fanned out)"
    )
    mp.add_argument("task", type=_json(fanout.PartTask), help='JSON: {"plan", "part"}')
    mf = sub.add_parser("merge-finish", parents=[common], help="the final step of a fanned-out merge")
    mf.add_argument("plan", help="the plan's key, as merge answered it (state/g=<G>/plan.json)")
    mb = sub.add_parser("merge-fallback", parents=[common], help="after a failed fan-out: release it, merge as one")
    mb.add_argument("plan", help="the failed fan-out's plan key")
    mb.add_argument("--error", type=orjson.loads, help="the error Step Functions caught (JSON), for the log")
    m = sub.add_parser("merge", parents=[common], help="recompute and publish the KPIs of the dates that changed")
    m.add_argument(
        "--from", dest="date_from", type=_iso_day, help="also recompute this date range (reprocessing): YYYY-MM-DD"
    )
    m.add_argument("--to", dest="date_to", type=_iso_day, help="the range's last day, inclusive: YYYY-MM-DD")
    return p


def _iso_day(text: str) -> str:
    """A day as YYYY-MM-DD (what the workflow passes); anything else is an argument error, not a task crash."""
    problem = argparse.ArgumentTypeError(f"{text!r} is not a date: write YYYY-MM-DD")
    if len(text) != 10:  # fromisoformat also takes 20250301 and 2025-W09-6
        raise problem
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise problem from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The task's arguments; a merge's range must be whole and in order (both ends or neither, from <= to)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "merge":
        if (args.date_from is None) != (args.date_to is None):
            parser.error("merge: --from and --to go together (a range of days, both inclusive)")
        if args.date_from is not None and args.date_from > args.date_to:
            parser.error(f"merge: --from {args.date_from} is after --to {args.date_to}: swap them")
    return args


_STAGING_HELP = "local staging directory, for local sources (default ./shopkpi-staging)"


@contextmanager
def _heartbeat(ws: Workspace, callback: Callback | None, settings: Settings) -> Iterator[None]:
    """While the task works, tell Step Functions it is alive (the state's HeartbeatSeconds catches a dead one),
    renew the merge lock's lease if the task holds it, and keep the task's deadline.

    The first beat goes at once: a cold start can use much of the heartbeat window. Step Functions never stops a
    container it no longer waits for, so the task stops itself: when a beat is answered that the token is dead (the
    state timed out, was retried, or its execution ended), or when its deadline (``SHOPKPI_TASK_DEADLINE``, set by the
    state just under its timeout) has passed, rather than run, and bill, on for nobody.
    """
    deadline = time.monotonic() + settings.task_deadline_s if settings.task_deadline_s > 0 else None
    if ws.ledger is None and callback is None and deadline is None:  # no token, no deadline, no merge lock
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            if callback is not None:
                try:
                    alive = callback.heartbeat()
                except ShopKpiError as e:  # a missed beat is not fatal; the next one may pass
                    log.warning("task.heartbeat_failed", code=e.code, error=e.message)
                    alive = True
                if not alive:
                    log.error("task.abandoned", message="Step Functions no longer waits for this task: stopping")
                    _abandon(ws)
            renew = ws.lease
            if renew is not None:
                try:
                    renew()
                except Exception as e:  # lost: the merge's fence stops it before its next write
                    log.warning("task.lease_renewal_failed", error=str(e))
            wait = settings.heartbeat_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("task.deadline", seconds=settings.task_deadline_s, message="deadline passed: stopping")
                    _abandon(ws)
                wait = min(wait, left)
            if stop.wait(wait):
                return

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


#: Exit status of a task that stopped because Step Functions no longer waits for it, or its deadline passed.
EXIT_ABANDONED = 3


def _abandon(ws: Workspace) -> None:
    """Stop the process at once, after letting go of the merge lock if it holds it: the state's retry (another
    attempt of this execution) is waiting for it, and would otherwise wait out the lease."""
    if ws.on_abandon is not None:
        try:
            ws.on_abandon()
        except Exception as e:  # stopping matters more; the lease still expires
            log.warning("task.release_failed", error=str(e))
    os._exit(EXIT_ABANDONED)


def _workspace(args: argparse.Namespace, settings: Settings) -> Workspace:
    """The landing bucket and the stack's tables for an s3:// source, an event, or a step with no ``--staging``;
    else local files with ``--staging`` (default ./shopkpi-staging) as their staging directory."""
    local = Path(args.staging) if args.staging else None
    remote = args.command in REMOTE and local is None
    if str(getattr(args, "source", "")).startswith("s3://") or getattr(args, "event", None) or remote:
        return Workspace.aws(settings)
    return Workspace.local(local or Path("shopkpi-staging"))


REMOTE = (
    "merge",
    "merge-part",
    "merge-finish",
    "merge-fallback",
    "transform",
    "quarantine",
    "validate-part",
    "combine",
)


def _run(args: argparse.Namespace, settings: Settings, ws: Workspace) -> dict[str, Any]:
    if args.command == "validate":
        return validate_event(args.event, settings, ws) if args.event else validate(args.source, settings, ws)
    if args.command == "validate-part":
        return validate_part(args.job, settings, ws)
    if args.command == "combine":
        return combine_parts(args.split, settings, ws)
    if args.command == "merge-part":
        return merge_part(args.task, settings, ws)
    if args.command == "merge-finish":
        return merge_finish(args.plan, settings, ws)
    if args.command == "merge-fallback":
        return merge_fallback(args.plan, args.error, settings, ws)
    if args.command == "transform":
        return transform(args.file_id, ws)
    if args.command == "quarantine":
        return quarantine(args.file_id, ws)
    return run_merge(settings, ws, (args.date_from, args.date_to) if args.date_from else None)


def _source_of(args: argparse.Namespace) -> str | None:
    """The file a task works on, for its log lines."""
    for name in ("event", "job", "split"):
        if getattr(args, name, None) is not None:
            return str(getattr(args, name).source)
    return getattr(args, "source", None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.load()
    configure(settings.log_level)
    callback: Callback | None = None
    source = _source_of(args)
    with context(execution=settings.execution_id, stage=args.command, file=source):
        try:
            ws = _workspace(args, settings)
            callback = _callback(ws, settings)
            with _heartbeat(ws, callback, settings):
                result = _run(args, settings, ws)
        except ShopKpiError as e:
            log.error("task.failed", code=e.code, message=e.message)
            return _report_result(None, e, callback)
        except Exception as e:  # a bug: report it (terminal) rather than leave the state waiting for a heartbeat
            log.error("task.crashed", exc_info=True, error=repr(e))
            return _report_result(None, InternalError(f"{type(e).__name__}: {e}"), callback)
        return _report_result(result, None, callback)


if __name__ == "__main__":
    raise SystemExit(main())
