"""Training schedules as pure functions of the global step.

They reproduce the arrays built by the DINOv2 `CosineScheduler` (freeze zeros, linspace warmup with both
endpoints, cosine over the rest, final value past the end) in closed form, so resuming from a checkpoint
only needs the step counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def _linspace_value(i: int, *, start: float, stop: float, num: int) -> float:
    """Element i of np.linspace(start, stop, num) (endpoint included), same arithmetic as numpy."""
    if num == 1:
        return start
    if i == num - 1:
        return stop  # numpy writes the endpoint exactly
    return i * ((stop - start) / (num - 1)) + start


def cosine_schedule(
    step: int,
    *,
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
    freeze_steps: int = 0,
) -> float:
    """Value at `step` of freeze (0) -> linear warmup -> cosine decay from base to final."""
    _check_step(step)
    if warmup_steps < 0 or freeze_steps < 0:
        raise ValueError(f"warmup_steps and freeze_steps must be >= 0, got {warmup_steps}, {freeze_steps}")
    if freeze_steps + warmup_steps > total_steps:
        raise ValueError(
            f"freeze_steps ({freeze_steps}) + warmup_steps ({warmup_steps}) > total_steps ({total_steps})"
        )
    if step >= total_steps:
        return float(final_value)
    if step < freeze_steps:
        return 0.0
    if step < freeze_steps + warmup_steps:
        i = step - freeze_steps
        return float(_linspace_value(i, start=start_warmup_value, stop=base_value, num=warmup_steps))
    i = step - freeze_steps - warmup_steps
    n = total_steps - warmup_steps - freeze_steps
    return float(final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / n)))


def linear_warmup_then_constant(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """np.linspace(start, end, warmup_steps) followed by `end` forever (teacher temperature)."""
    _check_step(step)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step >= warmup_steps:
        return float(end)
    return float(_linspace_value(step, start=start, stop=end, num=warmup_steps))


def scale_lr(base_lr: float, total_batch_size: int, rule: str) -> float:
    """Learning rate for the global batch size under the reference scaling rules."""
    if total_batch_size <= 0:
        raise ValueError(f"total_batch_size must be > 0, got {total_batch_size}")
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * total_batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; expected one of {_SCALING_RULES}")


def epochs_to_steps(epochs: float, epoch_length: int) -> int:
    """Epoch counts in the config become step counts by truncation, as in the reference."""
    return int(epochs * epoch_length)


@dataclass(frozen=True)
class SSLSchedules:
    """All per-step hyper-parameters of one SSL run (lr, last-layer lr, wd, EMA momentum, teacher temp)."""

    total_steps: int
    base_lr: float
    min_lr: float
    warmup_steps: int
    weight_decay_start: float
    weight_decay_end: float
    momentum_start: float
    momentum_end: float
    teacher_temp_start: float
    teacher_temp_end: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    freeze_backbone_steps: int
    backbone_lr_mult: float

    @classmethod
    def from_config(
        cls,
        *,
        total_steps: int,
        epoch_length: int,
        lr: float,
        min_lr: float,
        warmup_epochs: float,
        weight_decay: float,
        weight_decay_end: float,
        momentum_teacher: float,
        final_momentum_teacher: float,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: float,
        freeze_last_layer_epochs: float,
        freeze_backbone_epochs: float,
        backbone_lr_mult: float,
    ) -> SSLSchedules:
        """Build from config values; `lr` is the already batch-scaled peak learning rate."""
        if total_steps <= 0 or epoch_length <= 0:
            raise ValueError(f"total_steps and epoch_length must be > 0, got {total_steps}, {epoch_length}")
        schedules = cls(
            total_steps=int(total_steps),
            base_lr=float(lr),
            min_lr=float(min_lr),
            warmup_steps=epochs_to_steps(warmup_epochs, epoch_length),
            weight_decay_start=float(weight_decay),
            weight_decay_end=float(weight_decay_end),
            momentum_start=float(momentum_teacher),
            momentum_end=float(final_momentum_teacher),
            teacher_temp_start=float(warmup_teacher_temp),
            teacher_temp_end=float(teacher_temp),
            teacher_temp_warmup_steps=epochs_to_steps(warmup_teacher_temp_epochs, epoch_length),
            freeze_last_layer_steps=epochs_to_steps(freeze_last_layer_epochs, epoch_length),
            freeze_backbone_steps=epochs_to_steps(freeze_backbone_epochs, epoch_length),
            backbone_lr_mult=float(backbone_lr_mult),
        )
        if not 0 <= schedules.freeze_backbone_steps < schedules.total_steps:
            raise ValueError(
                f"ssl.optim.freeze_backbone_epochs gives {schedules.freeze_backbone_steps} frozen steps; "
                f"it must leave training steps in a {schedules.total_steps}-step run"
            )
        schedules.lr(0)  # fail at build time if warmup does not fit in the run
        return schedules

    def lr(self, step: int) -> float:
        return cosine_schedule(
            step,
            base_value=self.base_lr,
            final_value=self.min_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            start_warmup_value=0.0,
        )

    def last_layer_lr(self, step: int) -> float:
        """Same as `lr` but 0 while the DINO head's last layer is frozen (the reference zeroes the array)."""
        if step < self.freeze_last_layer_steps and step < self.total_steps:
            _check_step(step)
            return 0.0
        return self.lr(step)

    def backbone_lr(self, step: int) -> float:
        """The head warm-up: 0 while the backbone is frozen (the heads learn targets of the features the
        run starts from), then `lr` x ``backbone_lr_mult`` ramped in linearly over the warmup length, so
        the backbone does not meet the full rate the step it wakes up."""
        _check_step(step)
        if step < self.freeze_backbone_steps:
            return 0.0
        lr = self.lr(step) * self.backbone_lr_mult
        if self.freeze_backbone_steps == 0:
            return lr
        ramp = (step - self.freeze_backbone_steps + 1) / max(1, self.warmup_steps)
        return lr * min(1.0, ramp)

    def weight_decay(self, step: int) -> float:
        return cosine_schedule(
            step,
            base_value=self.weight_decay_start,
            final_value=self.weight_decay_end,
            total_steps=self.total_steps,
        )

    def momentum(self, step: int) -> float:
        return cosine_schedule(
            step,
            base_value=self.momentum_start,
            final_value=self.momentum_end,
            total_steps=self.total_steps,
        )

    def teacher_temp(self, step: int) -> float:
        return linear_warmup_then_constant(
            step,
            start=self.teacher_temp_start,
            end=self.teacher_temp_end,
            warmup_steps=self.teacher_temp_warmup_steps,
        )

    def values(self, step: int) -> dict[str, float]:
        """Everything at `step`, for applying and logging."""
        return {
            "lr": self.lr(step),
            "last_layer_lr": self.last_layer_lr(step),
            "backbone_lr": self.backbone_lr(step),
            "weight_decay": self.weight_decay(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }
