"""Small Lightning callbacks for pretraining runs."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger("reddino.pretrain")


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


@dataclass(frozen=True)
class Verdict:
    """One collapse condition: the monitor it reads, when it counts as failing, and what to say."""

    name: str
    monitor: str
    failing: Callable[[float, CollapseGuard], bool]
    diagnosis: str


VERDICTS = (
    Verdict(
        "uniform_targets",
        "monitor/entropy_ratio",
        lambda v, g: v >= g.uniform_entropy_ratio,
        "teacher targets uniform (entropy {value:.3f} of ln K) for {steps} steps: nothing to distil. Too "
        "many prototypes for this dataset and batch (ssl.head.n_prototypes), a teacher temperature too "
        "high, or a backbone whose CLS does not depend on the input yet (LayerScale init 1e-5 from "
        "scratch: model.init_values)",
    ),
    Verdict(
        "one_prototype",
        "monitor/prototypes_used",
        lambda v, g: v <= g.min_prototypes_used,
        "every image goes to the same few prototypes ({value:.1f} in use) for {steps} steps: collapse. "
        "Use Sinkhorn-Knopp (ssl.centering.method), a lower teacher temperature or a higher momentum",
    ),
    Verdict(
        "constant_features",
        "monitor/cls_spread",
        lambda v, g: v <= g.min_cls_spread,
        "CLS features nearly identical for every image (spread {value:.3f} of a uniform spread) for "
        "{steps} steps: the backbone has collapsed. Lower the learning rate or the teacher momentum",
    ),
)


class CollapseGuard(pl.Callback):
    """Warns (log and loggers), and optionally stops the run, when training is not learning.

    Every ``check_every_n_steps`` it reads the monitors the module logs (``reddino.ssl.monitors``). A
    condition of ``VERDICTS`` failing on ``patience`` consecutive checks gives a plain diagnosis once,
    in the log and as ``guard/<name>`` = 1 in the loggers; with ``stop`` the run ends there. The
    diagnoses are kept in ``diagnoses`` (reddino-pretrain writes them to results.json).
    """

    def __init__(
        self,
        check_every_n_steps: int,
        patience: int,
        uniform_entropy_ratio: float,
        min_prototypes_used: float,
        min_cls_spread: float,
        stop: bool,
    ) -> None:
        if check_every_n_steps < 1 or patience < 1:
            raise ValueError("CollapseGuard needs check_every_n_steps >= 1 and patience >= 1")
        self.check_every_n_steps = check_every_n_steps
        self.patience = patience
        self.uniform_entropy_ratio = uniform_entropy_ratio
        self.min_prototypes_used = min_prototypes_used
        self.min_cls_spread = min_cls_spread
        self.stop = stop
        self.failing = {v.name: 0 for v in VERDICTS}
        self.diagnoses: dict[str, str] = {}

    def check(self, monitors: dict[str, float], step: int) -> list[str]:
        """Update the counts from one check's monitors; returns the diagnoses reached now."""
        reached = []
        for verdict in VERDICTS:
            value = monitors.get(verdict.monitor)
            if value is None or not math.isfinite(value):
                continue
            self.failing[verdict.name] = self.failing[verdict.name] + 1 if verdict.failing(value, self) else 0
            if self.failing[verdict.name] >= self.patience and verdict.name not in self.diagnoses:
                steps = self.failing[verdict.name] * self.check_every_n_steps
                text = f"step {step}: " + verdict.diagnosis.format(value=value, steps=steps)
                self.diagnoses[verdict.name] = text
                reached.append(verdict.name)
        return reached

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.check_every_n_steps:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("monitor/")}
        for name in self.check(metrics, step):
            log.warning("collapse guard: %s", self.diagnoses[name])
            for logger in trainer.loggers:
                logger.log_metrics({f"guard/{name}": 1.0}, step=step)
            if self.stop:
                log.warning("collapse guard: stopping the run (callbacks.collapse_guard.stop=true)")
                trainer.should_stop = True


def collapse_diagnoses(callbacks: list[pl.Callback]) -> dict[str, str]:
    """What the run's CollapseGuard diagnosed (empty without one, or when the run was healthy)."""
    return {
        name: text for cb in callbacks if isinstance(cb, CollapseGuard) for name, text in cb.diagnoses.items()
    }
