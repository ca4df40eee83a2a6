"""Recipe values that depend on how much data a from-scratch run sees (docs/data_size_rule.md).

A config value ``auto`` for one of ``RULED_KEYS`` is replaced when the run starts by this rule's value for
the number of pretraining units; an explicit number is left alone. ``reddino-pretrain`` logs what it set
and writes the resolved config to the run directory, so a run never depends on the rule silently.

The anchors are lightly-train's published DINOv2 defaults by dataset size (about 1,024 prototypes at 20k
images, 4,096 at 100k, 16,384 at 200k, 65,536 beyond 500k; teacher temperature 0.02 at 20k rising toward
ImageNet's 0.07; starting teacher momentum 0.99 at 20k), interpolated log-linearly between anchors and
held constant beyond the outer ones; prototype counts are rounded to a power of two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from omegaconf import DictConfig

#: (units, prototypes): lightly-train's anchors
PROTOTYPE_ANCHORS: tuple[tuple[float, float], ...] = (
    (20e3, 1024),
    (100e3, 4096),
    (200e3, 16384),
    (500e3, 65536),
)
#: (units, teacher temperature): 0.02 for small datasets, ImageNet-1k's 0.07 at 1.28M images
TEACHER_TEMP_ANCHORS: tuple[tuple[float, float], ...] = ((20e3, 0.02), (1.28e6, 0.07))
#: (units, starting teacher momentum): 0.99 at 20k, DINO's ImageNet 0.996 at 1.28M
MOMENTUM_ANCHORS: tuple[tuple[float, float], ...] = ((20e3, 0.99), (1.28e6, 0.996))
MIN_PROTOTYPES = 256

RULED_KEYS = (
    "ssl.head.n_prototypes",
    "ssl.head.ibot_n_prototypes",
    "ssl.teacher.teacher_temp",
    "ssl.teacher.warmup_teacher_temp",
    "ssl.teacher.momentum_teacher",
)
AUTO = "auto"


def _log_interpolate(n: float, anchors: Sequence[tuple[float, float]]) -> float:
    """Piecewise linear in log(units); constant outside the anchors."""
    if n <= anchors[0][0]:
        return anchors[0][1]
    for (x0, y0), (x1, y1) in pairwise(anchors):
        if n <= x1:
            t = (math.log(n) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return anchors[-1][1]


def prototypes_for(n_units: int) -> int:
    """Prototypes for a run over ``n_units`` units: log-log between the anchors, extrapolated below the
    first with the first segment's slope (floor ``MIN_PROTOTYPES``), rounded to a power of two."""
    (x0, y0), (x1, y1) = PROTOTYPE_ANCHORS[0], PROTOTYPE_ANCHORS[1]
    if n_units < x0:
        slope = math.log(y1 / y0) / math.log(x1 / x0)
        value = y0 * (n_units / x0) ** slope
    else:
        logs = [(x, math.log(y)) for x, y in PROTOTYPE_ANCHORS]
        value = math.exp(_log_interpolate(n_units, logs))
    return max(MIN_PROTOTYPES, 2 ** round(math.log2(value)))


def teacher_temp_for(n_units: int) -> float:
    return round(_log_interpolate(n_units, TEACHER_TEMP_ANCHORS), 4)


def momentum_for(n_units: int) -> float:
    return round(_log_interpolate(n_units, MOMENTUM_ANCHORS), 4)


def ruled_values(n_units: int) -> dict[str, Any]:
    """What the rule gives every key of ``RULED_KEYS`` for ``n_units`` units."""
    if n_units < 1:
        raise ValueError(f"the data-size rule needs at least one pretraining unit, got {n_units}")
    k, temp = prototypes_for(n_units), teacher_temp_for(n_units)
    return {
        "ssl.head.n_prototypes": k,
        "ssl.head.ibot_n_prototypes": k,
        "ssl.teacher.teacher_temp": temp,
        "ssl.teacher.warmup_teacher_temp": temp,
        "ssl.teacher.momentum_teacher": momentum_for(n_units),
    }


def apply_data_size_rule(cfg: DictConfig, n_units: int) -> dict[str, Any]:
    """Replace every ``auto`` among ``RULED_KEYS`` in ``cfg`` (in place); returns what was set."""
    ruled = ruled_values(n_units)
    applied = {}
    for key, value in ruled.items():
        section, _, leaf = key.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = node[part]
        if node[leaf] == AUTO:
            node[leaf] = value
            applied[key] = value
    return applied
