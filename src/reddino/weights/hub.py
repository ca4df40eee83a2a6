"""``hf_hub:<repo>`` ids: the only loader that touches the network, and it fails fast with a how-to when
there is none."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
from timm.models.vision_transformer import VisionTransformer

from reddino.weights.formats import HUB_PREFIX
from reddino.weights.loaded import LoadedBackbone

try:  # huggingface_hub >= 1.0 talks httpx; its transport errors are not OSError
    from httpx import TransportError as _HttpxTransportError

    NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError, _HttpxTransportError)
except ImportError:  # pragma: no cover - older huggingface_hub uses requests (OSError subclasses)
    NETWORK_ERRORS = (OSError,)


class HubUnavailableError(RuntimeError):
    """An ``hf_hub:`` id cannot be fetched (offline); the message says which files to fetch by hand."""


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
