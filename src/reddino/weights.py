"""Backbones from our own runs and from released weights, as a timm ``VisionTransformer``.

Formats (``detect_format``): our ``export/`` folder (timm ``config.json`` + ``model.safetensors``), a
Lightning checkpoint (``checkpoints/*.ckpt``, whose run directory holds ``config.yaml``), a Hugging Face
timm folder (the RedDino releases), a DinoBloom ``.pth`` (``{"teacher": {backbone.*, heads}}``), a DINOv2
hub state dict, and ``hf_hub:`` ids. Keys are checked strictly and nothing pickled is executed
(safetensors, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from reddino.run_specs import (
    ARCH_NAME,
    UntrustedConfigError,
    backbone_args,
    normalisation,
    plain_value,
)
from reddino.ssl.backbone import build_backbone, resample_pos_embed_dinov2


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


def load_export(path: str | Path) -> LoadedBackbone:
    """Load ``path`` (an export folder, or its ``model.safetensors`` with ``config.json`` beside it).

    An export IS a Hugging Face timm folder (``export_timm`` writes that layout), so it is read by the
    same loader; only the message for missing files is export-specific.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "model.safetensors"
    for needed in (weights, folder / "config.json"):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed}: missing; expected a reddino export (config.json + model.safetensors)"
            )
    return load_timm_hf_folder(path)


TEACHER_PREFIX = "teacher.backbone."


def load_lightning_checkpoint(path: str | Path) -> LoadedBackbone:
    """The teacher backbone of a pretraining checkpoint, built from the run's ``config.yaml``.

    The config is read as validated plain values (``reddino.run_specs``), never instantiated: a shared
    run directory cannot make loading its weights run code.
    """
    path = Path(path)
    config_file = path.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; a checkpoint is read with its run's config.yaml")
    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    if not isinstance(cfg, dict) or "model" not in cfg or "augment" not in cfg:
        raise UntrustedConfigError(f"{config_file}: no 'model' and 'augment' sections; not a pretraining run")
    try:
        args = backbone_args(cfg["model"])
        mean, std = normalisation(cfg["augment"])
    except UntrustedConfigError as err:
        raise UntrustedConfigError(f"{config_file}: {err}") from err
    model = build_backbone(**args)
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"{path}: no 'state_dict'; not a Lightning checkpoint")
    state = {
        k[len(TEACHER_PREFIX) :]: v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(TEACHER_PREFIX)
    }
    if not state:
        raise ValueError(f"{path}: no '{TEACHER_PREFIX}*' keys; not a reddino pretraining checkpoint")
    _load_strict(model, state, path)
    arch = args.pop("arch")
    args.update(args.pop("overrides"))
    return LoadedBackbone(
        model=model.eval(),
        architecture=arch,
        model_args=args,
        input_size=int(args["img_size"]),
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------------
# Released weights: DINOv2 hub state dicts, DinoBloom teacher checkpoints, Hugging Face timm folders.

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
RELEASE_IMG_SIZE = 224  # RedDino and DinoBloom are used at 224 px (docs/reference_weights.md §1, §5)
PATCH_SIZE = 14
HUB_PREFIX = "hf_hub:"
DINOBLOOM_BACKBONE_PREFIX = "backbone."
HUB_REQUIRED_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
# DINOv2/teacher checkpoints have it, timm models do not (docs/reference_weights.md §2)
OPTIONAL_KEYS = ("mask_token",)
# embed_dim -> (timm architecture, depth, num_heads) of the standard DINOv2 sizes
STANDARD_SIZES: dict[int, tuple[str, int, int]] = {
    384: ("vit_small_patch14_dinov2", 12, 6),
    768: ("vit_base_patch14_dinov2", 12, 12),
    1024: ("vit_large_patch14_dinov2", 24, 16),
    1536: ("vit_giant_patch14_dinov2", 40, 24),
}
FORMATS = ("reddino_export", "lightning_ckpt", "timm_hf", "dinobloom", "dinov2_hub", "hf_hub")


try:  # huggingface_hub >= 1.0 talks httpx; its transport errors are not OSError
    from httpx import TransportError as _HttpxTransportError

    NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError, _HttpxTransportError)
except ImportError:  # pragma: no cover - older huggingface_hub uses requests (OSError subclasses)
    NETWORK_ERRORS = (OSError,)


