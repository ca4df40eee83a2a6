"""Our own run outputs (export folders, Lightning checkpoints), Hugging Face timm folders, and
``load_backbone``, which sends any supported path to its loader."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer

from reddino.eval.whitening import FeatureWhitening
from reddino.run_specs import UntrustedConfigError, backbone_args, normalisation
from reddino.ssl.backbone import build_backbone, resample_pos_embed_dinov2
from reddino.weights.dinov2_layout import load_dinobloom, load_dinov2_hub
from reddino.weights.export import WHITENING_KEY
from reddino.weights.files import load_torch_file, read_state
from reddino.weights.formats import TEACHER_PREFIX, detect_format
from reddino.weights.hub import load_hf_hub
from reddino.weights.loaded import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RELEASE_IMG_SIZE,
    LoadedBackbone,
    build_from_config,
    load_strict,
)


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
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"{path}: no 'state_dict'; not a Lightning checkpoint")
    state = {
        k[len(TEACHER_PREFIX) :]: v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(TEACHER_PREFIX)
    }
    if not state:
        raise ValueError(f"{path}: no '{TEACHER_PREFIX}*' keys; not a reddino pretraining checkpoint")
    load_strict(model, state, path)
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
    load_strict(model, read_state(weights), weights)
    return LoadedBackbone(
        model=model.eval(),
        architecture=config["architecture"],
        model_args=args,
        input_size=size,
        mean=list(pre.get("mean", IMAGENET_MEAN)),
        std=list(pre.get("std", IMAGENET_STD)),
        whitening=read_whitening(folder, config.get(WHITENING_KEY), int(model.num_features)),
    )


def read_whitening(folder: Path, entry: Any, dim: int) -> FeatureWhitening | None:
    """The feature whitening a ``config.json`` names (``export_timm``), checked; None when it names none.

    Only a plain file name inside the folder is followed, and only safetensors is read.
    """
    if entry is None:
        return None
    where = f"{folder / 'config.json'}: {WHITENING_KEY}"
    if not isinstance(entry, Mapping) or not isinstance(entry.get("file"), str):
        raise ValueError(f"{where}: expected {{file: <name>, ...}}, got {entry!r}")
    name = entry["file"]
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise ValueError(f"{where}: file {name!r} must be a .safetensors file name inside the export folder")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {where} names it")
    state = read_state(path)
    if set(state) != {"mean", "transform"}:
        raise ValueError(f"{path}: expected tensors 'mean' and 'transform', got {sorted(state)}")
    try:
        whitening = FeatureWhitening(
            state["mean"].float(),
            state["transform"].float(),
            float(entry.get("shrinkage", 0.0)),
            int(entry.get("fitted_on", 0)),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
    if whitening.dim != dim:
        raise ValueError(f"{path}: whitening is {whitening.dim}-d, the backbone's CLS is {dim}-d")
    return whitening


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
    load_strict(target, state, f"init weights ({source.architecture})")
    return target
