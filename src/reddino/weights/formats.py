"""Which loader a path needs, decided from the files themselves (``detect_format``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from reddino.weights.files import load_torch_file, open_safetensors, safetensors_metadata

FORMATS = ("reddino_export", "lightning_ckpt", "timm_hf", "dinobloom", "dinov2_hub", "hf_hub")


HUB_PREFIX = "hf_hub:"


TEACHER_PREFIX = "teacher.backbone."


DINOBLOOM_BACKBONE_PREFIX = "backbone."


HUB_REQUIRED_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")


def is_hub_layout(keys: set[str]) -> bool:
    """DINOv2 hub / timm key names (docs/reference_weights.md §2): stem tensors, ``blocks.<i>.*``,
    final norm."""
    return all(k in keys for k in HUB_REQUIRED_KEYS) and any(k.startswith("blocks.0.") for k in keys)


def backbone_from_teacher(teacher: Mapping[str, Any]) -> dict[str, Tensor]:
    """DinoBloom teacher -> backbone state dict; ``dino_head.*``/``ibot_head.*`` are dropped on purpose
    (only the backbone is evaluated; the heads are SSL-only projection layers)."""
    n = len(DINOBLOOM_BACKBONE_PREFIX)
    return {k[n:]: v for k, v in teacher.items() if k.startswith(DINOBLOOM_BACKBONE_PREFIX)}


def _classify_torch_object(obj: Any) -> str | None:
    """Format of a loaded torch file, or None when it is none we know."""
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("state_dict"), Mapping) and any(
        k.startswith(TEACHER_PREFIX) for k in obj["state_dict"]
    ):
        return "lightning_ckpt"
    teacher = obj.get("teacher")
    if isinstance(teacher, Mapping) and is_hub_layout(set(backbone_from_teacher(teacher))):
        return "dinobloom"
    if is_hub_layout({str(k) for k in obj}):
        return "dinov2_hub"
    return None


def _folder_format(folder: Path) -> str:
    """A folder with ``config.json``: our export (safetensors stamped ``producer: reddino`` by
    ``export_timm``) or a Hugging Face timm folder. Both configs name an architecture and may carry
    ``model_args``, so the weights' metadata is what tells them apart."""
    config = json.loads((folder / "config.json").read_text())
    if "architecture" not in config:
        raise ValueError(f"{folder / 'config.json'}: no 'architecture'; not a timm/reddino config")
    weights = folder / "model.safetensors"
    if weights.is_file():
        producer = (safetensors_metadata(weights) or {}).get("producer")
        return "reddino_export" if producer == "reddino" and "model_args" in config else "timm_hf"
    if (folder / "pytorch_model.bin").is_file():
        return "timm_hf"
    raise FileNotFoundError(f"{folder}: config.json but neither model.safetensors nor pytorch_model.bin")


def detect_format(path: str | Path) -> str:
    """Which loader ``path`` needs, decided from the files themselves (one of ``FORMATS``).

    Folder/safetensors formats are told apart by ``config.json``; torch files by their key layout (read
    with ``weights_only=True``), so a misnamed ``.pth``/``.pt`` still goes to the right loader.
    """
    if isinstance(path, str) and path.startswith(HUB_PREFIX):
        return "hf_hub"
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: folder without config.json; not an export or a timm folder")
        return _folder_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        if (path.parent / "config.json").is_file():
            return _folder_format(path.parent)
        with open_safetensors(path) as f:
            if is_hub_layout(set(f.keys())):
                return "dinov2_hub"
        raise ValueError(f"{path}: safetensors without config.json and without DINOv2 keys")
    if path.suffix == ".ckpt":
        return "lightning_ckpt"
    found = _classify_torch_object(load_torch_file(path))
    if found is None:
        raise ValueError(f"{path}: unknown layout; expected one of {FORMATS}")
    return found
