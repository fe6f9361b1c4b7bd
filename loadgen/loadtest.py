"""Load test of the pipeline (``./dev loadtest``): a generated multi-GB shop lands on a stack as producers would land
it, and what the stack did is measured and checked. This module is the engine, with no output of its own; the
command (arguments, progress, the JSON and HTML reports) is ``shopkpi/loadtest.py``.

1. **Data**: :func:`dataset` generates the shop (products, orders and items in ``parts`` files each) or reuses it
   from a cache directory keyed by size, seed, parts and days.
2. **Landing**: :func:`schedule` draws a seeded moment in ``[0, window)`` for every file; :func:`land` uploads them
   on several threads, each file at its moment (or as soon as an uploader is free), as concurrent producers do.
3. **Waiting**: every file's outcome in the ledger (:func:`orchestration.operations.record`) and an idle pipeline.
4. **Measuring**: per stage from the Step Functions execution histories (task time, retries, failures); the latency
   from a file landing to its KPIs being visible from the histories and the merge run records (:func:`latencies`);
   the tasks' memory by sampling them (:class:`TaskMonitor`, embedded stack only: its tasks are local processes).
5. **Checking**: every stored KPI item against an independent DuckDB computation over the raw CSV files of the files
   that were accepted (:func:`duckdb_kpis`, :func:`compare`), every component compared exactly.

Why the latency is "until the merge that published it ended", not "until its execution ended": an execution whose
merge finds another merge running hands its files to that merge and ends at once; the files' KPIs are visible only
when the running merge ends (it merges again before letting go of the lock). So a file's KPIs are visible at the end
of the first merge run that ends after its execution entered its Merge state.
"""

from __future__ import annotations

import json
import math
import queue
import random
import resource
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import psutil

from loadgen.generate import estimate_orders, generate
from orchestration import operations
from processor.aws.dynamo import FileRecord, RunRecord
from processor.errors import RetryableError
from processor.log import get_logger
from processor.model import CategoryKpi, OrderKpi

#: The Task states of the workflow that run an ECS task, as reported per stage ("Quarantine" only for bad files;
#: "ValidatePart" and "Combine" only for a file above SHOPKPI_SPLIT_MB, "MergePart" and "MergeFinish" only for a
#: first load above SHOPKPI_FANOUT_ROWS).
STAGES = ("Validate", "ValidatePart", "Combine", "Transform", "Quarantine", "Merge", "MergePart", "MergeFinish")
#: The stages whose entries are one file each, reported with their bytes.
FILE_STAGES = ("Validate", "Transform", "Quarantine")
#: Marks a complete data set in the cache: written last, after every file.
COMPLETE = "manifest.json"
MIB = 1024 * 1024

log = get_logger("loadtest")


# --- data --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shop:
    """A generated data set: its folder, its CSV files and whether this run generated it (``False``: reused)."""

    folder: Path
    files: tuple[Path, ...]
    generated: bool
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def cache_key(size_gb: float | None, orders: int | None, seed: int, parts: int, days: int) -> str:
    size = f"{orders}orders" if orders is not None else f"{size_gb:g}gb"
    return f"{size}-seed{seed}-parts{parts}-days{days}"


def dataset(
    cache: Path, *, size_gb: float | None, orders: int | None = None, seed: int = 1, parts: int = 8, days: int = 30
) -> Shop:
    """The shop of these parameters from ``cache``, generated first when it is not there. Generated into a
    temporary sibling and renamed when complete, so an interrupted generation is never mistaken for a data set."""
    folder = cache / cache_key(size_gb, orders, seed, parts, days)
    if (folder / COMPLETE).exists():
        return Shop(folder, tuple(sorted(folder.glob("*.csv"))), generated=False)
    if orders is None:
        if size_gb is None:
            raise ValueError("give size_gb or orders")
        orders = estimate_orders(size_gb, days=days, seed=seed)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    gen = generate(partial, orders=orders, days=days, parts=parts, seed=seed)
    (partial / COMPLETE).write_text(f'{{"orders": {orders}, "csv_bytes": {gen.csv_bytes}}}\n')
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return Shop(folder, tuple(sorted(folder.glob("*.csv"))), generated=True, seconds=gen.seconds)


