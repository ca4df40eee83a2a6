"""Backbones from our own runs: the ``export/`` folder (timm ``config.json`` + ``model.safetensors``) or a
Lightning checkpoint (``checkpoints/*.ckpt``, whose run directory holds ``config.yaml``). Keys are
checked strictly and nothing pickled is executed (safetensors, ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
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


TEACHER_PREFIX = "teacher.backbone."


def load_lightning_checkpoint(path: str | Path) -> LoadedBackbone:
    """The teacher backbone of a pretraining checkpoint, built from the run's ``config.yaml``."""
    path = Path(path)
    config_file = path.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; a checkpoint is read with its run's config.yaml")
    cfg = OmegaConf.load(config_file)
    model = instantiate(cfg.model)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {
        k[len(TEACHER_PREFIX) :]: v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(TEACHER_PREFIX)
    }
    if not state:
        raise ValueError(f"{path}: no '{TEACHER_PREFIX}*' keys; not a reddino pretraining checkpoint")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not match the run's model: missing {missing}, extra {unexpected}")
    args = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k not in ("_target_", "arch")}
    args.update(args.pop("overrides") or {})
    return LoadedBackbone(
        model=model.eval(),
        architecture=cfg.model.arch,
        model_args=args,
        input_size=int(cfg.model.img_size),
        mean=list(cfg.augment.mean),
        std=list(cfg.augment.std),
    )


def load_backbone(path: str | Path) -> LoadedBackbone:
    """Any backbone file of ours: an export folder / ``.safetensors``, or a Lightning ``.ckpt``."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return load_lightning_checkpoint(path)
    return load_export(path)
