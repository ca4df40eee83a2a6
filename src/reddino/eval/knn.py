"""Batched k-nearest-neighbour classification in torch (CPU or GPU).

Two voting rules: the reference's (Euclidean distance, uniform votes, as sklearn's
KNeighborsClassifier defaults) and DINOv2's (cosine similarity, votes weighted by exp(sim / T)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    k: int,
    num_classes: int,
    metric: str,
    temperature: float | None,
    chunk_size: int,
) -> Tensor:
    """Predict a class for each row of ``test_x`` from its ``k`` nearest rows of ``train_x``.

    ``metric="euclidean"``: uniform votes; ties go to the smallest class index (sklearn's mode rule).
    ``metric="cosine"``: votes weighted by exp(similarity / temperature) (DINOv2 protocol).
    """
    if train_x.shape[0] == 0:
        raise ValueError("k-NN needs at least one training sample")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if metric == "cosine" and temperature is None:
        raise ValueError("cosine k-NN needs a temperature")
    k = min(k, train_x.shape[0])
    train_x = train_x.float()
    if metric == "cosine":
        train_x = F.normalize(train_x, dim=1)
    preds = []
    for start in range(0, test_x.shape[0], chunk_size):
        q = test_x[start : start + chunk_size].float().to(train_x.device)
        if metric == "euclidean":
            dist = torch.cdist(q, train_x)
            _, idx = dist.topk(k, dim=1, largest=False)
            weights = torch.ones_like(idx, dtype=torch.float32)
        else:
            sim = F.normalize(q, dim=1) @ train_x.T
            top, idx = sim.topk(k, dim=1)
            weights = (top / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_y.to(q.device)[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)
