"""The embedded stack keeps every task process it starts, however many threads start them at once (moto's server and
its executions call the ECS runner from threads of their own): a process missing from the list would be neither
stopped with the stack nor counted as running."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestration.local import stack as stack_module
from orchestration.local.stack import EmbeddedStack
from processor.settings import Settings


class StillRunning:
    """A started task process that has not finished."""

    def poll(self) -> None:
        return None


@pytest.fixture
def fast_switching() -> Iterator[None]:
    # Threads hand over the interpreter far more often than every 5 ms, so that starts really interleave.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_tasks_started_from_many_threads_at_once_are_all_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_switching: None
) -> None:
    monkeypatch.setattr(stack_module, "run_task_locally", lambda *args, **kwargs: StillRunning())
    stack = EmbeddedStack(Settings.load(env={}, stack="skttracking", work_dir=tmp_path))
    stack.clients = SimpleNamespace(client=lambda name: None)  # type: ignore[assignment]
    threads, starts = 8, 300
    go = threading.Barrier(threads)

    def start_tasks() -> None:
        go.wait()
        for _ in range(starts):
            stack._run_task({})  # what moto's patched ECS calls for each task it starts

    workers = [threading.Thread(target=start_tasks) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert stack.running_tasks() == threads * starts
