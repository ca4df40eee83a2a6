"""CPU threads for the probes: what this process may actually use, never more (oversubscribed BLAS and
torch threads on a shared machine made the probes 2-10x slower, benchmarks/eval_speed.md)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota when one is set
    (a container given 2 CPUs on a 64-core host sees 64 in ``os.cpu_count()``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def resolve_threads(threads: int | str) -> int:
    """``auto`` -> ``available_cores()``; a positive integer as given."""
    if threads == "auto":
        return available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be auto or a positive integer, got {threads!r}")
    return threads


@contextmanager
def cpu_threads(threads: int | str | None) -> Iterator[int | None]:
    """Run the block with this many torch and BLAS/OpenMP threads (None: leave them as they are); the
    previous torch setting is restored afterwards."""
    if threads is None:
        yield None
        return
    n = resolve_threads(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield n
    finally:
        torch.set_num_threads(previous)
