"""Two embedded stacks in turn on one machine: the second must not read what the first left in the work directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration import operations
from orchestration.local.stack import EmbeddedStack
from processor.settings import Settings
from tests.orchestration.test_embedded_stack import NUMBERS, PIPE_WINDOW_S, expected_kpis, land, small_shop, stored_kpis

pytestmark = pytest.mark.slow


def test_a_second_stack_with_the_same_work_dir_shows_only_its_own_kpis(tmp_path: Path) -> None:
    # As two `shopkpi local up` with the defaults would: same stack name (so the same bucket and keys), same work
    # directory, and generation numbers that start again at 1.
    work = tmp_path / "work"
    shops = [
        small_shop(tmp_path / "a", "a", 3_000_000, "2031-01"),
        small_shop(tmp_path / "b", "b", 3_100_000, "2031-02"),
    ]
    for shop in shops:
        with EmbeddedStack(
            Settings.load(env={}, stack="sktrestart", work_dir=work),
            numbers=NUMBERS,
            task_env={"SHOPKPI_BUCKETS": "4"},
            pipe_window_s=PIPE_WINDOW_S,
        ) as stack:
            assert stack.clients is not None and stack.outputs is not None
            op = operations.Stack(stack.settings, stack.clients, stack.outputs)
            land(op, shop.paths)
            assert stored_kpis(op, "2031-01-01", "2031-12-31") == expected_kpis(shop.paths)
