"""Callbacks the tests inject into real CLI runs (``PYTHONPATH=tests/support``, ``+callbacks.x=...``)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process when ``step`` is about to start: a hard crash, no cleanup, no final save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordSteps(pl.Callback):
    """Appends one JSON line per optimiser step: the step, its units, schedules and applied lr."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        record = {
            "step": trainer.global_step - 1,
            "rank": trainer.global_rank,
            "units": batch["unit_indices"].tolist(),
            "schedule": pl_module._step_values,
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
