"""What every loader returns, and the pieces they share: a strict key check and building a timm model from
a (possibly foreign) config of plain values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from reddino.eval.whitening import FeatureWhitening
from reddino.run_specs import ARCH_NAME, UntrustedConfigError, plain_value

IMAGENET_MEAN = [0.485, 0.456, 0.406]


IMAGENET_STD = [0.229, 0.224, 0.225]


RELEASE_IMG_SIZE = 224  # RedDino and DinoBloom are used at 224 px (docs/reference_weights.md §1, §5)


# DINOv2/teacher checkpoints have it, timm models do not (docs/reference_weights.md §2)
OPTIONAL_KEYS = ("mask_token",)


@dataclass
class LoadedBackbone:
    """A backbone plus what evaluation needs to feed it (input size, normalisation) and, for our own
    exports, the whitening of its CLS features (None: raw CLS)."""

    model: VisionTransformer
    architecture: str
    model_args: dict[str, Any]
    input_size: int
    mean: list[float]
    std: list[float]
    whitening: FeatureWhitening | None = None


def build_from_config(config: dict[str, Any]) -> VisionTransformer:
    """A randomly initialised timm model of the exported architecture (the random-init baseline).

    ``config`` may come from a file someone shared (``config.json``): the architecture must be a
    registered timm name and the arguments plain values, so nothing in it names code to run.
    """
    arch = config["architecture"]
    if not isinstance(arch, str) or not ARCH_NAME.fullmatch(arch) or arch not in timm.list_models(arch):
        raise UntrustedConfigError(f"architecture {arch!r}: not a registered timm architecture name")
    args = plain_value(dict(config["model_args"]), "model_args")
    model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{config['architecture']!r} is not a timm VisionTransformer")
    return model


def load_strict(model: VisionTransformer, state: Mapping[str, Tensor], source: Path | str) -> None:
    """Load with every key accounted for; ``mask_token`` may be absent on either side (timm models
    have none, released backbones may lack it) and is loaded when both have it."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in missing if k not in OPTIONAL_KEYS]
    unexpected = [k for k in unexpected if k not in OPTIONAL_KEYS]
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match the timm model: missing {missing}, unexpected {unexpected}"
        )