# --- landing -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arrival:
    path: Path
    at_s: float  # scheduled moment, seconds after the start of landing


@dataclass
class LandedFile:
    """One uploaded file: when it was meant to land, when its upload started and ended (seconds after the start of
    landing), and what the stack calls it."""

    item: operations.Landed
    bytes: int
    scheduled_s: float
    upload_started_s: float
    landed_s: float
    landed_epoch: float
    attempts: int = 1


def schedule(files: Sequence[Path], window_s: float, seed: int) -> list[Arrival]:
    """A seeded moment for every file, uniform over ``[0, window_s)``, in landing order."""
    rng = random.Random(seed)
    return sorted((Arrival(f, rng.uniform(0.0, window_s)) for f in files), key=lambda a: a.at_s)


def land(
    op: operations.Stack,
    arrivals: Sequence[Arrival],
    uploaders: int,
    on_landed: Callable[[LandedFile], None] = lambda _: None,
    retries: int = 3,
) -> tuple[list[LandedFile], list[str]]:
    """Upload every file at its moment on ``uploaders`` threads (a file whose moment passed while every uploader
    was busy goes as soon as one is free, as a producer's queue would). Returns the files landed, in landing order,
    and those still not uploaded after ``retries`` more attempts."""
    started = time.monotonic()
    epoch0 = time.time() - started
    todo: queue.SimpleQueue[Arrival] = queue.SimpleQueue()
    for a in arrivals:
        todo.put(a)
    done: list[LandedFile] = []
    lost: list[str] = []
    lock = threading.Lock()

    def uploader() -> None:
        while True:
            try:
                arrival = todo.get_nowait()
            except queue.Empty:
                return
            time.sleep(max(0.0, started + arrival.at_s - time.monotonic()))
            begin = time.monotonic() - started
            item, attempts = _upload(op, arrival.path, retries)
            end = time.monotonic()
            if item is None:
                with lock:
                    lost.append(str(arrival.path))
                continue
            landed = LandedFile(item, arrival.path.stat().st_size, arrival.at_s, begin, end - started, epoch0 + end,
                                attempts)  # fmt: skip
            with lock:
                done.append(landed)
            on_landed(landed)

    with ThreadPoolExecutor(max_workers=max(1, uploaders), thread_name_prefix="producer") as pool:
        for f in [pool.submit(uploader) for _ in range(max(1, uploaders))]:
            f.result()
    return sorted(done, key=lambda x: x.landed_s), lost


def _upload(op: operations.Stack, path: Path, retries: int) -> tuple[operations.Landed | None, int]:
    """Upload as a producer does: again after a retryable error (a busy endpoint), with a growing pause."""
    for attempt in range(1, retries + 2):
        try:
            return operations.ingest(op, [path])[0], attempt
        except RetryableError as e:
            log.warning("loadtest.upload_retry", path=str(path), attempt=attempt, error=e.message)
            time.sleep(2.0 * attempt)
    return None, retries + 1


def with_outcome(op: operations.Stack, landed: Iterable[LandedFile]) -> int:
    return sum(operations.record(op, f.item) is not None for f in landed)


# --- task memory (embedded stack) --------------------------------------------------------------------------------
@dataclass
class TaskSample:
    """One local ECS task process as sampled: its stage, its argument, when it was seen and its peak RSS."""

    pid: int
    stage: str
    target: str
    first_s: float
    last_s: float
    peak_rss_mib: float = 0.0


