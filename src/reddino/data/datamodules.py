"""Lightning DataModules: pretraining units with multi-crop augmentation and iBOT mask collation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, get_worker_info

from reddino.data.datasets import UnitDataset
from reddino.data.samplers import EpochSampler

SOURCE_WEIGHTINGS = ("natural", "balanced")


def source_weights(sources: pd.Series, weighting: str) -> np.ndarray | None:
    """Per-unit sampling weights: None for natural mixing, 1/|source| so every source weighs alike."""
    if weighting not in SOURCE_WEIGHTINGS:
        raise ValueError(f"source_weighting must be one of {SOURCE_WEIGHTINGS}, got {weighting!r}")
    if weighting == "natural":
        return None
    counts = sources.map(sources.value_counts())
    return (1.0 / counts.to_numpy(dtype=np.float64)) / sources.nunique()


def reseed_worker(worker_id: int) -> None:
    """Give every worker its own deterministic stream for numpy, the augmentation and the mask collator.

    ``torch.initial_seed()`` inside a worker is the loader's base seed (drawn from the seeded main
    process each epoch) plus the worker id, so runs are reproducible and epochs differ.
    """
    seed = torch.initial_seed() % 2**31
    np.random.seed(seed)  # noqa: NPY002  (third-party code may still draw from the legacy global state)
    info = get_worker_info()
    if info is None:
        return
    dataset = info.dataset
    for obj, offset in ((getattr(dataset, "transform", None), 0), (getattr(dataset, "collate_fn", None), 1)):
        if obj is not None and hasattr(obj, "reseed"):
            obj.reseed(seed + offset)


class PretrainDataModule(pl.LightningDataModule):
    """Serves augmented multi-crop batches of units for self-supervised pretraining.

    The unit order comes from an ``EpochSampler`` (seeded, split over DDP ranks by itself: the trainer
    runs with ``use_distributed_sampler: false``). On resume from a mid-epoch checkpoint the loader starts
    after the batches the restored run had already consumed, so the order continues where it stopped.

    ``gpu_transform`` (``augment=reddino_gpu``): applied on the training device to every crop tensor of a
    batch right after the host-to-device copy (:meth:`on_after_batch_transfer`), so the loader workers
    only crop and flip. None: batches arrive as the loader made them.
    """

    CROP_KEYS = ("global_crops", "local_crops")

    def __init__(
        self,
        units: pd.DataFrame,
        transform: Callable[[np.ndarray], Any],
        collate_fn: Callable[[list[Any]], dict[str, Any]],
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        image_cache_size: int,
        source_weighting: str,
        seed: int,
        gpu_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.units = units
        self.weights = source_weights(units["source"], source_weighting)
        self.transform = transform
        self.gpu_transform = gpu_transform
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.image_cache_size = image_cache_size
        self.seed = seed
        self.dataset: UnitDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = UnitDataset(self.units, self.transform, self.image_cache_size)
            # the collator runs inside the workers; keep a handle so reseed_worker can reach it
            self.dataset.collate_fn = self.collate_fn
        if len(self.dataset) < self.batch_size:
            raise ValueError(f"{len(self.dataset)} units cannot fill one batch of {self.batch_size}")

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        # an epoch is len(units) draws; with source weights they are drawn with replacement
        sampler = EpochSampler(len(self.dataset), self.weights, self.seed)
        if self.trainer is not None:  # restored progress (zero on a fresh run)
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
            sampler.resume_at(self.trainer.current_epoch, progress.ready, self.batch_size)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=self.collate_fn,
            worker_init_fn=reseed_worker,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Apply ``gpu_transform`` to the global and local crops on the device (no-op without one).

        Needs no trainer: benchmarks call it themselves after moving a batch to the device.
        """
        if self.gpu_transform is None:
            return batch
        for key in self.CROP_KEYS:
            crops = batch.get(key)
            if crops is not None:
                batch[key] = self.gpu_transform(crops)
        return batch
