"""Small Lightning callbacks for pretraining runs."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class ImagesPerSecond(pl.Callback):
    """Logs training throughput (unit images per second, all devices) averaged over ``window`` steps.

    The first step is excluded (compilation, worker start-up); time includes data loading, which is
    what a user waits for.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._t0: float | None = None
        self._images = 0
        self._steps = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
            return
        self._images += int(batch["global_crops"].shape[0] // 2) * trainer.world_size
        self._steps += 1
        if self._steps >= self.window:
            pl_module.log("monitor/images_per_sec", self._images / (now - self._t0), on_step=True)
            self._t0, self._images, self._steps = now, 0, 0
