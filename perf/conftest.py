"""pytest-benchmark hooks for the benchmark gate's suite: each saved result says what it was measured with."""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Any

import polars as pl
import pytest


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    # A change of polars or DuckDB moves the calibration or the reference: the gate prints these beside a verdict.
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["timer"] = str(config.getoption("benchmark_timer"))
    machine_info["threads"] = pl.thread_pool_size()
    machine_info["packages"] = {name: version(name) for name in ("polars", "pyarrow", "duckdb", "pytest-benchmark")}
