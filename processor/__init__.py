"""The code that runs inside the ECS tasks (validation, staging, the merge), and under ``shopkpi process``.

Importing the package tunes polars' allocator. Polars configures its jemalloc at import (``_RJEM_MALLOC_CONF``: its
own defaults, then whatever the environment already holds, the later option winning), so the setting must be in the
environment before polars is imported; every entry point imports this package first. With polars' defaults, freed
pages go back to the kernel after half a second, and the next chunk or merge step faults them in again: on a 2 GB
first load, about a fifth of the process's CPU time was spent in the kernel. Keeping them five seconds, returned by a
background thread, cut that by about 2 CPU-s and the wall time by about 1 s (docs/performance.md). A value already
in the environment wins (``_RJEM_MALLOC_CONF=`` restores polars' defaults).

It also keeps numpy's OpenBLAS to one thread. Nothing here calls BLAS, but OpenBLAS starts a worker per core when
numpy is imported, and the worker spins for about a tenth of a CPU-second before it sleeps: in every process and
every task, on a machine whose cores the validation needs. An ``OPENBLAS_NUM_THREADS`` already set wins.
"""

import os

os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:5000")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
