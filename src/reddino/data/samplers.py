"""A pretraining sampler whose order is a pure function of (seed, epoch), split over ranks, resumable.

Why not torch's samplers: a killed run must replay the same unit order from the middle of an epoch, and
DDP ranks must split one global order (rank r takes positions r, r + world, ...), so that a global batch
is the same set of units at any world size. ``RandomSampler`` draws from the loader's generator (state
not saved in checkpoints), and wrapping a ``WeightedRandomSampler`` in a distributed sampler reshuffles
it. Here the order of epoch ``e`` is regenerated from ``seed`` and ``e``; resuming only skips ahead.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from reddino.runtime.distributed import rank, world_size


class EpochSampler(Sampler[int]):
    """Shuffled permutation (or weighted draws with replacement) per epoch, this rank's share of it.

    Every rank gets ``len(units) // world`` indices (the tail that would leave ranks uneven is dropped,
    so all ranks run the same number of steps). ``resume_at(epoch, batches, batch_size)`` makes the next
    iteration of that epoch start after the batches this rank already consumed.
    """

    def __init__(self, n_units: int, weights: np.ndarray | None, seed: int) -> None:
        if n_units <= 0:
            raise ValueError("EpochSampler needs at least one unit")
        if weights is not None and len(weights) != n_units:
            raise ValueError(f"{len(weights)} weights for {n_units} units")
        self.n_units = n_units
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.seed = int(seed)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches_done: int, batch_size: int) -> None:
        """Skip the first ``batches_done`` batches of ``epoch`` (a checkpoint taken mid-epoch)."""
        self._resume = (int(epoch), int(batches_done) * int(batch_size))

    def global_order(self, epoch: int) -> np.ndarray:
        """The order of all units in ``epoch`` before the split over ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            return rng.permutation(self.n_units)
        return rng.choice(self.n_units, size=self.n_units, replace=True, p=self.weights / self.weights.sum())

    def __len__(self) -> int:
        return self.n_units // world_size()

    def __iter__(self) -> Iterator[int]:
        world = world_size()
        mine = self.global_order(self.epoch)[: len(self) * world][rank() :: world]
        if self._resume is not None and self._resume[0] == self.epoch:
            mine = mine[self._resume[1] :]
        self._resume = None
        return iter(torch.as_tensor(mine).tolist())
