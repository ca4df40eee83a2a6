"""reddino: self-supervised foundation models for red blood cell microscopy (RedDino on Lightning).

The user-facing API, imported lazily so that ``import reddino`` stays cheap::

    backbone = reddino.load_backbone("outputs/pretrain/<run>/export")   # or a .pth / .ckpt / hf_hub:<id>
    embeddings, units, skipped = reddino.embed(backbone, "my_cells/", mode="image")
"""

from __future__ import annotations

from typing import Any

__all__ = ["embed", "load_backbone"]


def __getattr__(name: str) -> Any:
    if name == "load_backbone":
        from reddino.weights import load_backbone

        return load_backbone
    if name == "embed":
        from reddino.embedding import embed

        return embed
    raise AttributeError(f"module 'reddino' has no attribute {name!r}")
