"""Importing ``processor`` tunes polars' allocator before polars loads, and leaves a value the user set alone."""

from __future__ import annotations

import os
import subprocess
import sys

OURS = "background_thread:true,dirty_decay_ms:5000"
SHOW = "import processor, polars, os; print(os.environ['_RJEM_MALLOC_CONF'])"


def _conf(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_processor_keeps_freed_pages_a_few_seconds_by_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    # polars puts its own defaults first; jemalloc reads the options in order, so ours, last, win
    assert _conf(env).endswith("," + OURS)


def test_an_allocator_setting_in_the_environment_wins() -> None:
    conf = _conf({**os.environ, "_RJEM_MALLOC_CONF": "dirty_decay_ms:0"})
    assert conf.endswith(",dirty_decay_ms:0")
    assert OURS not in conf


THREADS = (
    "import processor, numpy, os; "
    "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS', '-'))"
)


def _threads(env: dict[str, str]) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", THREADS], env=env, capture_output=True, text=True, check=True)
    count, setting = out.stdout.split()
    return int(count), setting


def test_importing_processor_then_numpy_starts_no_blas_worker_thread() -> None:
    # OpenBLAS would start one spinning worker per further core at numpy's import; nothing here calls BLAS.
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    assert _threads(env) == (1, "1")


def test_a_blas_thread_setting_in_the_environment_wins() -> None:
    assert _threads({**os.environ, "OPENBLAS_NUM_THREADS": "2"})[1] == "2"
