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
    """Serves augmented multi-crop batches of units for self-supervised pretraining."""

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
    ) -> None:
        super().__init__()
        self.units = units
        self.transform = transform
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.image_cache_size = image_cache_size
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
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=self.collate_fn,
            worker_init_fn=reseed_worker,
        )
