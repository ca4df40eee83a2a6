"""Read what a shared run directory's ``config.yaml`` says, as validated plain values, never as code.

A run directory travels ("here are my weights"), so its ``config.yaml`` is foreign input. Hydra's
``instantiate`` would import and call whatever ``_target_`` it names (``builtins.open``,
``shutil.copyfile``, ``pandas.read_pickle`` ...). Here the only callables are ours, chosen from a fixed
table; every argument is checked to be a plain value of the expected type before anything runs.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from timm.models.vision_transformer import VisionTransformer

BACKBONE_TARGET = "reddino.ssl.backbone.build_backbone"
BACKBONE_KEYS = {
    "arch": str,
    "img_size": int,
    "patch_size": int,
    "drop_path_rate": float,
    "init_values": (float, type(None)),
    "dynamic_img_size": bool,
}
# timm VisionTransformer keywords a run may override, with the value types they take
OVERRIDE_KEYS = {
    "embed_dim": int,
    "depth": int,
    "num_heads": int,
    "mlp_ratio": float,
    "qkv_bias": bool,
    "qk_norm": bool,
    "class_token": bool,
    "no_embed_class": bool,
    "reg_tokens": int,
    "pre_norm": bool,
    "final_norm": bool,
    "global_pool": str,
    "proj_drop_rate": float,
    "attn_drop_rate": float,
    "pos_drop_rate": float,
    "patch_drop_rate": float,
}
ARCH_NAME = re.compile(r"[a-z0-9_]+")


class UntrustedConfigError(ValueError):
    """A shared config names something other than plain values for our own builders."""


def _check_type(value: Any, expected: type | tuple[type, ...], where: str) -> Any:
    """``value`` when it has the expected type (an int is accepted for a float), else raise naming it."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in types:
        raise UntrustedConfigError(f"{where}: expected {expected}, got a bool ({value!r})")
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, types):
        raise UntrustedConfigError(f"{where}: expected {expected}, got {type(value).__name__} ({value!r})")
    return value


def plain_value(value: Any, where: str) -> Any:
    """``value`` when it is built only of str/int/float/bool/None, lists and string-keyed mappings
    without ``_target_`` (nothing a config could turn into a call); raises naming the key otherwise."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise UntrustedConfigError(f"{where}: non-string key {key!r}")
            if key.startswith("_") and key.endswith("_"):
                raise UntrustedConfigError(f"{where}.{key}: Hydra directives are refused in a shared config")
            out[key] = plain_value(item, f"{where}.{key}")
        return out
    raise UntrustedConfigError(f"{where}: {type(value).__name__} is not a plain config value")


def _check_target(node: Mapping[str, Any], allowed: set[str], where: str) -> str | None:
    target = node.get("_target_")
    if target is not None and target not in allowed:
        raise UntrustedConfigError(
            f"{where}._target_={target!r}: refused; a shared run config may only name {sorted(allowed)}"
        )
    return target


def backbone_args(model: Mapping[str, Any], where: str = "model") -> dict[str, Any]:
    """The keyword arguments of ``build_backbone`` that ``model`` (a run's resolved ``model`` node)
    describes, each checked: the architecture is a registered timm ViT name, the rest typed numbers."""
    import timm

    if not isinstance(model, Mapping):
        raise UntrustedConfigError(f"{where}: expected a mapping, got {type(model).__name__}")
    _check_target(model, {BACKBONE_TARGET}, where)
    extra = set(model) - set(BACKBONE_KEYS) - {"_target_", "overrides"}
    if extra:
        raise UntrustedConfigError(f"{where}: unknown keys {sorted(extra)}; allowed {sorted(BACKBONE_KEYS)}")
    missing = set(BACKBONE_KEYS) - set(model)
    if missing:
        raise UntrustedConfigError(f"{where}: missing keys {sorted(missing)}")
    args = {k: _check_type(model[k], t, f"{where}.{k}") for k, t in BACKBONE_KEYS.items()}
    arch = args["arch"]
    if not ARCH_NAME.fullmatch(arch) or arch not in timm.list_models(arch):
        raise UntrustedConfigError(f"{where}.arch={arch!r}: not a registered timm architecture name")
    overrides = model.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise UntrustedConfigError(f"{where}.overrides: expected a mapping, got {type(overrides).__name__}")
    checked = {}
    for key, value in overrides.items():
        if key not in OVERRIDE_KEYS:
            raise UntrustedConfigError(
                f"{where}.overrides.{key}: not an allowed ViT keyword; allowed {sorted(OVERRIDE_KEYS)}"
            )
        checked[key] = _check_type(value, OVERRIDE_KEYS[key], f"{where}.overrides.{key}")
    args["overrides"] = checked
    return args


def build_run_backbone(model: Mapping[str, Any], where: str = "model") -> VisionTransformer:
    """A randomly initialised backbone of the architecture a run's config describes."""
    from reddino.ssl.backbone import build_backbone

    return build_backbone(**backbone_args(model, where))


def normalisation(augment: Mapping[str, Any], where: str = "augment") -> tuple[list[float], list[float]]:
    """(mean, std) of a run's augmentation node: three numbers each."""
    out = []
    for key in ("mean", "std"):
        values = augment.get(key) if isinstance(augment, Mapping) else None
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            raise UntrustedConfigError(f"{where}.{key}: expected three numbers, got {values!r}")
        out.append([_check_type(v, float, f"{where}.{key}[{i}]") for i, v in enumerate(values)])
    return out[0], out[1]


def _unit_readers() -> dict[str, Callable[..., pd.DataFrame]]:
    from reddino.data.manifest import read_manifest, synthetic_units

    return {
        "reddino.data.manifest.read_manifest": read_manifest,
        "reddino.data.manifest.synthetic_units": synthetic_units,
    }


def read_run_units(
    units: Mapping[str, Any], cache_dir: str | Path, where: str = "data.eval_units"
) -> pd.DataFrame:
    """The units a run's ``data.*_units`` node describes, read by one of our readers.

    Synthetic smears are generated into OUR ``cache_dir``, not the one the foreign config names, so a
    shared config cannot make us write files elsewhere; the cache is keyed by the generator's parameters.
    """
    readers = _unit_readers()
    if not isinstance(units, Mapping):
        raise UntrustedConfigError(f"{where}: expected a mapping, got {type(units).__name__}")
    target = _check_target(units, set(readers), where)
    if target is None:
        raise UntrustedConfigError(f"{where}: no _target_; expected one of {sorted(readers)}")
    kwargs = plain_value({k: v for k, v in units.items() if k != "_target_"}, where)
    reader = readers[target]
    if "cache_dir" in kwargs:
        kwargs["cache_dir"] = str(cache_dir)
    try:
        inspect.signature(reader).bind(**kwargs)
    except TypeError as err:
        raise UntrustedConfigError(f"{where}: arguments do not fit {target}: {err}") from err
    return reader(**kwargs)