class HubUnavailableError(RuntimeError):
    """An ``hf_hub:`` id cannot be fetched (offline); the message says which files to fetch by hand."""


def _torch_load(path: Path) -> Any:
    """``torch.load`` that never runs pickled code: a file holding arbitrary objects is refused, and a
    truncated or corrupt file is named."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused: it holds pickled objects other than tensors/containers "
            "(read with weights_only=True; convert it to safetensors or a plain state dict)"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable torch file ({err}); truncated or corrupt?") from err


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` whose failure on a truncated or corrupt file names the file."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); truncated or corrupt?") from err
    with handle as f:
        yield f


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    with _open_safetensors(path) as f:
        return f.metadata()


def _is_hub_layout(keys: set[str]) -> bool:
    """DINOv2 hub / timm key names (docs/reference_weights.md §2): stem tensors, ``blocks.<i>.*``,
    final norm."""
    return all(k in keys for k in HUB_REQUIRED_KEYS) and any(k.startswith("blocks.0.") for k in keys)


def _backbone_from_teacher(teacher: Mapping[str, Any]) -> dict[str, Tensor]:
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
    if isinstance(teacher, Mapping) and _is_hub_layout(set(_backbone_from_teacher(teacher))):
        return "dinobloom"
    if _is_hub_layout({str(k) for k in obj}):
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
        producer = (_safetensors_metadata(weights) or {}).get("producer")
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
        with _open_safetensors(path) as f:
            if _is_hub_layout(set(f.keys())):
                return "dinov2_hub"
        raise ValueError(f"{path}: safetensors without config.json and without DINOv2 keys")
    if path.suffix == ".ckpt":
        return "lightning_ckpt"
    found = _classify_torch_object(_torch_load(path))
    if found is None:
        raise ValueError(f"{path}: unknown layout; expected one of {FORMATS}")
    return found


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


def _load_strict(model: VisionTransformer, state: Mapping[str, Tensor], source: Path | str) -> None:
    """Load with every key accounted for; ``mask_token`` may be absent on either side (timm models
    have none, released backbones may lack it) and is loaded when both have it."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in missing if k not in OPTIONAL_KEYS]
    unexpected = [k for k in unexpected if k not in OPTIONAL_KEYS]
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match the timm model: missing {missing}, unexpected {unexpected}"
        )


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
    _load_strict(model, state, source)
    return LoadedBackbone(
        model=model.eval(),
        architecture=arch,
        model_args=args,
        input_size=int(args["img_size"]),
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
    )


def _read_state(path: Path) -> Any:
    """Tensors of a safetensors file, or a torch file read with ``weights_only=True``."""
    if path.suffix != ".safetensors":
        return _torch_load(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); truncated or corrupt?") from err


def load_dinov2_hub(path: str | Path, model_args: Mapping[str, Any] | None = None) -> LoadedBackbone:
    """A DINOv2 hub state dict (``dinov2_vit{s,b,l}14`` weights, 37x37 grid for 518 px)."""
    path = Path(path)
    return load_dinov2_state_dict(_read_state(path), path, model_args)


def load_dinobloom(path: str | Path, model_args: Mapping[str, Any] | None = None) -> LoadedBackbone:
    """A DinoBloom ``.pth``: the teacher backbone only; its DINO/iBOT heads are deliberately ignored."""
    path = Path(path)
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("teacher"), Mapping):
        raise ValueError(f"{path}: no 'teacher' dict; not a DinoBloom checkpoint")
    return load_dinov2_state_dict(_backbone_from_teacher(checkpoint["teacher"]), path, model_args)


def load_timm_hf_folder(path: str | Path) -> LoadedBackbone:
    """A Hugging Face timm folder (``config.json`` + weights), e.g. a downloaded ``Snarcy/RedDino-*``.

    Built like timm's ``hf_hub`` loading (architecture, fixed input size from ``pretrained_cfg``) but
    from local files and with a strict key check instead of timm's silent filters.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = json.loads((folder / "config.json").read_text())
    weights = path if path.is_file() else folder / "model.safetensors"
    if not weights.is_file():
        weights = folder / "pytorch_model.bin"
    pre = config.get("pretrained_cfg", {})
    size = int(pre.get("input_size", [3, RELEASE_IMG_SIZE, RELEASE_IMG_SIZE])[-1])
    args = {"img_size": size, **config.get("model_args", {})}
    model = build_from_config({"architecture": config["architecture"], "model_args": args})
    _load_strict(model, _read_state(weights), weights)
    return LoadedBackbone(
        model=model.eval(),
        architecture=config["architecture"],
        model_args=args,
        input_size=size,
        mean=list(pre.get("mean", IMAGENET_MEAN)),
        std=list(pre.get("std", IMAGENET_STD)),
    )


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE from the environment now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_host_unresolvable() -> bool:
    """True when the Hub's host name does not resolve (no network): checked first because
    huggingface_hub otherwise retries for ~30 s before giving up. Skipped behind a proxy, where
    local DNS says nothing about reachability."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


