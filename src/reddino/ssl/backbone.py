"""timm ViT backbones with DINOv2's mask token, and the masked-token forward pass iBOT needs.

The backbone IS a plain timm ``VisionTransformer`` (``*_patch14_dinov2`` architectures or a tiny
variant of them) with one extra parameter, ``mask_token`` (1, D), as in DINOv2. Its state dict is
therefore exactly the DINOv2 hub / RedDino teacher key layout (REFERENCE.md 6.1), and dropping
``mask_token`` gives the timm / Hugging Face layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
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
    tiny CPU model). Pretrained weights are never fetched here: loading is explicit (see ``load_backbone``
    in a later module) so nothing downloads at run time.
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
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    x = model.blocks(x)
    x = model.norm(x)
    return TokenOutput(cls=x[:, 0], patches=x[:, model.num_prefix_tokens :])


def embed_dim(model: VisionTransformer) -> int:
    """Feature dimension of the CLS token."""
    return int(model.embed_dim)


def timm_state_dict(model: VisionTransformer) -> dict[str, Tensor]:
    """Backbone weights under timm key names (no mask token), ready for ``timm.create_model`` loading."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != MASK_TOKEN_KEY}
