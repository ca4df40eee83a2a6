"""How much an embedding encodes WHERE a cell came from (scanner, stain, lab) rather than what it is.

The reference never measures this. Two complementary views:

- ``source_predictability``: can a linear probe tell the source from the embedding, on images it never
  saw? Balanced accuracy far above chance (1 / n_sources) means a strong batch effect.
- ``neighbour_source_mixing``: are a cell's nearest neighbours from other sources as often as the
  source proportions predict? Ratio 1 = perfectly mixed, 0 = every source its own island.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from reddino.eval.linear import reference_C, torch_linear_probe
from reddino.eval.metrics import classification_metrics
from reddino.eval.protocols import grouped_kfold


def _encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct names, integer code per row)."""
    names, codes = np.unique(np.asarray(values), return_inverse=True)
    return names, codes


def source_predictability(
    features: Tensor,
    sources: np.ndarray,
    groups: np.ndarray,
    n_splits: int,
    seed: int,
    C: float | None,
    max_iter: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Linear probe predicting the source, under k-fold grouped by image/subject (stratified by source).

    ``C=None`` uses the reference rule with the sources as classes. Returns the balanced accuracy
    (mean, std and per fold) and its chance level 1 / n_sources.
    """
    names, codes = _encode(sources)
    if len(names) < 2:
        raise ValueError(f"source predictability needs at least 2 sources, got {names.tolist()}")
    if C is None:
        C = reference_C(features.shape[1], len(names))
    y = torch.as_tensor(codes)
    scores = []
    for train_idx, test_idx in grouped_kfold(codes, np.asarray(groups), n_splits, seed):
        tr, te = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
        pred = torch_linear_probe(features[tr], y[tr], features[te], len(names), C, max_iter, device)
        scores.append(classification_metrics(y[te], pred, len(names))["balanced_accuracy"])
    return {
        "balanced_accuracy": float(np.mean(scores)),
        "balanced_accuracy_std": float(np.std(scores)),
        "folds": [float(s) for s in scores],
        "chance": 1.0 / len(names),
        "n_sources": len(names),
    }


def _other_source_fraction(features: Tensor, codes: Tensor, k: int, chunk_size: int) -> Tensor:
    """Per row: the fraction of its k nearest neighbours (Euclidean, itself excluded) from another source."""
    fractions = []
    for start in range(0, features.shape[0], chunk_size):
        q = features[start : start + chunk_size]
        dist = torch.cdist(q, features)
        rows = torch.arange(q.shape[0], device=q.device)
        dist[rows, rows + start] = float("inf")  # exclude the sample itself, by index not by distance
        _, idx = dist.topk(k, dim=1, largest=False)
        other = codes[idx] != codes[start : start + chunk_size, None]
        fractions.append(other.float().mean(dim=1))
    return torch.cat(fractions)


def neighbour_source_mixing(
    features: Tensor, sources: np.ndarray, k: int, chunk_size: int = 1024
) -> dict[str, Any]:
    """Observed vs expected fraction of other-source neighbours among each sample's k nearest.

    Expected for a sample of source s under perfect mixing: (N - n_s) / (N - 1). ``ratio`` = mean
    observed / mean expected (1 = mixed, 0 = separated); ``per_source`` breaks both down by source.
    """
    names, codes_np = _encode(sources)
    n = len(codes_np)
    if len(names) < 2:
        raise ValueError(f"source mixing needs at least 2 sources, got {names.tolist()}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must lie in [1, {n - 1}], got {k}")
    codes = torch.as_tensor(codes_np, device=features.device)
    observed = _other_source_fraction(features.float(), codes, k, chunk_size).cpu().numpy()
    counts = np.bincount(codes_np)
    expected = (n - counts[codes_np]) / (n - 1)
    per_source = {
        str(name): {
            "observed": float(observed[codes_np == i].mean()),
            "expected": float(expected[codes_np == i].mean()),
        }
        for i, name in enumerate(names)
    }
    return {
        "observed": float(observed.mean()),
        "expected": float(expected.mean()),
        "ratio": float(observed.mean() / expected.mean()),
        "k": k,
        "per_source": per_source,
    }
