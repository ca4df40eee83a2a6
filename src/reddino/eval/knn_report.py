"""The k-NN report printed at the end of pretraining: trained teacher vs the same network at random init."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    knn: Mapping[str, Any],
    num_classes: int,
    n_splits: int,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """k-NN under grouped stratified k-fold; ``knn`` is the config node (conf/knn/reference.yaml: ks,
    metric, temperature, chunk_size).

    Returns ``{"k=1": {"weighted_f1": {"mean": .., "std": .., "folds": [..]}, ...}, ...}``.
    """
    ks = [int(k) for k in knn["ks"]]
    per_k: dict[int, dict[str, list[float]]] = {k: {m: [] for m in METRICS} for k in ks}
    for train_idx, test_idx in grouped_kfold(labels.numpy(), groups, n_splits, seed):
        tr, te = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
        for k in ks:
            pred = knn_predict(
                features[tr],
                labels[tr],
                features[te],
                k,
                num_classes,
                knn["metric"],
                knn["temperature"],
                chunk_size=knn["chunk_size"],
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


def knn_description(knn: Mapping[str, Any]) -> str:
    """How the neighbours were found and voted, for the report's protocol section."""
    if knn["metric"] == "cosine":
        return f"cosine similarity, exp(similarity / {knn['temperature']}) votes, raw final-norm CLS features"
    return "euclidean distance, uniform votes, raw final-norm CLS features"


def format_table(results: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> str:
    """Markdown table: one row per (model, k), columns the metrics as mean +- std in percent."""
    header = "| model | k-NN | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for model, by_k in results.items():
        for k, scores in by_k.items():
            cells = [f"{100 * scores[m]['mean']:.1f} ± {100 * scores[m]['std']:.1f}" for m in METRICS]
            lines.append(f"| {model} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