class TaskMonitor:
    """Samples the processes this process started that run a task (``processor.tasks <stage> ...``): the embedded
    stack's ECS tasks. The peak of each is the kernel's high-water mark (``VmHWM``), read while it lives, so a peak
    reached in the last ``interval_s`` of a task's life can be missed. ``getrusage(RUSAGE_CHILDREN)`` cannot stand in:
    Linux counts into a child's peak the RSS of the copy of this process it was forked from, and this process holds
    moto's S3 objects, so every task would "peak" at this process's size. Also keeps the tasks' RSS over time."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.tasks: dict[int, TaskSample] = {}
        self.timeline: list[tuple[float, float, int]] = []  # (seconds, MiB of all tasks, tasks running)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="task-monitor", daemon=True)
        self._started = 0.0

    def start(self, started: float) -> None:
        self._started = started
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic() - self._started
            total, running = 0.0, 0
            for child in me.children(recursive=True):
                sample = self._sample(child, now)
                if sample is not None:
                    total += sample
                    running += 1
            self.timeline.append((round(now, 2), round(total, 1), running))

    def _sample(self, proc: psutil.Process, now: float) -> float | None:
        """The process's current RSS in MiB when it is a task (its record updated), else None."""
        try:
            task = self.tasks.get(proc.pid)
            if task is None:
                argv = proc.cmdline()
                if "processor.tasks" not in argv or argv.index("processor.tasks") + 1 >= len(argv):
                    return None
                rest = argv[argv.index("processor.tasks") + 1 :]
                task = self.tasks[proc.pid] = TaskSample(proc.pid, rest[0], _target(rest[1:]), now, now)
            rss = float(proc.memory_info().rss) / MIB
            task.peak_rss_mib = max(task.peak_rss_mib, rss, _high_water_mib(proc.pid))
            task.last_s = now
            return rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return None


def _target(args: list[str]) -> str:
    """What a task works on: the S3 key of a validate task's ``--event``, a file id, or a merge's range."""
    if len(args) >= 2 and args[0] == "--event":
        try:
            return str(json.loads(args[1]).get("key", args[1]))
        except (ValueError, AttributeError):
            return args[1]
    return " ".join(args)


def _high_water_mib(pid: int) -> float:
    """The process's peak RSS so far (Linux ``VmHWM``); 0 where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def own_peak_rss_mib() -> float:
    """This process's peak RSS: on the embedded stack, moto (which holds the S3 objects) and the load generator."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- what the executions did -------------------------------------------------------------------------------------
@dataclass
class StageStats:
    """One Task state over all executions: entries (files, or executions for Merge), attempts (a retry is a new
    attempt of the same entry), attempts that failed or timed out, and the seconds between entering and leaving
    the state summed over entries (queueing for a task, its start, its work and its retries included)."""

    entries: int = 0
    attempts: int = 0
    failed_attempts: int = 0
    exits: int = 0
    task_seconds: float = 0.0
    bytes: int = 0  # bytes of the files whose entry left the state (Validate, Transform, Quarantine)
    first_epoch: float | None = None
    last_epoch: float | None = None
    done: list[tuple[float, int]] = field(default_factory=list)  # (epoch left, bytes)

    @property
    def retries(self) -> int:
        return self.attempts - self.entries


@dataclass
class Trace:
    """What the execution histories say: stage statistics, and when each execution entered its Merge state."""

    stages: dict[str, StageStats] = field(default_factory=lambda: {s: StageStats() for s in STAGES})
    merge_entered: dict[str, float] = field(default_factory=dict)  # execution name -> epoch
    executions: dict[str, str] = field(default_factory=dict)  # execution name -> status


def _epoch(value: datetime | str) -> float:
    return (value if isinstance(value, datetime) else datetime.fromisoformat(value)).timestamp()


def trace(op: operations.Stack, since_epoch: float, sizes: dict[str, int]) -> Trace:
    """Read the histories of the executions started since ``since_epoch``. ``sizes`` maps what identifies a file in
    a state's input (its key, its file id) to its bytes."""
    out = Trace()
    for e in op.workflow.executions(limit=1000):
        if _epoch(e["startDate"]) < since_epoch:
            continue
        out.executions[e["name"]] = e["status"]
        _read_history(op.workflow.history(e["executionArn"]), e["name"], sizes, out)
    return out


