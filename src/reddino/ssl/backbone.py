"""timm ViT backbones with DINOv2's mask token, and the masked-token forward pass iBOT needs.

The backbone IS a plain timm ``VisionTransformer`` (``*_patch14_dinov2`` architectures or a tiny
variant of them) with one extra parameter, ``mask_token`` (1, D), as in DINOv2. Its state dict is
therefore exactly the DINOv2 hub / RedDino teacher key layout (docs/reference_weights.md §2), and dropping
``mask_token`` gives the timm / Hugging Face layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

MASK_TOKEN_KEY = "mask_token"


def build_backbone(
    arch: str,
    img_size: int,
    patch_size: int,
    drop_path_rate: float,
    init_values: float | None,
    dynamic_img_size: bool,
    overrides: Mapping[str, Any] | None = None,
) -> VisionTransformer:
    """Create a randomly initialised timm ViT (no classifier) and attach a zero-initialised mask token.

    ``overrides`` passes architecture kwargs to timm (e.g. ``embed_dim``/``depth``/``num_heads`` for the
    tiny CPU model). Pretrained weights are never fetched here: loading is explicit
    (``reddino.weights.load_backbone``), so nothing downloads at run time.
    """
    model = timm.create_model(
        arch,
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
        init_values=init_values,
        dynamic_img_size=dynamic_img_size,
        **dict(overrides or {}),
    )
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{arch!r} is not a timm VisionTransformer (got {type(model).__name__})")
    if model.reg_token is not None:
        raise ValueError(f"{arch!r} has register tokens; RedDino backbones have none")
    model.register_parameter(MASK_TOKEN_KEY, nn.Parameter(torch.zeros(1, model.embed_dim)))
    return model


@dataclass
class TokenOutput:
    """Final-norm tokens of one forward pass: CLS (B, D) and patch tokens (B, N, D)."""

    cls: Tensor
    patches: Tensor


def resample_pos_embed_dinov2(
    pos_embed: Tensor, new_grid: int | tuple[int, int], offset: float = 0.0
) -> Tensor:
    """Resize a square (1, 1 + M*M, D) position embedding to (1, 1 + H*W, D), CLS position kept.

    Why these exact semantics: RedDino starts from the hub DINOv2 weights made for 518 px (M = 37) and
    resizes them ONCE to the 224 px grid (G = 16) with its ``interpolate_pos_encoding`` helper: bicubic
    ``F.interpolate`` with ``scale_factor = G / M`` (not ``size``), ``align_corners=False`` and no
    antialiasing, computed in float32 (RedDino's ``get_downloaded_dino_vit_interpolated``). Loading
    hub weights the same way keeps our 224 px model identical to RedDino's starting point.
    ``offset=0.1`` gives DINOv2's own run-time variant (``scale_factor = (G + 0.1) / M``,
    ``interpolate_offset``), which samples slightly different positions. Same size: returned unchanged,
    as DINOv2 does.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, 1 + M*M, D), got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - 1
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid (no register/extra tokens)")
    rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    if (old, old) == (rows, cols):
        return pos_embed.clone()
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    scale = ((rows + offset) / old, (cols + offset) / old)
    out = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    if tuple(out.shape[-2:]) != (rows, cols):
        raise ValueError(f"scale factor {scale} gave grid {tuple(out.shape[-2:])}, not {(rows, cols)}")
    out = out.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], out], dim=1)


# DINOv2's run-time interpolation of the position grid (``interpolate_offset``, no antialiasing); the
# released DINOv2 / RedDino weights were trained with it at every grid other than their own.
DINOV2_INTERPOLATE_OFFSET = 0.1


def add_pos_embed(model: VisionTransformer, x: Tensor) -> Tensor:
    """CLS token + position embedding for patch embeddings ``x`` (B, H, W, D) or (B, N, D).

    timm's ``_pos_embed`` with one change: at a patch grid other than the model's own (local crops, any
    other input size), the grid is resized as DINOv2 does (``resample_pos_embed_dinov2`` with
    ``scale_factor = (n + 0.1) / M``, bicubic, no antialiasing), not by timm's antialiased resize to
    the target size, so released weights see the positions they were trained with.
    """
    if model.reg_token is not None or model.no_embed_class or model.cls_token is None:
        raise ValueError("add_pos_embed expects the DINOv2 layout: a class token, no registers, embed_class")
    pos_embed = model.pos_embed
    if x.ndim == 4:
        batch, rows, cols, dim = x.shape
        if (rows, cols) != tuple(model.patch_embed.grid_size):
            pos_embed = resample_pos_embed_dinov2(pos_embed, (rows, cols), DINOV2_INTERPOLATE_OFFSET)
        x = x.reshape(batch, rows * cols, dim)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return model.pos_drop(x + pos_embed)


def forward_tokens(model: VisionTransformer, images: Tensor, masks: Tensor | None = None) -> TokenOutput:
    """Run the ViT, replacing the embeddings of masked patches by ``mask_token`` first (iBOT student).

    Masked patches are swapped before the CLS token and the position embedding are added, as in DINOv2's
    ``prepare_tokens_with_masks``. ``masks`` is (B, N) bool over the patch grid in row-major order.
    """
    x = model.patch_embed(images)
    if masks is not None:
        if masks.shape[0] != x.shape[0] or masks.shape[1] != x.shape[1:-1].numel():
            raise ValueError(
                f"masks of shape {tuple(masks.shape)} do not match patch grid {tuple(x.shape[:-1])}"
            )
        token = getattr(model, MASK_TOKEN_KEY).to(x.dtype)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        flat = torch.where(masks.unsqueeze(-1), token.unsqueeze(0), flat)
        x = flat.reshape(x.shape)
    x = add_pos_embed(model, x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    x = model.blocks(x)
    x = model.norm(x)
    return TokenOutput(cls=x[:, 0], patches=x[:, model.num_prefix_tokens :])
