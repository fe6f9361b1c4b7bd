"""The code that runs inside the ECS tasks (validation, staging, the merge), and under ``shopkpi process``.

Importing the package tunes polars' allocator. Polars configures its jemalloc at import (``_RJEM_MALLOC_CONF``: its
own defaults, then whatever the environment already holds, the later option winning), so the setting must be in the
environment before polars is imported; every entry point imports this package first. With polars' defaults, freed
pages go back to the kernel after half a second, and the next chunk or merge step faults them in again: on a 2 GB
first load, about a fifth of the process's CPU time was spent in the kernel. Keeping them five seconds, returned by a
background thread, cut that by about 2 CPU-s and the wall time by about 1 s (docs/performance.md). A value already
in the environment wins (``_RJEM_MALLOC_CONF=`` restores polars' defaults).
"""

import os

os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:5000")
