"""Frozen-backbone features: final-norm CLS token of every unit, computed once per model."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset

from reddino.ssl.backbone import forward_tokens


@torch.no_grad()
def extract_cls_features(
    backbone: VisionTransformer, dataset: Dataset, batch_size: int, num_workers: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on CPU, labels [N]) in dataset order."""
    backbone = backbone.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for images, targets in loader:
        feats.append(forward_tokens(backbone, images.to(device)).cls.float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels)
