"""Small Lightning callbacks for pretraining runs."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pytorch_lightning as pl
import torch

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


class KnnProbe(pl.Callback):
    """The learning curve: every ``every_n_steps`` (and before the first step), k-NN weighted F1 of the
    teacher's CLS features on a small labelled held-out set, folds grouped by ``group_by``.

    Cheap by design: ``max_units`` units (None: all) are cut and resized once (uint8) when training starts
    and only normalised per batch. Scores go to the loggers as ``probe/knn<k>_weighted_f1`` and into ``curve``
    (reddino-pretrain writes it to results.json). ``units`` is a config node (instantiated at setup, so
    a disabled probe never reads its data). Not available with sharded (FSDP) teachers.

    ``whitening_shrinkage`` (not None): each probe also scores the CLS whitened as the export will be
    (``probe/knn<k>_weighted_f1_whitened``), the whitening fitted on the probe units' own features (no
    labels; the export's is fitted on pretraining units after training), so the curve follows what the
    end-of-run report will score.
    """

    def __init__(
        self,
        enabled: bool,
        units: Any,
        classes: list[str],
        every_n_steps: int,
        max_units: int | None,
        knn: Any,
        n_splits: int,
        group_by: str,
        input_size: int,
        mean: list[float],
        std: list[float],
        batch_size: int,
        seed: int,
        whitening_shrinkage: float | None,
    ) -> None:
        if every_n_steps < 1 or (max_units is not None and max_units < 2) or n_splits < 2 or batch_size < 1:
            raise ValueError(
                "KnnProbe needs every_n_steps >= 1, max_units >= 2 (or null: all), n_splits >= 2 and "
                "batch_size >= 1"
            )
        self.enabled = enabled
        self.units_config = units
        self.classes = list(classes)
        self.every_n_steps = every_n_steps
        self.max_units = max_units
        self.knn = knn
        self.ks = [int(k) for k in knn["ks"]]
        self.n_splits = n_splits
        self.group_by = group_by
        self.input_size = input_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255.0
        self.batch_size = batch_size
        self.seed = seed
        self.whitening_shrinkage = whitening_shrinkage
        self.curve: list[dict[str, float]] = []
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._splits: list | None = None  # the grouped folds, fixed for the whole run

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or self._images is not None:
            return
        if "fsdp" in type(trainer.strategy).__name__.lower():
            raise ValueError("callbacks.knn_probe: the k-NN probe does not support FSDP; set enabled=false")
        from hydra.utils import instantiate

        from reddino.data.datasets import LabelledUnitDataset
        from reddino.eval.protocols import make_splits

        units = instantiate(self.units_config)
        if self.max_units is not None and len(units) > self.max_units:
            units = units.sample(n=self.max_units, random_state=self.seed)
        units = units.sort_values("file", kind="stable").reset_index(drop=True)  # each smear decoded once
        size = self.input_size
        dataset = LabelledUnitDataset(
            units,
            lambda crop: cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR),
            self.classes,
            64,
        )
        self._images = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))])).permute(
            0, 3, 1, 2
        )
        self._labels = torch.tensor(dataset.targets)
        self._splits = make_splits(
            "grouped_kfold",
            dataset.targets,
            units[self.group_by].to_numpy(),
            None,
            None,
            self.n_splits,
            self.seed,
        )
        log.info("k-NN probe: %d held-out units, every %d steps", len(units), self.every_n_steps)

    @torch.no_grad()
    def score(self, backbone: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Weighted F1 in percent per k, mean over the grouped folds (raw, and whitened when asked)."""
        from reddino.eval.features import FeatureExtractor
        from reddino.eval.session import score_feature_set
        from reddino.eval.whitening import fit_whitening

        assert self._images is not None and self._labels is not None and self._splits is not None
        batches = (
            ((self._images[start : start + self.batch_size].float() - self.mean) / self.std, None)
            for start in range(0, len(self._images), self.batch_size)
        )
        feats, _ = FeatureExtractor(backbone, "cls").extract(batches)
        probes = {"linear": {"enabled": False}, "knn": {**self.knn, "enabled": True}}
        sets = {"": feats}
        if self.whitening_shrinkage is not None:
            sets["_whitened"] = fit_whitening(feats, self.whitening_shrinkage)(feats)
        out = {}
        for suffix, x in sets.items():
            scores = score_feature_set(x, self._labels, self._splits, self.classes, probes, scale=False)
            for k in self.ks:
                out[f"knn{k}_weighted_f1{suffix}"] = 100.0 * scores[f"knn{k}"]["weighted_f1"]["mean"]
        return out

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not self.enabled or not trainer.is_global_zero or any(p["step"] == step for p in self.curve):
            return
        scores = self.score(pl_module.teacher["backbone"], pl_module.device)
        self.curve.append({"step": step, **scores})
        log.info("k-NN probe at step %d: %s", step, ", ".join(f"{k} {v:.1f}" for k, v in scores.items()))
        for logger in trainer.loggers:
            logger.log_metrics({f"probe/{k}": v for k, v in scores.items()}, step=step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probe(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._probe(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probe(trainer, pl_module)


def knn_curve(callbacks: list[pl.Callback]) -> list[dict[str, float]]:
    """The learning curve the run's KnnProbe recorded (empty without an enabled one)."""
    return [point for cb in callbacks if isinstance(cb, KnnProbe) for point in cb.curve]
