"""Batched k-nearest-neighbour classification in torch (CPU or GPU).

Two voting rules: the reference's (Euclidean distance, uniform votes, as sklearn's
KNeighborsClassifier defaults) and DINOv2's (cosine similarity, votes weighted by exp(sim / T)).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    return knn_predict_many(train_x, train_y, test_x, [k], num_classes, metric, temperature, chunk_size)[k]


def knn_predict_many(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    ks: Sequence[int],
    num_classes: int,
    metric: str,
    temperature: float | None,
    chunk_size: int,
) -> dict[int, Tensor]:
    """``knn_predict`` for every k in ``ks`` from ONE neighbour search per test chunk: the max(ks)
    nearest rows are found once (sorted) and each k votes with its first k of them."""
    if train_x.shape[0] == 0:
        raise ValueError("k-NN needs at least one training sample")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if metric == "cosine" and temperature is None:
        raise ValueError("cosine k-NN needs a temperature")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {list(ks)}")
    n_train = train_x.shape[0]
    k_max = min(max(ks), n_train)
    train_x = train_x.float()
    if metric == "cosine":
        train_x = F.normalize(train_x, dim=1)
    labels = train_y.to(train_x.device)
    # Euclidean ranking of a query row needs ||t||^2 - 2 q.t only (its own ||q||^2 is a constant): one
    # matmul and a top-k per chunk, no square root (benchmarks/eval_speed.md: time near the bare matmul)
    train_sq = train_x.square().sum(dim=1) if metric == "euclidean" else None
    preds: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, test_x.shape[0], chunk_size):
        q = test_x[start : start + chunk_size].float().to(train_x.device)
        if metric == "euclidean":
            _, idx = torch.addmm(train_sq, q, train_x.T, alpha=-2.0).topk(
                k_max, dim=1, largest=False, sorted=True
            )
            weights = torch.ones_like(idx, dtype=torch.float32)
        else:
            top, idx = (F.normalize(q, dim=1) @ train_x.T).topk(k_max, dim=1, sorted=True)
            weights = (top / temperature).exp()
        neighbour_labels = labels[idx]
        for k in ks:
            kk = min(k, n_train)
            votes = torch.zeros(q.shape[0], num_classes, device=q.device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            preds[k].append(votes.argmax(dim=1))
    return {k: torch.cat(p) for k, p in preds.items()}
