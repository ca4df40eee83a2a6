"""Optimiser parameter groups with DINOv2's per-parameter lr / wd multipliers, fused into few groups.

The multipliers are fixed at build time; the step-dependent lr and weight decay are written into every
group each step by `apply_schedules_` (the reference `apply_optim_scheduler`).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from torch.optim import Optimizer

from reddino.ssl.heads import is_last_layer_param

_EMBEDDING_KEYS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens", "reg_token")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_FUSE_KEYS = ("lr_multiplier", "wd_multiplier", "is_last_layer", "is_backbone")


def layer_id(name: str, n_blocks: int) -> int:
    """0 for the token/patch embeddings, i+1 for transformer block i, n_blocks+1 for the rest."""
    if any(key in name for key in _EMBEDDING_KEYS):
        return 0
    match = _BLOCK_RE.search(name)
    if match is not None:
        return int(match.group(1)) + 1
    return n_blocks + 1


def wd_multiplier(name: str) -> float:
    """No weight decay on biases, norms and LayerScale gammas."""
    return 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0


def lr_multiplier(name: str, *, patch_embed_lr_mult: float, layerwise_decay: float, n_blocks: int) -> float:
    mult = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
    if "patch_embed" in name:
        mult *= patch_embed_lr_mult
    return mult


def build_param_groups(
    model: nn.Module, *, patch_embed_lr_mult: float, layerwise_decay: float, n_blocks: int
) -> list[dict[str, Any]]:
    """One group per distinct (lr_multiplier, wd_multiplier, is_last_layer, is_backbone), in first-seen
    order.

    Each group has keys params, lr_multiplier, wd_multiplier, is_last_layer, is_backbone, names. Frozen
    parameters (requires_grad False) are left out.
    """
    fused: dict[tuple[float, float, bool, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (
            lr_multiplier(
                name,
                patch_embed_lr_mult=patch_embed_lr_mult,
                layerwise_decay=layerwise_decay,
                n_blocks=n_blocks,
            ),
            wd_multiplier(name),
            is_last_layer_param(name),
            name.startswith("backbone."),
        )
        group = fused.setdefault(key, {"params": [], "names": [], **dict(zip(_FUSE_KEYS, key, strict=True))})
        group["params"].append(param)
        group["names"].append(name)
    return list(fused.values())


def apply_schedules_(
    optimizer: Optimizer, *, lr: float, weight_decay: float, last_layer_lr: float, backbone_lr: float
) -> None:
    """Write this step's lr and weight decay into every group, scaled by the group's multipliers: the
    prototype layer follows ``last_layer_lr``, the backbone ``backbone_lr`` (the head warm-up)."""
    for group in optimizer.param_groups:
        if group["is_last_layer"]:
            base = last_layer_lr
        elif group["is_backbone"]:
            base = backbone_lr
        else:
            base = lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
