"""OmegaConf resolvers the configs use; importing this module registers them (idempotent)."""

from __future__ import annotations

import math

from omegaconf import OmegaConf


def _int_mul(*values: float) -> int:
    return int(math.prod(float(v) for v in values))


def _synthetic_classes() -> list[str]:
    from reddino.data.synthetic import RBC_CLASSES

    return list(RBC_CLASSES)


def _run_group(task_name: str) -> str:
    from reddino.runtime.dashboard import (
        run_group,  # imports Lightning: only when a logger config is resolved
    )

    return run_group(task_name)


def _coalesce(*values: object) -> object:
    return next((v for v in values if v is not None), None)


def register_resolvers() -> None:
    """``${int_mul:a,b}``: int(a*b), e.g. total steps = epochs x epoch length (reference rounding);
    ``${synthetic_classes:}``: the label map of the embedded synthetic data;
    ``${coalesce:a,b}``: the first non-null value (``oc.select`` returns a null value, not its default);
    ``${run_group:task}``: the W&B group, one per Hydra multirun (reddino.runtime.dashboard.run_group)."""
    if not OmegaConf.has_resolver("int_mul"):
        OmegaConf.register_new_resolver("int_mul", _int_mul)
    if not OmegaConf.has_resolver("synthetic_classes"):
        OmegaConf.register_new_resolver("synthetic_classes", _synthetic_classes)
    if not OmegaConf.has_resolver("run_group"):
        OmegaConf.register_new_resolver("run_group", _run_group)
    if not OmegaConf.has_resolver("coalesce"):
        OmegaConf.register_new_resolver("coalesce", _coalesce)


register_resolvers()
