"""The k-NN report printed at the end of pretraining: trained teacher vs the same network at random init."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from reddino.eval.knn import knn_predict
from reddino.eval.metrics import classification_metrics
from reddino.eval.protocols import grouped_kfold

METRICS = ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1")


def grouped_knn_scores(
    features: torch.Tensor,
    labels: torch.Tensor,
    groups: np.ndarray,
    ks: Sequence[int],
    num_classes: int,
    n_splits: int,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Euclidean uniform-vote k-NN (the reference rule) under grouped stratified k-fold.

    Returns ``{"k=1": {"weighted_f1": {"mean": .., "std": .., "folds": [..]}, ...}, ...}``.
    """
    per_k: dict[int, dict[str, list[float]]] = {k: {m: [] for m in METRICS} for k in ks}
    for train_idx, test_idx in grouped_kfold(labels.numpy(), groups, n_splits, seed):
        tr, te = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
        for k in ks:
            pred = knn_predict(
                features[tr], labels[tr], features[te], k, num_classes, "euclidean", None, chunk_size=2048
            )
            for name, value in classification_metrics(labels[te], pred, num_classes).items():
                per_k[k][name].append(value)
    return {
        f"k={k}": {
            m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "folds": [float(x) for x in v]}
            for m, v in scores.items()
        }
        for k, scores in per_k.items()
    }


def format_table(results: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> str:
    """Markdown table: one row per (model, k), columns the metrics as mean +- std in percent."""
    header = "| model | k-NN | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for model, by_k in results.items():
        for k, scores in by_k.items():
            cells = [f"{100 * scores[m]['mean']:.1f} ± {100 * scores[m]['std']:.1f}" for m in METRICS]
            lines.append(f"| {model} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
