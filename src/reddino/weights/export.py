"""Export a trained teacher backbone as timm-loadable safetensors plus its model config (the layout
``load_export`` reads back), and the feature whitening fitted for it (``whitening.safetensors``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from reddino.eval.whitening import FeatureWhitening
from reddino.ssl.backbone import MASK_TOKEN_KEY

WHITENING_KEY = "reddino_feature_whitening"  # config.json entry; timm ignores keys it does not know
WHITENING_FILE = "whitening.safetensors"


def timm_state_dict(model: VisionTransformer) -> dict[str, Tensor]:
    """Backbone weights under timm key names (no mask token), ready for ``timm.create_model`` loading."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != MASK_TOKEN_KEY}


def export_timm(
    backbone: VisionTransformer,
    out_dir: str | Path,
    arch: str,
    model_args: Mapping[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    whitening: FeatureWhitening | None = None,
) -> Path:
    """Write ``model.safetensors`` (timm key names, no mask token) and ``config.json`` in the Hugging Face
    timm layout (architecture, num_features, model_args, pretrained_cfg with input size and normalisation).

    ``whitening``: written to ``whitening.safetensors`` and named in ``config.json``; the weights stay a
    plain timm model (a timm user gets the raw CLS, reddino's loaders the whitened one).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in timm_state_dict(backbone).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "producer": "reddino"})
    size = int(backbone.patch_embed.img_size[0])
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": int(backbone.num_features),
        "global_pool": "token",
        "model_args": dict(model_args),
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "fixed_input_size": not getattr(backbone, "dynamic_img_size", False),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
        },
    }
    if whitening is not None:
        if whitening.dim != int(backbone.num_features):
            raise ValueError(f"whitening is {whitening.dim}-d, the backbone's CLS {backbone.num_features}-d")
        save_file(
            {"mean": whitening.mean.contiguous().cpu(), "transform": whitening.transform.contiguous().cpu()},
            str(out / WHITENING_FILE),
            metadata={"format": "pt", "producer": "reddino"},
        )
        config[WHITENING_KEY] = {
            "file": WHITENING_FILE,
            "applies_to": "cls",
            "shrinkage": whitening.shrinkage,
            "fitted_on": whitening.fitted_on,
        }
    else:
        (out / WHITENING_FILE).unlink(missing_ok=True)  # a re-export must not keep a stale one
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out / "model.safetensors"
