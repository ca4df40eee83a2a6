"""Frozen-backbone features, computed once per (model, units) and cached next to their manifest rows.

Probes and protocols only ever read the cache: a 5-fold x 3-probe evaluation costs one backbone pass.
``pooling="cls"`` is the paper's final-norm CLS token; ``"cls+mean"`` appends the mean patch token
(DINOv2's linear-eval variant). A ``FeatureWhitening`` shipped with an export (``reddino.eval.whitening``)
is applied to the CLS part; ``None`` gives the raw tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from reddino.eval.whitening import FeatureWhitening
from reddino.ssl.backbone import forward_tokens

POOLINGS = ("cls", "cls+mean")


def pool_tokens(
    backbone: VisionTransformer,
    images: torch.Tensor,
    pooling: str,
    whitening: FeatureWhitening | None = None,
) -> torch.Tensor:
    """Final-norm CLS (whitened when ``whitening`` is given), or that CLS concatenated with the mean of
    the final-norm patch tokens."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    tokens = forward_tokens(backbone, images)
    cls = tokens.cls if whitening is None else whitening(tokens.cls.float())
    if pooling == "cls":
        return cls
    return torch.cat([cls.to(tokens.patches.dtype), tokens.patches.mean(dim=1)], dim=1)


class FeatureExtractor(pl.LightningModule):
    """The one feature path: batches of ``(images, payload)`` in, ``(pooled features, payload)`` out.

    ``payload`` is whatever the loader pairs with the images (labels, unit indices) and comes back
    untouched; a batch whose images are None (none of its files decoded) gives None features. A Trainer
    drives it (``extract_features``: any accelerator and precision); inside a running fit, where no
    second Trainer can run, ``extract`` drives the same ``predict_step`` on the backbone's device.
    """

    def __init__(
        self, backbone: VisionTransformer, pooling: str, whitening: FeatureWhitening | None = None
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.whitening = whitening

    def predict_step(self, batch: Any, batch_idx: int = 0) -> tuple[torch.Tensor | None, Any]:
        images, payload = batch
        if images is None:
            return None, payload
        return pool_tokens(self.backbone, images, self.pooling, self.whitening).float().cpu(), payload

    @torch.no_grad()
    def extract(self, batches: Iterable[Any]) -> tuple[torch.Tensor, list[Any]]:
        """``predict_step`` over ``batches`` without a Trainer, on the backbone's device, in eval mode
        (the backbone's training mode is restored afterwards)."""
        was_training = self.backbone.training
        self.backbone.eval()
        device = next(self.backbone.parameters()).device
        try:
            outputs = [
                self.predict_step((None if x is None else x.to(device), payload)) for x, payload in batches
            ]
        finally:
            self.backbone.train(was_training)
        return collect_outputs(outputs, self.backbone.num_features)


def collect_outputs(
    outputs: Sequence[tuple[torch.Tensor | None, Any]], dim: int
) -> tuple[torch.Tensor, list[Any]]:
    """Concatenated features [N, dim] float32 (N = 0 when no batch had images) and the payloads in order."""
    feats = [f for f, _ in outputs if f is not None]
    return (torch.cat(feats) if feats else torch.zeros(0, dim)), [p for _, p in outputs]


def feature_trainer(accelerator: str, precision: str, progress: bool) -> pl.Trainer:
    """A one-device predict-only Trainer: ``accelerator`` auto | cpu | gpu, ``precision`` 32-true |
    bf16-mixed."""
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )


def extract_features(
    backbone: VisionTransformer,
    loader: Iterable[Any],
    pooling: str,
    trainer: pl.Trainer,
    whitening: FeatureWhitening | None = None,
) -> tuple[torch.Tensor, list[Any]]:
    """(features [N, D] float32, the loader's payloads in order) through a Lightning predict pass."""
    module = FeatureExtractor(backbone.eval(), pooling, whitening)
    return collect_outputs(trainer.predict(module, dataloaders=loader), backbone.num_features)


def labelled_features(
    backbone: VisionTransformer,
    dataset: Dataset,
    pooling: str,
    batch_size: int,
    num_workers: int,
    trainer: pl.Trainer | None,
    whitening: FeatureWhitening | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of a labelled dataset of ``(image, class)``; ``trainer`` None: in a process that
    is training (``FeatureExtractor.extract`` on the backbone's device)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if trainer is None:
        feats, labels = FeatureExtractor(backbone, pooling, whitening).extract(loader)
    else:
        feats, labels = extract_features(backbone, loader, pooling, trainer, whitening)
    return feats, torch.cat([torch.as_tensor(y) for y in labels])


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
