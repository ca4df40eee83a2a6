"""Released DINOv2-layout weights (DINOv2 hub state dicts, DinoBloom teacher checkpoints) as timm ViTs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from reddino.ssl.backbone import resample_pos_embed_dinov2
from reddino.weights.files import load_torch_file, read_state
from reddino.weights.formats import backbone_from_teacher
from reddino.weights.loaded import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RELEASE_IMG_SIZE,
    LoadedBackbone,
    build_from_config,
    load_strict,
)

# embed_dim -> (timm architecture, depth, num_heads) of the standard DINOv2 sizes
STANDARD_SIZES: dict[int, tuple[str, int, int]] = {
    384: ("vit_small_patch14_dinov2", 12, 6),
    768: ("vit_base_patch14_dinov2", 12, 12),
    1024: ("vit_large_patch14_dinov2", 24, 16),
    1536: ("vit_giant_patch14_dinov2", 40, 24),
}


def _depth(state: Mapping[str, Tensor]) -> int:
    """Number of transformer blocks, from ``blocks.<i>.`` key names (unchunked, as the hub uses)."""
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"block indices {sorted(indices)} are not 0..N-1 (chunked blocks are not supported)")
    return len(indices)


def infer_model_args(
    state: Mapping[str, Tensor], model_args: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """timm architecture and kwargs (224 px) for a DINOv2-layout state dict.

    embed_dim, depth and mlp_ratio are read from the tensors; num_heads cannot be (qkv is (3D, D) for
    any head count), so it comes from the standard S/B/L/g table, or ``model_args`` for other sizes.
    ``model_args`` overrides anything inferred.
    """
    extra = dict(model_args or {})
    dim = int(state["cls_token"].shape[-1])
    if "blocks.0.mlp.fc1.weight" not in state:
        raise ValueError(
            "no 'blocks.0.mlp.fc1.weight' (or SwiGLU 'blocks.0.mlp.w12.weight'): not a DINOv2 ViT state dict"
        )
    depth = _depth(state)
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    swiglu = _is_swiglu(state)
    default_arch = STANDARD_SIZES[1536 if swiglu else 384][0]  # the giant arch carries timm's SwiGLUPacked
    arch, std_depth, std_heads = STANDARD_SIZES.get(dim, (default_arch, -1, -1))
    if swiglu != (arch == STANDARD_SIZES[1536][0]):
        raise ValueError(
            f"embed_dim {dim} with {'a SwiGLU' if swiglu else 'a plain'} MLP is not a DINOv2 layout"
        )
    # timm's giant keeps DINOv2's packed SwiGLU: fc1 = w12 (2 x 4096 rows for 1536-d)
    std_hidden = 8192 if swiglu else 4 * dim
    args: dict[str, Any] = {
        "img_size": RELEASE_IMG_SIZE,
        "patch_size": int(state["patch_embed.proj.weight"].shape[-1]),
        "init_values": 1.0,  # LayerScale present; its gammas come from the checkpoint
        "dynamic_img_size": False,
    }
    if depth != std_depth or "num_heads" in extra or hidden != std_hidden:
        if "num_heads" not in extra and std_heads < 0:
            raise ValueError(
                f"embed_dim {dim} is not a standard DINOv2 size; pass model_args={{'num_heads': ...}}"
            )
        args.update(embed_dim=dim, depth=depth, num_heads=std_heads, mlp_ratio=hidden / dim)
    args.update(extra)
    return arch, args


def _is_swiglu(state: Mapping[str, Tensor]) -> bool:
    """True for ViT-g layouts after ``timm_mlp_keys``: fc1 rows = 2 x fc2 columns (packed gate + value)."""
    fc1, fc2 = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc2.weight"]
    return int(fc1.shape[0]) == 2 * int(fc2.shape[1])


def timm_mlp_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """DINOv2's SwiGLU names (ViT-g ``mlp.w12`` / ``mlp.w3``) -> timm's ``mlp.fc1`` / ``mlp.fc2``.

    Same tensors, no repacking: DINOv2 computes ``silu(x1) * x2`` with ``x1, x2 = w12(x).chunk(2)`` and timm's
    ``SwiGLUPacked`` (``GluMlp``, ``gate_last=False``) computes ``silu(x1) * x2`` on ``fc1(x).chunk(2)``.
    """
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"(blocks\.\d+\.mlp\.)(w12|w3)(\.(?:weight|bias))", key)
        renamed[f"{match[1]}{'fc1' if match[2] == 'w12' else 'fc2'}{match[3]}" if match else key] = value
    return renamed


def load_dinov2_state_dict(
    state: Mapping[str, Tensor], source: Path | str, model_args: Mapping[str, Any] | None = None
) -> LoadedBackbone:
    """A DINOv2-layout backbone state dict -> timm ViT at 224 px, position grid resampled as RedDino does."""
    state = timm_mlp_keys(state)
    arch, args = infer_model_args(state, model_args)
    model = build_from_config({"architecture": arch, "model_args": args})
    grid = int(args["img_size"]) // int(args["patch_size"])
    state["pos_embed"] = resample_pos_embed_dinov2(state["pos_embed"], grid)
    load_strict(model, state, source)
    return LoadedBackbone(
        model=model.eval(),
        architecture=arch,
        model_args=args,
        input_size=int(args["img_size"]),
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
    )


def load_dinov2_hub(path: str | Path, model_args: Mapping[str, Any] | None = None) -> LoadedBackbone:
    """A DINOv2 hub state dict (``dinov2_vit{s,b,l}14`` weights, 37x37 grid for 518 px)."""
    path = Path(path)
    return load_dinov2_state_dict(read_state(path), path, model_args)


def load_dinobloom(path: str | Path, model_args: Mapping[str, Any] | None = None) -> LoadedBackbone:
    """A DinoBloom ``.pth``: the teacher backbone only; its DINO/iBOT heads are deliberately ignored."""
    path = Path(path)
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("teacher"), Mapping):
        raise ValueError(f"{path}: no 'teacher' dict; not a DinoBloom checkpoint")
    return load_dinov2_state_dict(backbone_from_teacher(checkpoint["teacher"]), path, model_args)
