"""Frozen-backbone features, computed once per (model, units) and cached next to their manifest rows.

Probes and protocols only ever read the cache: a 5-fold x 3-probe evaluation costs one backbone pass.
``pooling="cls"`` is the paper's final-norm CLS token; ``"cls+mean"`` appends the mean patch token
(DINOv2's linear-eval variant).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from reddino.ssl.backbone import forward_tokens

POOLINGS = ("cls", "cls+mean")


def pool_tokens(backbone: VisionTransformer, images: torch.Tensor, pooling: str) -> torch.Tensor:
    """Final-norm CLS, or CLS concatenated with the mean of the final-norm patch tokens."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    tokens = forward_tokens(backbone, images)
    if pooling == "cls":
        return tokens.cls
    return torch.cat([tokens.cls, tokens.patches.mean(dim=1)], dim=1)


class FeatureExtractor(pl.LightningModule):
    """A predict-only module: batches of (image, label) in, pooled features out (any device/strategy)."""

    def __init__(self, backbone: VisionTransformer, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone = backbone.eval()
        self.pooling = pooling

    def predict_step(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return pool_tokens(self.backbone, images, self.pooling).float().cpu(), torch.as_tensor(labels).cpu()


def extract_features(
    backbone: VisionTransformer, loader: DataLoader, pooling: str, trainer: pl.Trainer
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32, labels [N]) in loader order, through a Lightning predict pass."""
    outputs = trainer.predict(FeatureExtractor(backbone, pooling), dataloaders=loader)
    feats, labels = zip(*outputs, strict=True)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def extract_cls_features(
    backbone: VisionTransformer, dataset: Dataset, batch_size: int, num_workers: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS features [N, D] float32 on CPU, labels [N]) without a Trainer (the end-of-pretraining report)."""
    backbone = backbone.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for images, targets in loader:
        feats.append(pool_tokens(backbone, images.to(device), "cls").float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels)


def units_digest(units: pd.DataFrame) -> str:
    """Content hash of a units table (row order matters: features are stored in that order)."""
    hashed = pd.util.hash_pandas_object(units.reset_index(drop=True).astype(str), index=True).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:16]


def state_digest(model: torch.nn.Module) -> str:
    """Content hash of a model's parameters and buffers: the cache key of 'this backbone'."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CachedFeatures:
    """Features with the manifest rows they belong to (same order) and the class list of the labels."""

    features: np.ndarray
    labels: np.ndarray
    units: pd.DataFrame
    meta: dict[str, Any]


def feature_cache_path(
    cache_dir: Path, model_key: str, units: pd.DataFrame, settings: Mapping[str, Any]
) -> Path:
    key = hashlib.sha256(json.dumps({**settings, "model": model_key}, sort_keys=True).encode()).hexdigest()[
        :12
    ]
    return cache_dir / f"{model_key}-{units_digest(units)}-{key}"


def save_features(path: Path, cached: CachedFeatures) -> None:
    """Write features.npy, labels.npy, units.parquet and meta.json into ``path`` atomically (tmp + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "features.npy", cached.features)
    np.save(tmp / "labels.npy", cached.labels)
    cached.units.to_parquet(tmp / "units.parquet", index=False)
    (tmp / "meta.json").write_text(json.dumps(cached.meta, indent=2, default=str))
    if path.exists():  # another process finished first: keep its (identical) result
        shutil.rmtree(tmp)
        return
    os.replace(tmp, path)


def load_features(path: Path) -> CachedFeatures:
    return CachedFeatures(
        features=np.load(path / "features.npy"),
        labels=np.load(path / "labels.npy"),
        units=pd.read_parquet(path / "units.parquet"),
        meta=json.loads((path / "meta.json").read_text()),
    )