def _read_history(events: list[dict[str, Any]], name: str, sizes: dict[str, int], out: Trace) -> None:
    """Pair each Task state's entry with its exit through ``previousEventId`` (entries of a Map interleave), and
    attribute every task event in between (attempts, failures) to that entry."""
    owner: dict[int, int] = {}  # event id -> id of the TaskStateEntered it belongs to
    entered: dict[int, tuple[str, float, int]] = {}  # entry id -> (state, epoch, bytes)
    for ev in events:
        kind, at = ev["type"], _epoch(ev["timestamp"])
        if kind == "TaskStateEntered":
            details = ev["stateEnteredEventDetails"]
            state = details["name"]
            if state in out.stages:
                size = _bytes_of(details.get("input", ""), sizes) if state in FILE_STAGES else 0
                entered[ev["id"]] = (state, at, size)
                owner[ev["id"]] = ev["id"]
                stage = out.stages[state]
                stage.entries += 1
                stage.first_epoch = min(stage.first_epoch or at, at)
                if state == "Merge":
                    out.merge_entered.setdefault(name, at)
            continue
        entry = owner.get(ev.get("previousEventId", 0))
        if entry is None or not kind.startswith("Task"):
            continue
        state, began, size = entered[entry]
        stage = out.stages[state]
        if kind == "TaskScheduled":
            stage.attempts += 1
        elif kind in ("TaskFailed", "TaskTimedOut", "TaskStartFailed", "TaskSubmitFailed"):
            stage.failed_attempts += 1
        if kind == "TaskStateExited":
            stage.exits += 1
            stage.task_seconds += at - began
            stage.bytes += size
            stage.last_epoch = max(stage.last_epoch or at, at)
            stage.done.append((at, size))
        else:
            owner[ev["id"]] = entry


def _bytes_of(state_input: str, sizes: dict[str, int]) -> int:
    return next((n for ident, n in sizes.items() if ident in state_input), 0)


def latencies(
    landed: Sequence[LandedFile], records: dict[str, FileRecord | None], trace: Trace, runs: Sequence[RunRecord]
) -> dict[str, float]:
    """Seconds from each accepted file landing to its KPIs being visible: the end of the first merge run that ended
    after the file's execution entered its Merge state (see the module's docstring). Files without one (rejected,
    failed, never merged) are left out."""
    ends = sorted(_epoch(r.ended_at) for r in runs if r.ended_at)
    out: dict[str, float] = {}
    for f in landed:
        record = records.get(f.item.file_id)
        merge_at = trace.merge_entered.get(record.execution or "") if record is not None else None
        if record is None or record.outcome != "accepted" or merge_at is None:
            continue
        visible = next((end for end in ends if end >= merge_at), None)
        if visible is not None:
            out[f.item.file_id] = max(0.0, visible - f.landed_epoch)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by the nearest-rank method: a value that was measured, never interpolated."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --- the independent check ---------------------------------------------------------------------------------------
DailyKey = str
CategoryKey = tuple[str, str]


@dataclass(frozen=True)
class Expected:
    """KPI components by key, as DuckDB computed them: the fields of :class:`OrderKpi` / :class:`CategoryKpi`."""

    daily: dict[DailyKey, dict[str, int]]
    category: dict[CategoryKey, dict[str, int]]
    seconds: float


def _files_sql(paths: Sequence[Path]) -> str:
    return "[" + ", ".join("'" + str(p.resolve()).replace("'", "''") + "'" for p in paths) + "]"


def duckdb_kpis(files: Sequence[Path], *, threads: int = 2, memory_limit: str = "3GB") -> Expected:
    """The KPIs of the data contract over ``files`` (raw CSV: products, orders_*, order_items_*), computed by DuckDB
    from the definitions in SPEC section 3 with nothing of ours: an order's date is its created_at's UTC date; an
    order is returned when its status is returned or returned_at is set, an item likewise; an item counts with its
    order's date, when its order exists with the same user and its product exists; revenue in integer cents.
    Every primary key must be delivered once (the generator's ids are unique): which version wins is ours to say."""
    started = time.perf_counter()
    by_kind: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        kind = "items" if f.name.startswith("order_items") else "orders" if f.name.startswith("orders") else "products"
        by_kind[kind].append(f)
    if not all(by_kind[k] for k in ("items", "orders", "products")):
        return Expected({}, {}, 0.0)
    con = duckdb.connect()
    try:
        con.execute(f"SET threads TO {threads}")
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute("SET preserve_insertion_order = false")
        con.execute("SET enable_progress_bar = false")
        con.execute("SET TimeZone = 'UTC'")  # a timestamp without an offset is UTC (SPEC section 1)
        con.execute(_KPI_SQL.format(orders=_files_sql(by_kind["orders"]), items=_files_sql(by_kind["items"]),
                                    products=_files_sql(by_kind["products"])))  # fmt: skip
        daily = {
            d: dict(zip(_DAILY_FIELDS, values, strict=True))
            for d, *values in con.execute("SELECT * FROM daily_kpis").fetchall()
        }
        category = {
            (c, d): dict(zip(_CATEGORY_FIELDS, values, strict=True))
            for c, d, *values in con.execute("SELECT * FROM category_kpis").fetchall()
        }
    finally:
        con.close()
    return Expected(daily, category, time.perf_counter() - started)


