"""Probe threads: what the process may use, set while scoring and restored afterwards."""

from __future__ import annotations

import os

import pytest
import torch

from reddino.runtime import threads
from reddino.runtime.threads import available_cores, cpu_threads, resolve_threads


def test_auto_is_the_cores_this_process_may_use_capped_by_a_cgroup_quota(tmp_path, monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", tmp_path / "absent")
    assert available_cores() == affinity == resolve_threads("auto")
    quota = tmp_path / "cpu.max"
    quota.write_text("50000 100000\n")  # half a CPU: one thread
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", quota)
    assert available_cores() == 1
    quota.write_text("max 100000\n")
    assert available_cores() == affinity


def test_threads_are_set_inside_and_restored_after():
    before = torch.get_num_threads()
    with cpu_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(None) as n:
        assert n is None and torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -2, "many", True])
def test_a_bad_thread_count_is_named(bad):
    with pytest.raises(ValueError, match="threads must be auto or a positive integer"):
        resolve_threads(bad)
