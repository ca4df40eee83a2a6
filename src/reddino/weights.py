"""Backbones from our own exports: ``export/`` of a pretraining run (timm ``config.json`` +
``model.safetensors``), loaded strictly and without executing pickled code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer


@dataclass
class LoadedBackbone:
    """A backbone plus what evaluation needs to feed it: input size and normalisation."""

    model: VisionTransformer
    architecture: str
    model_args: dict[str, Any]
    input_size: int
    mean: list[float]
    std: list[float]


def build_from_config(config: dict[str, Any]) -> VisionTransformer:
    """A randomly initialised timm model of the exported architecture (the random-init baseline)."""
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["model_args"])
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{config['architecture']!r} is not a timm VisionTransformer")
    return model


def load_export(path: str | Path) -> LoadedBackbone:
    """Load ``path`` (an export folder, or its ``model.safetensors`` with ``config.json`` beside it)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "model.safetensors"
    config_file = folder / "config.json"
    for needed in (weights, config_file):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed}: missing; expected a reddino export (config.json + model.safetensors)"
            )
    config = json.loads(config_file.read_text())
    model = build_from_config(config)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: keys do not match {config['architecture']}: missing {missing}, extra {unexpected}"
        )
    pre = config["pretrained_cfg"]
    return LoadedBackbone(
        model=model.eval(),
        architecture=config["architecture"],
        model_args=dict(config["model_args"]),
        input_size=int(pre["input_size"][-1]),
        mean=list(pre["mean"]),
        std=list(pre["std"]),
    )