def _offline_message(hub_id: str, reason: str) -> str:
    """What to download and where to put it, so the user can pass a local folder instead of the id."""
    repo = hub_id[len(HUB_PREFIX) :]
    local = Path("weights") / repo.split("/")[-1]
    return (
        f"{hub_id}: cannot download ({reason}). Download config.json and model.safetensors from "
        f"https://huggingface.co/{repo} into a local folder (e.g. {local}/) and pass that folder "
        "instead of the hub id."
    )


def load_hf_hub(hub_id: str) -> LoadedBackbone:
    """``hf_hub:<repo>`` through timm (the documented RedDino usage); offline, fail fast with a how-to."""
    if _hub_offline():
        raise HubUnavailableError(_offline_message(hub_id, "HF_HUB_OFFLINE is set"))
    if _hub_host_unresolvable():
        raise HubUnavailableError(_offline_message(hub_id, "no network: the Hub host does not resolve"))
    try:
        model = timm.create_model(hub_id, pretrained=True, num_classes=0)
    except NETWORK_ERRORS as err:  # no network, repo unreachable, not in the local cache
        raise HubUnavailableError(_offline_message(hub_id, f"{type(err).__name__}: {err}")) from err
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{hub_id} is not a timm VisionTransformer")
    pre = model.pretrained_cfg
    return LoadedBackbone(
        model=model.eval(),
        architecture=str(pre.get("architecture", hub_id)),
        model_args={"img_size": int(pre["input_size"][-1])},
        input_size=int(pre["input_size"][-1]),
        mean=list(pre["mean"]),
        std=list(pre["std"]),
    )


def load_backbone(path: str | Path, model_args: Mapping[str, Any] | None = None) -> LoadedBackbone:
    """Any supported backbone (see ``detect_format``). ``model_args`` only matters for DINOv2-layout
    state dicts (hub / DinoBloom) of non-standard size, whose head count the weights do not record."""
    fmt = detect_format(path)
    if fmt == "hf_hub":
        return load_hf_hub(str(path))
    if fmt == "reddino_export":
        return load_export(path)
    if fmt == "lightning_ckpt":
        return load_lightning_checkpoint(path)
    if fmt == "timm_hf":
        return load_timm_hf_folder(path)
    if fmt == "dinobloom":
        return load_dinobloom(path, model_args)
    return load_dinov2_hub(path, model_args)


def init_backbone_(target: VisionTransformer, source: LoadedBackbone) -> VisionTransformer:
    """Copy a loaded backbone into the (student) backbone a run builds: continued pretraining.

    Loaders deliver released DINOv2-layout weights at 224 px (grid 37 -> 16, RedDino's once-only
    resize); a run at another input size resizes that grid again here. The only key allowed to stay
    is the iBOT ``mask_token`` (released backbones don't carry one, so it starts at zero as in DINOv2).
    Anything else that does not match raises, naming the keys.
    """
    state = dict(source.model.state_dict())
    grid = target.patch_embed.grid_size[0]
    if "pos_embed" in state and state["pos_embed"].shape != target.pos_embed.shape:
        state["pos_embed"] = resample_pos_embed_dinov2(state["pos_embed"], grid)
    shapes = {
        k: (tuple(v.shape), tuple(target.state_dict()[k].shape))
        for k, v in state.items()
        if k in target.state_dict()
    }
    wrong = {k: s for k, s in shapes.items() if s[0] != s[1]}
    if wrong:
        raise ValueError(f"init weights do not fit the run's model ({source.architecture}): shapes {wrong}")
    _load_strict(target, state, f"init weights ({source.architecture})")
    return target
