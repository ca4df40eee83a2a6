"""Run a function on N CPU processes joined by a gloo process group; collect what each rank returns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, fn: Callable[[int], Any], world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    try:
        torch.save(fn(rank), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[[int], Any], world: int, out_dir: Path) -> list[Any]:
    """``fn(rank)`` on ``world`` spawned processes (``fn`` must be importable: a module-level function)."""
    mp.start_processes(
        _rank_main, args=(fn, world, str(out_dir)), nprocs=world, join=True, start_method="spawn"
    )
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
