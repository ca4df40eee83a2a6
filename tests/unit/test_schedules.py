"""Closed-form schedules against an array implementation written like the reference CosineScheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reddino.ssl.schedules import (
    SSLSchedules,
    cosine_schedule,
    epochs_to_steps,
    linear_warmup_then_constant,
    scale_lr,
)


class ArraySchedule:
    """The reference construction: zeros, np.linspace warmup, cosine; final value past the end."""

    def __init__(self, base, final, total, warmup=0, start_warmup=0.0, freeze=0):
        freeze_part = np.zeros(freeze)
        warmup_part = np.linspace(start_warmup, base, warmup)
        iters = np.arange(total - warmup - freeze)
        cosine_part = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
        self.schedule = np.concatenate((freeze_part, warmup_part, cosine_part))
        assert len(self.schedule) == total
        self.total, self.final = total, final

    def __getitem__(self, step):
        return self.final if step >= self.total else self.schedule[step]


def check_all_steps(fn, ref, total, extra=5):
    for step in range(total + extra):
        assert fn(step) == pytest.approx(float(ref[step]), rel=1e-12, abs=1e-15), f"step {step}"


@pytest.mark.parametrize(
    ("total", "warmup", "freeze", "start"),
    [(50, 7, 3, 0.0), (50, 0, 0, 0.0), (50, 1, 0, 0.3), (50, 2, 0, 0.1), (20, 0, 5, 0.0), (12, 12, 0, 0.2)],
)
def test_cosine_schedule_matches_array_at_every_step(total, warmup, freeze, start):
    ref = ArraySchedule(1.5, 0.01, total, warmup, start, freeze)

    def fn(step):
        return cosine_schedule(
            step,
            base_value=1.5,
            final_value=0.01,
            total_steps=total,
            warmup_steps=warmup,
            start_warmup_value=start,
            freeze_steps=freeze,
        )

    check_all_steps(fn, ref, total)


def test_cosine_schedule_key_points():
    kw = dict(
        base_value=1.0,
        final_value=0.1,
        total_steps=30,
        warmup_steps=10,
        start_warmup_value=0.0,
        freeze_steps=5,
    )
    assert cosine_schedule(0, **kw) == 0.0
    assert cosine_schedule(4, **kw) == 0.0  # last frozen step
    assert cosine_schedule(5, **kw) == 0.0  # first warmup step = start_warmup_value
    assert cosine_schedule(14, **kw) == 1.0  # warmup endpoint included
    assert cosine_schedule(15, **kw) == 1.0  # cosine starts at base
    assert 0.1 < cosine_schedule(29, **kw) < 0.11  # never reaches final inside the run
    assert cosine_schedule(30, **kw) == 0.1
    assert cosine_schedule(10**9, **kw) == 0.1


def test_cosine_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        cosine_schedule(-1, base_value=1.0, final_value=0.0, total_steps=10)
    with pytest.raises(ValueError):
        cosine_schedule(0, base_value=1.0, final_value=0.0, total_steps=10, warmup_steps=8, freeze_steps=3)


@pytest.mark.parametrize(("warmup", "total"), [(30, 40), (1, 5), (0, 5), (40, 30)])
def test_linear_warmup_then_constant_matches_array(warmup, total):
    rest = max(total - warmup, 0)
    ref = np.concatenate((np.linspace(0.04, 0.07, warmup), np.ones(rest) * 0.07))
    for step in range(total + 10):
        expected = float(ref[step]) if step < len(ref) else 0.07
        got = linear_warmup_then_constant(step, start=0.04, end=0.07, warmup_steps=warmup)
        assert got == pytest.approx(expected, rel=1e-12), f"step {step}"


def test_scale_lr_rules_and_reddino_values():
    assert f"{scale_lr(2e-4, 280, 'sqrt_wrt_1024'):.3e}" == "1.046e-04"  # RedDino-S, 1 GPU
    assert f"{scale_lr(2e-4, 196, 'sqrt_wrt_1024'):.3e}" == "8.750e-05"  # RedDino-B, 1 GPU
    assert f"{scale_lr(2e-4, 560, 'sqrt_wrt_1024'):.3e}" == "1.479e-04"  # RedDino-S, 2 GPU
    assert scale_lr(0.004, 1024, "sqrt_wrt_1024") == pytest.approx(0.004)
    assert scale_lr(1e-3, 512, "linear_wrt_256") == pytest.approx(2e-3)
    assert scale_lr(1e-3, 512, "none") == 1e-3
    with pytest.raises(ValueError, match="unknown lr scaling rule"):
        scale_lr(1e-3, 512, "cubic")


def test_epochs_to_steps_truncates_like_the_reference():
    assert epochs_to_steps(0.1, 3200) == 320
    assert epochs_to_steps(30, 3200) == 96000
    assert epochs_to_steps(0, 3200) == 0
    assert epochs_to_steps(0.5, 3) == 1


def build(**overrides) -> SSLSchedules:
    cfg = dict(
        total_steps=60,
        epoch_length=10,
        lr=1e-3,
        min_lr=1e-6,
        warmup_epochs=0.8,
        weight_decay=0.04,
        weight_decay_end=0.2,
        momentum_teacher=0.994,
        final_momentum_teacher=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=3,
        freeze_last_layer_epochs=1.5,
        freeze_backbone_epochs=0,
        backbone_lr_mult=1.0,
    )
    cfg.update(overrides)
    return SSLSchedules.from_config(**cfg)


def test_ssl_schedules_match_reference_arrays():
    s = build()
    total, epoch = 60, 10
    lr_ref = ArraySchedule(1e-3, 1e-6, total, warmup=8, start_warmup=0.0)
    last_ref = ArraySchedule(1e-3, 1e-6, total, warmup=8, start_warmup=0.0)
    last_ref.schedule[: int(1.5 * epoch)] = 0
    wd_ref = ArraySchedule(0.04, 0.2, total)
    mom_ref = ArraySchedule(0.994, 1.0, total)
    temp_ref = ArraySchedule(0.07, 0.07, 3 * epoch, warmup=3 * epoch, start_warmup=0.04)
    check_all_steps(s.lr, lr_ref, total)
    check_all_steps(s.last_layer_lr, last_ref, total)
    check_all_steps(s.weight_decay, wd_ref, total)
    check_all_steps(s.momentum, mom_ref, total)
    check_all_steps(s.teacher_temp, temp_ref, total)
    assert s.last_layer_lr(14) == 0.0 and s.last_layer_lr(15) == s.lr(15) > 0


def test_ssl_schedules_values_dict():
    s = build()
    values = s.values(20)
    assert set(values) == {"lr", "last_layer_lr", "backbone_lr", "weight_decay", "momentum", "teacher_temp"}
    assert values["lr"] == s.lr(20) and values["momentum"] == s.momentum(20)
    assert values["teacher_temp"] == s.teacher_temp(20) and values["weight_decay"] == s.weight_decay(20)


def test_ssl_schedules_are_pure_functions_of_step():
    a, b = build(), build()
    forward = [a.values(step) for step in range(60)]
    backward = [b.values(step) for step in reversed(range(60))][::-1]
    assert forward == backward


def test_ssl_schedules_reject_warmup_longer_than_run():
    with pytest.raises(ValueError):
        build(warmup_epochs=7)


def test_reddino_small_run():
    """RedDino-S on 1 GPU: 10 epochs x 3200 steps, warmup 0.1 epoch, teacher-temp warmup 30 epochs."""
    lr = scale_lr(2e-4, 280, "sqrt_wrt_1024")
    s = SSLSchedules.from_config(
        total_steps=32000,
        epoch_length=3200,
        lr=lr,
        min_lr=1e-6,
        warmup_epochs=0.1,
        weight_decay=0.04,
        weight_decay_end=0.2,
        momentum_teacher=0.994,
        final_momentum_teacher=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
        freeze_last_layer_epochs=0,
        freeze_backbone_epochs=0,
        backbone_lr_mult=1.0,
    )
    assert s.warmup_steps == 320 and s.teacher_temp_warmup_steps == 96000
    assert s.lr(0) == 0.0 and s.last_layer_lr(0) == 0.0
    assert s.lr(319) == pytest.approx(lr) and s.lr(320) == pytest.approx(lr)
    assert s.last_layer_lr(1) == s.lr(1) > 0  # freeze_last_layer_epochs 0: never frozen
    assert s.lr(31999) == pytest.approx(1e-6, rel=1e-2)
    assert s.teacher_temp(0) == pytest.approx(0.04)
    assert s.teacher_temp(31999) == pytest.approx(0.04 + 0.03 * 32000 / 96000, abs=1e-6)
    assert s.teacher_temp(31999) < 0.051  # never reaches 0.07 in a RedDino run
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(32000) == 0.2
    assert s.momentum(0) == pytest.approx(0.994) and s.momentum(16000) == pytest.approx(0.997)
    assert math.isclose(s.momentum(40000), 1.0)


def test_backbone_lr_is_zero_while_frozen_then_ramps_in():
    s = build(freeze_backbone_epochs=2)  # 20 frozen steps of 60, warmup 8
    assert all(s.backbone_lr(t) == 0.0 for t in range(20)) and s.lr(10) > 0
    assert s.backbone_lr(20) == pytest.approx(s.lr(20) / 8)
    assert s.backbone_lr(23) == pytest.approx(s.lr(23) * 4 / 8)
    assert all(s.backbone_lr(t) == pytest.approx(s.lr(t)) for t in range(27, 60))
    assert build().backbone_lr(5) == build().lr(5)  # no warm-up: the backbone follows lr
    assert s.values(3)["backbone_lr"] == 0.0
    slow = build(freeze_backbone_epochs=2, backbone_lr_mult=0.25)
    assert slow.backbone_lr(40) == pytest.approx(0.25 * slow.lr(40)) and slow.lr(40) == s.lr(40)
    with pytest.raises(ValueError, match="freeze_backbone_epochs"):
        build(freeze_backbone_epochs=6)  # the whole run frozen