_DAILY_FIELDS = ("total_orders", "returned_orders", "total_items_sold", "revenue_cents", "unique_customers")
_CATEGORY_FIELDS = ("orders", "returned_orders", "items", "revenue_cents")
_KPI_SQL = """
CREATE TEMP TABLE o AS
  SELECT order_id, user_id, CAST(timezone('UTC', created_at) AS DATE)::VARCHAR AS d,
         (lower(status) = 'returned' OR returned_at IS NOT NULL) AS ret
  FROM read_csv({orders}, header = true, types = {{'created_at': 'TIMESTAMPTZ', 'returned_at': 'VARCHAR'}});
CREATE TEMP TABLE j AS
  SELECT i.order_id, o.d, p.category, CAST(round(i.sale_price * 100) AS BIGINT) AS cents,
         (lower(i.status) = 'returned' OR i.returned_at IS NOT NULL) AS ret
  FROM read_csv({items}, header = true, types = {{'sale_price': 'DECIMAL(18,2)', 'returned_at': 'VARCHAR'}}) i
  JOIN o ON o.order_id = i.order_id AND o.user_id = i.user_id
  JOIN read_csv({products}, header = true) p ON p.id = i.product_id;
CREATE TEMP TABLE daily_kpis AS
  SELECT d, count(*), count(*) FILTER (WHERE ret),
         coalesce(any_value(items), 0), coalesce(any_value(cents), 0), count(DISTINCT user_id)
  FROM o LEFT JOIN (SELECT d, count(*) AS items, sum(cents) AS cents FROM j GROUP BY d) USING (d)
  GROUP BY d;
CREATE TEMP TABLE category_kpis AS
  SELECT category, d, count(DISTINCT order_id), count(DISTINCT order_id) FILTER (WHERE ret), count(*), sum(cents)
  FROM j GROUP BY category, d;
"""


@dataclass
class Check:
    """Stored KPI items against DuckDB's: how many were compared and every difference (``missing``: DuckDB has
    it, the store does not; ``extra``: the other way; else the field that differs)."""

    daily_items: int
    category_items: int
    differences: list[dict[str, Any]]
    duckdb_seconds: float

    @property
    def agrees(self) -> bool:
        return not self.differences


def _components(k: OrderKpi | CategoryKpi) -> dict[str, int]:
    return {f: getattr(k, f) for f in (_DAILY_FIELDS if isinstance(k, OrderKpi) else _CATEGORY_FIELDS)}


def compare(daily: Sequence[OrderKpi], category: Sequence[CategoryKpi], expected: Expected) -> Check:
    """Stored items against DuckDB's, every component exactly; keys present on one side only are differences."""
    stored_daily = {k.order_date: _components(k) for k in daily}
    stored_category = {(k.category, k.order_date): _components(k) for k in category}
    differences = _differences("daily", stored_daily, expected.daily) + _differences(
        "category", stored_category, expected.category
    )
    return Check(len(stored_daily), len(stored_category), differences, round(expected.seconds, 2))


def _differences(
    table: str, stored: dict[Any, dict[str, int]], expected: dict[Any, dict[str, int]]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key in sorted(stored.keys() | expected.keys()):
        mine, theirs = stored.get(key), expected.get(key)
        if mine is None or theirs is None:
            out.append({"table": table, "key": key, "field": "missing" if mine is None else "extra"})
            continue
        out += [
            {"table": table, "key": key, "field": f, "stored": mine[f], "duckdb": int(theirs[f])}
            for f in mine
            if mine[f] != int(theirs[f])
        ]
    return out


def check_kpis(op: operations.Stack, files: Sequence[Path]) -> Check:
    """Every stored KPI item against DuckDB's computation over ``files``."""
    expected = duckdb_kpis(files)
    return compare(operations.daily(op, None, None), operations.category(op, None, None, None), expected)


# --- one load test -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How the files land: over ``window_s`` seconds from a seeded schedule, on ``uploaders`` threads; the pipeline
    gets ``timeout_s`` after the last landing to give every file an outcome."""

    window_s: float = 60.0
    uploaders: int = 4
    timeout_s: float = 3600.0
    seed: int = 1
    batch_window_s: float | None = None  # the embedded trigger's batching window (None: a deployed stack's own)
    max_concurrency: int | None = None  # the embedded Map's MaxConcurrency (None: a deployed stack's own)


class Observer:
    """What a front end may show while the test runs (this one shows nothing)."""

    def phase(self, text: str) -> None:
        """A new phase begins."""

    def landed(self, f: LandedFile) -> None:
        """One file landed."""

    def outcomes(self, done: int, total: int) -> None:
        """``done`` of ``total`` landed files have an outcome."""


@dataclass
class Result:
    """What one load test gathered; :func:`report` turns it into the JSON report."""

    shop: Shop
    plan: Plan
    landed: list[LandedFile]
    finished: bool
    wall_seconds: float
    records: dict[str, FileRecord | None]
    trace: Trace
    runs: list[RunRecord]
    check: Check
    started_epoch: float
    monitor: TaskMonitor | None = None
    orchestrator_peak_mib: float = 0.0
    not_uploaded: list[str] = field(default_factory=list)  # files the producers gave up on


def run(op: operations.Stack, shop: Shop, plan: Plan, observer: Observer, monitor: TaskMonitor | None) -> Result:
    """Land the shop's files on the stack, wait for every outcome, gather what happened and check the KPIs."""
    arrivals = schedule(shop.files, plan.window_s, plan.seed)
    started, started_epoch = time.monotonic(), time.time()
    if monitor is not None:
        monitor.start(started)
    observer.phase(f"landing {len(arrivals)} files over {plan.window_s:g} s on {plan.uploaders} uploader threads")
    landed, lost = land(op, arrivals, plan.uploaders, observer.landed)
    observer.phase("waiting for every file's outcome and an idle pipeline")
    finished = _wait(op, landed, plan.timeout_s, observer)
    wall = time.monotonic() - started
    if monitor is not None:
        monitor.stop()
    observer.phase("reading the ledger, the run records and the execution histories")
    records = {f.item.file_id: operations.record(op, f.item) for f in landed}
    sizes = {key: f.bytes for f in landed for key in (f.item.key, f.item.file_id)}
    runs = [r for r in op.ledger.runs(limit=1000) if _epoch(r.started_at) >= started_epoch - 1]
    history = trace(op, started_epoch - 1, sizes)
    orchestrator_peak = own_peak_rss_mib()  # before DuckDB runs in this process
    observer.phase("checking every stored KPI item against DuckDB over the raw CSV files")
    accepted = [f.item.path for f in landed if (r := records[f.item.file_id]) is not None and r.outcome == "accepted"]
    check = check_kpis(op, accepted)
    return Result(shop, plan, landed, finished, wall, records, history, runs, check, started_epoch, monitor,
                  orchestrator_peak, not_uploaded=lost)  # fmt: skip


def _wait(op: operations.Stack, landed: list[LandedFile], timeout_s: float, observer: Observer) -> bool:
    stop = threading.Event()
    pending = list(landed)

    def watch() -> None:
        # Only files still without an outcome are asked about: on the embedded stack every call is work for the
        # same moto process that serves the tasks.
        while not stop.wait(2.0):
            pending[:] = [f for f in pending if operations.record(op, f.item) is None]
            observer.outcomes(len(landed) - len(pending), len(landed))

    watcher = threading.Thread(target=watch, name="outcomes", daemon=True)
    watcher.start()
    try:
        return operations.wait(op, timeout_s, [f.item for f in landed], settle_s=2.0)
    finally:
        stop.set()
        watcher.join()
        observer.outcomes(with_outcome(op, landed), len(landed))


# --- the report --------------------------------------------------------------------------------------------------
def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def report(result: Result) -> dict[str, Any]:
    """The JSON report: figures only, every duration in seconds, sizes in MB (10**6 bytes), memory in MiB."""
    files = _files(result)
    latency = [f["latency_s"] for f in files if f["latency_s"] is not None]
    visible = [f["visible_s"] for f in files if f["visible_s"] is not None]
    accepted = [f for f in files if f["outcome"] == "accepted"]
    rows = sum(f["rows"] or 0 for f in accepted)
    mb = sum(f["bytes"] for f in accepted) / 1e6
    first = min((f.upload_started_s for f in result.landed), default=0.0)
    span = (max(visible) - first) if visible else None
    outcomes = Counter(f["outcome"] for f in files)
    return {
        "data": {
            "folder": str(result.shop.folder),
            "files": len(files),
            "mb": round(sum(f["bytes"] for f in files) / 1e6, 1),
            "rows": sum(f["rows"] or 0 for f in files),
            "reused": not result.shop.generated,
            "generate_seconds": _r(result.shop.seconds),
        },
        "plan": {**vars(result.plan)},
        "finished": result.finished,
        "wall_seconds": _r(result.wall_seconds),
        "landing_seconds": _r(max((f.landed_s for f in result.landed), default=0.0)),
        "throughput": {
            "seconds": _r(span),
            "mb_per_s": _r(mb / span) if span else None,
            "rows_per_s": round(rows / span) if span else None,
            "note": "accepted bytes and rows over the time from the first upload starting to the last KPIs visible",
        },
        "latency": {
            "files": len(latency),
            "p50_s": _r(percentile(latency, 50)),
            "p95_s": _r(percentile(latency, 95)),
            "max_s": _r(max(latency, default=None) if latency else None),
            "mean_s": _r(sum(latency) / len(latency)) if latency else None,
        },
        "stages": _stages(result, rows),
        "memory": _memory(result),
        "outcomes": dict(outcomes),
        "executions": dict(Counter(result.trace.executions.values())),
        "retries": {s: st.retries for s, st in result.trace.stages.items()},
        "failures": _failures(result, files),
        "kpi_check": {
            "agrees": result.check.agrees,
            "daily_items": result.check.daily_items,
            "category_items": result.check.category_items,
            "differences": len(result.check.differences),
            "first_differences": result.check.differences[:50],
            "duckdb_seconds": result.check.duckdb_seconds,
        },
        "series": _series(result, files),
        "files": files,
    }


def _files(result: Result) -> list[dict[str, Any]]:
    """One row per landed file: its size, rows, outcome, landing and the latency to its KPIs (seconds after the
    start of landing, ``visible_s``)."""
    lat = latencies(result.landed, result.records, result.trace, result.runs)
    out = []
    for f in result.landed:
        record = result.records.get(f.item.file_id)
        latency = lat.get(f.item.file_id)
        out.append({
            "file": f.item.key,
            "file_id": f.item.file_id,
            "bytes": f.bytes,
            "rows": record.rows if record is not None else None,
            "outcome": (record.outcome if record is not None else None) or "none",
            "scheduled_s": _r(f.scheduled_s),
            "upload_started_s": _r(f.upload_started_s),
            "landed_s": _r(f.landed_s),
            "upload_mb_per_s": _r(f.bytes / 1e6 / max(f.landed_s - f.upload_started_s, 1e-3)),
            "upload_attempts": f.attempts,
            "latency_s": _r(latency),
            "visible_s": _r(f.landed_s + latency) if latency is not None else None,
        })  # fmt: skip
    return out


def _stages(result: Result, rows: int) -> dict[str, dict[str, Any]]:
    """Per Task state: entries, retries, failed attempts, task seconds (summed over entries) and span (first entry
    to last exit); MB/s per task (bytes over summed task seconds) and over the span; for Merge, rows per second of
    the merge runs (from each run record's start to its end, under the lock)."""
    out: dict[str, dict[str, Any]] = {}
    for name, st in result.trace.stages.items():
        if not st.entries:
            continue
        span = (st.last_epoch - st.first_epoch) if st.first_epoch and st.last_epoch else None
        row: dict[str, Any] = {
            "entries": st.entries,
            "attempts": st.attempts,
            "retries": st.retries,
            "failed_attempts": st.failed_attempts,
            "task_seconds": _r(st.task_seconds),
            "span_seconds": _r(span),
        }
        if name in FILE_STAGES:
            row.update(
                mb=round(st.bytes / 1e6, 1),
                mb_per_task_s=_r(st.bytes / 1e6 / st.task_seconds) if st.task_seconds else None,
                mb_per_s=_r(st.bytes / 1e6 / span) if span else None,
            )
        elif name == "Merge":
            # A run's summary is its last round's: its own start and end bound all of its rounds.
            work = sum(_epoch(r.ended_at) - _epoch(r.started_at) for r in result.runs if r.ended_at)
            row.update(
                runs=len(result.runs),
                rounds=sum(int((r.summary or {}).get("rounds", 1)) for r in result.runs),
                merge_seconds=_r(work),
                rows_per_merge_s=round(rows / work) if work else None,
            )
        out[name] = row
    return out


def _memory(result: Result) -> dict[str, Any]:
    """Peak RSS of the tasks by stage (sampled high-water marks) and the largest of them, this process's
    peak (moto holding every S3 object, and the uploaders), and the tasks' total RSS over time."""
    monitor = result.monitor
    if monitor is None:
        return {"measured": False, "note": "a deployed stack's tasks run on ECS: see CloudWatch Container Insights"}
    by_stage: dict[str, dict[str, Any]] = {}
    for t in monitor.tasks.values():
        s = by_stage.setdefault(t.stage, {"tasks": 0, "peak_rss_mib": 0.0, "largest": ""})
        s["tasks"] += 1
        if t.peak_rss_mib > s["peak_rss_mib"]:
            s["peak_rss_mib"], s["largest"] = round(t.peak_rss_mib), t.target
    step = max(1, len(monitor.timeline) // 600)
    return {
        "measured": True,
        "sampled_every_s": monitor.interval_s,
        "by_stage": by_stage,
        "largest_task_peak_mib": round(max((t.peak_rss_mib for t in monitor.tasks.values()), default=0.0)),
        "tasks_total_peak_mib": round(max((m for _, m, _ in monitor.timeline), default=0.0)),
        "max_concurrent_tasks": max((n for _, _, n in monitor.timeline), default=0),
        "orchestrator_peak_mib": round(result.orchestrator_peak_mib),
        "timeline": [list(x) for x in monitor.timeline[::step]],
        "tasks": [
            {
                "stage": t.stage,
                "target": t.target,
                "seconds": _r(t.last_s - t.first_s),
                "peak_rss_mib": round(t.peak_rss_mib),
            }
            for t in sorted(monitor.tasks.values(), key=lambda t: t.first_s)
        ],
    }


def _failures(result: Result, files: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "upload_retries": sum(f["upload_attempts"] - 1 for f in files),
        "not_uploaded": result.not_uploaded,
        "files_failed": [f["file"] for f in files if f["outcome"] in ("failed", "none")],
        "files_rejected": [f["file"] for f in files if f["outcome"] == "rejected"],
        "executions_not_succeeded": sorted(n for n, s in result.trace.executions.items() if s != "SUCCEEDED"),
        "failed_task_attempts": sum(st.failed_attempts for st in result.trace.stages.values()),
        # Validations beyond one per landed file: events delivered more than once (harmless: a file is staged once).
        "extra_validations": max(0, result.trace.stages["Validate"].entries - len(files)),
    }


def _series(result: Result, files: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """Cumulative MB over time (seconds after the start of landing): landed, validated, transformed, KPIs visible."""
    t0 = result.started_epoch

    def cumulative(points: Iterable[tuple[float, int]]) -> list[list[float]]:
        total, out = 0, [[0.0, 0.0]]
        for at, n in sorted(points):
            total += n
            out.append([round(at, 2), round(total / 1e6, 1)])
        return out

    stages = result.trace.stages
    return {
        "landed": cumulative((f["landed_s"], f["bytes"]) for f in files),
        "validated": cumulative((at - t0, n) for at, n in stages["Validate"].done),
        "transformed": cumulative((at - t0, n) for at, n in stages["Transform"].done),
        "visible": cumulative((f["visible_s"], f["bytes"]) for f in files if f["visible_s"] is not None),
    }
