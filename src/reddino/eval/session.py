"""Scoring frozen features: the one fold scorer, metric list and results table behind both
``reddino-eval`` and the report at the end of pretraining (and the k-NN probe callback).

``probes`` is the config node ``conf/probes/reference.yaml``: ``linear`` (enabled, backend, C, max_iter,
device) and ``knn`` (enabled, ks, metric, temperature, chunk_size). Results are
``{probe: {metric: {mean, std, folds}, per_class_f1, confusion, n_test}}`` with probes named
``linear`` and ``knn<k>`` and metrics in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from reddino.eval.knn import knn_predict_many
from reddino.eval.linear import probe_device, reference_C, sklearn_linear_probe, torch_linear_probe
from reddino.eval.metrics import METRICS, classification_metrics, confusion_matrix
from reddino.eval.protocols import Split
from reddino.runtime.markdown import markdown_table
from reddino.runtime.threads import cpu_threads


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z-score with the training fold's statistics (morphometrics mix pixels^2 with ratios)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def probe_predictions(
    x: torch.Tensor, y: torch.Tensor, split: Split, num_classes: int, probes: Mapping[str, Any], scale: bool
) -> dict[str, torch.Tensor]:
    """Test-fold predictions of every enabled probe (linear, k-NN at each k) on one split."""
    tr, te = torch.as_tensor(split.train_idx), torch.as_tensor(split.test_idx)
    x_tr, x_te = standardise(x[tr], x[te]) if scale else (x[tr], x[te])
    out: dict[str, torch.Tensor] = {}
    lin = probes["linear"]
    if lin["enabled"]:
        n_train_classes = int(torch.unique(y[tr]).numel())
        C = lin["C"] if lin["C"] is not None else reference_C(x.shape[1], n_train_classes)
        if lin["backend"] == "sklearn":
            pred = sklearn_linear_probe(x_tr.numpy(), y[tr].numpy(), x_te.numpy(), C, lin["max_iter"])
            out["linear"] = torch.as_tensor(pred)
        else:
            out["linear"] = torch_linear_probe(
                x_tr, y[tr], x_te, num_classes, C, lin["max_iter"], lin["device"]
            )
    knn = probes["knn"]
    if knn["enabled"]:
        ks = [int(k) for k in knn["ks"]]
        device = probe_device(knn["device"])
        by_k = knn_predict_many(
            x_tr.to(device),
            y[tr].to(device),
            x_te,
            ks,
            num_classes,
            knn["metric"],
            knn["temperature"],
            knn["chunk_size"],
        )
        out.update({f"knn{k}": by_k[k].cpu() for k in ks})
    return out


def per_class_f1(confusion: torch.Tensor) -> list[float | None]:
    """F1 of each class from a summed confusion matrix (None for a class never seen nor predicted)."""
    tp = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    denom = support + predicted
    return [float(2 * t / d) if d > 0 else None for t, d in zip(tp, denom, strict=True)]


def score_feature_set(
    features: torch.Tensor,
    labels: torch.Tensor,
    splits: Sequence[Split],
    classes: Sequence[str],
    probes: Mapping[str, Any],
    scale: bool,
) -> dict[str, Any]:
    """Metrics per probe (mean, std, per fold), per-class F1 and the confusion matrix summed over folds.

    ``probes.threads`` (auto | n) sets the CPU threads while scoring; absent, they are left as they are.
    """
    x, y = features.float(), labels.long()
    n = len(classes)
    per_probe: dict[str, dict[str, list[float]]] = {}
    confusion: dict[str, torch.Tensor] = {}
    for split in splits:
        truth = y[torch.as_tensor(split.test_idx)]
        with cpu_threads(probes.get("threads")):
            predictions = probe_predictions(x, y, split, n, probes, scale)
        for probe, pred in predictions.items():
            for metric, value in classification_metrics(truth, pred, n).items():
                per_probe.setdefault(probe, {}).setdefault(metric, []).append(value)
            previous = confusion.get(probe, torch.zeros(n, n, dtype=torch.long))
            confusion[probe] = previous + confusion_matrix(truth, pred, n)
    feature_flags = feature_degeneracy(x)
    return {
        probe: {
            **{
                m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "folds": [float(f) for f in v]}
                for m, v in metrics.items()
            },
            "per_class_f1": dict(zip(classes, per_class_f1(confusion[probe]), strict=True)),
            "confusion": confusion[probe].tolist(),
            "n_test": int(confusion[probe].sum()),
            "flags": feature_flags + prediction_degeneracy(confusion[probe]),
        }
        for probe, metrics in per_probe.items()
    }


#: A probe whose most frequent prediction covers at least this share of the test units, and clearly more
#: than that class's true share, "predicts one class" (the majority-class fallback of a failed fit).
ONE_CLASS_SHARE = 0.95
ONE_CLASS_EXCESS = 0.1
#: Features whose typical per-dimension spread is below this fraction of their typical magnitude are
#: "constant" (a random ViT with LayerScale 1e-5 gives an almost input-independent CLS).
MIN_RELATIVE_SPREAD = 1e-2


def feature_degeneracy(features: torch.Tensor) -> list[str]:
    """``["constant_features (...)"]`` when the features hardly vary across units, else ``[]``."""
    x = features.float()
    spread = float(x.std(0).median())
    scale = float(x.abs().median()) + 1e-12
    if spread < MIN_RELATIVE_SPREAD * scale:
        return [f"constant_features (median spread {spread:.2g} vs magnitude {scale:.2g})"]
    return []


def prediction_degeneracy(confusion: torch.Tensor) -> list[str]:
    """``["predicts_one_class (...)"]`` when nearly every test unit gets the same class, more than truly
    belong to it, else ``[]``."""
    predicted, truth = confusion.sum(0), confusion.sum(1)
    total = int(predicted.sum())
    top, cls = int(predicted.max()), int(predicted.argmax())
    if total and top >= ONE_CLASS_SHARE * total and top >= int(truth[cls]) + ONE_CLASS_EXCESS * total:
        return [f"predicts_one_class ({top} of {total} test units as class {cls})"]
    return []


def degeneracy_warnings(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per flagged (feature set, probe), for the log: a flagged row is not a result."""
    return [
        f"{name} / {probe}: {'; '.join(scores['flags'])}"
        for name, by_probe in results.items()
        for probe, scores in by_probe.items()
        if scores.get("flags")
    ]


