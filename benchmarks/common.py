"""Shared by the training benchmarks: compose the real pretraining config outside a Hydra run, and run
one training step the way the LightningModule does, piece by piece."""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import reddino.runtime.resolvers
import reddino.runtime.schemas  # noqa: F401  (registers the typed config schemas)
from reddino.data.datamodules import PretrainDataModule
from reddino.ssl.module import DinoV2Module

CONF = str(Path(__file__).resolve().parents[1] / "conf")
T = TypeVar("T")
PIECES = ("data", "teacher_forward", "student_forward_loss", "backward", "optimizer", "ema")


def pretrain_config(overrides: list[str]) -> DictConfig:
    """``conf/pretrain.yaml`` with command-line style overrides; outputs go to a temporary directory."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("pretrain", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="reddino-bench-")
    return cfg


def to_device(batch: Mapping[str, Any], datamodule: PretrainDataModule, device: torch.device) -> dict:
    """Host batch -> device, then the datamodule's on-device transform (GPU-side augmentation, if any),
    as Lightning does between the loader and ``training_step``."""
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return datamodule.on_after_batch_transfer(moved, 0)


class StepRunner:
    """One optimiser step of ``DinoV2Module`` outside Lightning: teacher targets, student losses, backward,
    per-submodule clipping, AdamW and the EMA update, under bf16 autocast on CUDA when the trainer asks
    for it (what ``bf16-mixed`` does). ``mark()`` is called after each piece so callers can time them."""

    def __init__(self, module: DinoV2Module, global_batch: int, device: torch.device, bf16: bool) -> None:
        self.module = module.to(device)
        self.device = device
        self.bf16 = bf16
        module.schedules = module.build_schedules(global_batch)
        self.optimizer = module.configure_optimizers()
        module.on_train_start()

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16) if self.bf16 else nullcontext()

    def losses(self, batch: Mapping[str, Any], step: int) -> torch.Tensor:
        """Forward of teacher and student; returns the total loss (for FLOP counting without a step)."""
        m = self.module
        m._step_values = m.schedules.values(step)
        with self.autocast():
            cls_probs, patch_probs = m.teacher_targets(batch, m._step_values["teacher_temp"])
            _, total, _ = m.student_losses(batch, cls_probs, patch_probs)
        return total

    def step(self, batch: Mapping[str, Any], step: int, mark: Callable[[], None] = lambda: None) -> None:
        m = self.module
        m._step_values = m.schedules.values(step)
        with self.autocast():
            cls_probs, patch_probs = m.teacher_targets(batch, m._step_values["teacher_temp"])
            mark()
            _, total, _ = m.student_losses(batch, cls_probs, patch_probs)
            mark()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        mark()
        m.configure_gradient_clipping(self.optimizer)
        self.optimizer.step()
        mark()
        m.ema_step()
        mark()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def endless(make_loader: Callable[[], Iterable[T]]) -> Iterator[T]:
    """Batches epoch after epoch, a fresh loader from ``make_loader`` each (a small dataset runs out within
    the timed steps); e.g. ``endless(datamodule.train_dataloader)``."""
    while True:
        yield from make_loader()


def split_steps(runner: StepRunner, batches: Iterator[dict], steps: int, first_step: int) -> dict[str, float]:
    """Milliseconds per piece (``PIECES``) averaged over ``steps`` steps, synchronising after each piece;
    "data" is the wait for the next device batch."""
    times: dict[str, float] = defaultdict(float)
    for step in range(first_step, first_step + steps):
        marks = [time.perf_counter()]

        def mark(marks=marks) -> None:
            runner.sync()
            marks.append(time.perf_counter())

        batch = next(batches)
        mark()
        runner.step(batch, step, mark)
        for name, start, end in zip(PIECES, marks[:-1], marks[1:], strict=True):
            times[name] += 1000 * (end - start) / steps
    return dict(times)
