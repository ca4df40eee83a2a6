"""Backbones from our own runs and from released weights, as a timm ``VisionTransformer``.

Formats (``detect_format``): our ``export/`` folder (timm ``config.json`` + ``model.safetensors``), a
Lightning checkpoint (``checkpoints/*.ckpt``, whose run directory holds ``config.yaml``), a Hugging Face
timm folder (the RedDino releases), a DinoBloom ``.pth`` (``{"teacher": {backbone.*, heads}}``), a DINOv2
hub state dict, and ``hf_hub:`` ids. Keys are checked strictly and nothing pickled is executed
(safetensors, ``torch.load(weights_only=True)``).

One home, one module a job: ``loaded`` (what a loader returns, the strict key check), ``files`` (reading
weight files safely), ``formats`` (which loader a path needs), ``loaders`` (our runs, timm folders,
``load_backbone``), ``dinov2_layout`` (released DINOv2 / DinoBloom weights), ``hub`` (``hf_hub:`` ids,
the only network access) and ``export`` (writing our export folder).
"""

from reddino.weights.dinov2_layout import infer_model_args, load_dinobloom, load_dinov2_hub, timm_mlp_keys
from reddino.weights.export import export_timm, timm_state_dict
from reddino.weights.formats import FORMATS, detect_format
from reddino.weights.hub import HubUnavailableError, load_hf_hub
from reddino.weights.loaded import LoadedBackbone, build_from_config
from reddino.weights.loaders import (
    init_backbone_,
    load_backbone,
    load_export,
    load_lightning_checkpoint,
    load_timm_hf_folder,
)

__all__ = [
    "FORMATS",
    "HubUnavailableError",
    "LoadedBackbone",
    "build_from_config",
    "detect_format",
    "export_timm",
    "infer_model_args",
    "init_backbone_",
    "load_backbone",
    "load_dinobloom",
    "load_dinov2_hub",
    "load_export",
    "load_hf_hub",
    "load_lightning_checkpoint",
    "load_timm_hf_folder",
    "timm_mlp_keys",
    "timm_state_dict",
]