def results_table(results: Mapping[str, Mapping[str, Any]], row_label: str = "features") -> str:
    """Markdown: one row per (feature set, probe), the metrics as mean ± std over folds in percent."""
    rows = []
    for feature_set, by_probe in results.items():
        for probe, scores in by_probe.items():
            row = {row_label: feature_set, "probe": probe}
            for m in METRICS:
                row[m] = f"{100 * scores[m]['mean']:.1f} ± {100 * scores[m]['std']:.1f}"
            row["flags"] = ", ".join(f.split(" ")[0] for f in scores.get("flags", []))
            rows.append(row)
    if not rows:
        return "(no classification probe enabled)"
    table = pd.DataFrame(rows)
    if not table["flags"].any():
        table = table.drop(columns="flags")
    return markdown_table(table)


def results_frame(results: Mapping[str, Mapping[str, Any]], row_label: str = "features") -> pd.DataFrame:
    """One row per (feature set, probe, metric): mean and std over folds (for CSV and W&B tables)."""
    return pd.DataFrame(
        [
            {row_label: name, "probe": probe, "metric": m, "mean": s[m]["mean"], "std": s[m]["std"]}
            for name, by_probe in results.items()
            for probe, s in by_probe.items()
            for m in METRICS
        ]
    )


def flat_scores(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``<feature set>/<probe>/<metric>`` -> mean over folds: the scalars every run logs."""
    return {
        f"{name}/{probe}/{m}": s[m]["mean"]
        for name, by_probe in results.items()
        for probe, s in by_probe.items()
        for m in METRICS
    }


def probes_description(probes: Mapping[str, Any]) -> dict[str, str]:
    """How each probe family works, for the protocol section of a report."""
    out = {}
    lin, knn = probes["linear"], probes["knn"]
    if lin["enabled"]:
        c = "C = dim x classes / 100" if lin["C"] is None else f"C = {lin['C']}"
        out["linear"] = f"L2 logistic regression ({lin['backend']}, {c}, max_iter {lin['max_iter']})"
    if knn["enabled"]:
        if knn["metric"] == "cosine":
            out["knn"] = f"cosine similarity, exp(similarity / {knn['temperature']}) votes"
        else:
            out["knn"] = "euclidean distance, uniform votes"
    return out
