"""The GPU fast path: one config switch (``fast_path.enabled``) for the speed settings of a training run.

Each setting is numerically harmless (TF32 matmuls, fused kernels, compiled blocks) or pure waste removal
(pinned host memory, no autograd bookkeeping for the teacher). ``enabled: auto`` turns it on exactly when
training runs on CUDA, so CPU runs and the tests keep the plain path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ENABLED_VALUES = ("auto", True, False)


@dataclass(frozen=True)
class FastPath:
    """The resolved switches (all False when the fast path is off)."""

    tf32: bool
    fused_attention: bool
    fused_adamw: bool
    compile_blocks: bool
    pin_memory: bool
    teacher_inference_mode: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], accelerator: str) -> FastPath:
        """``cfg`` is the ``fast_path`` node; ``accelerator`` the trainer's (cpu | gpu | cuda | auto)."""
        enabled = cfg["enabled"]
        if enabled not in ENABLED_VALUES:
            raise ValueError(f"fast_path.enabled must be one of {ENABLED_VALUES}, got {enabled!r}")
        if enabled == "auto":
            enabled = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return cls(**{name: bool(enabled and cfg[name]) for name in cls.__dataclass_fields__})


def set_fused_attention_(model: nn.Module, enabled: bool) -> int:
    """Switch timm attention layers between ``scaled_dot_product_attention`` (flash / memory-efficient
    kernels) and the explicit softmax(QK^T)V; returns how many layers were set."""
    layers = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for layer in layers:
        layer.fused_attn = enabled
    return len(layers)


def compile_blocks_(backbone: nn.Module) -> int:
    """``torch.compile`` every transformer block in place (``nn.Module.compile``).

    Blocks, not the whole backbone: the iBOT student runs patch embedding, mask-token swap and blocks
    separately, so ``backbone.forward`` is never called. In-place compilation keeps parameter names, so
    checkpoints and exports never carry ``_orig_mod.`` prefixes.
    """
    blocks = list(backbone.blocks)
    for block in blocks:
        block.compile()
    return len(blocks)


def apply_global_switches(fast: FastPath) -> None:
    """Process-wide settings: TF32 tensor-core matmuls and convolutions."""
    if fast.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
