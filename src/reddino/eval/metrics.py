"""Classification metrics through torchmetrics, averaged the way scikit-learn (and the paper) does.

Balanced accuracy is the mean recall over classes PRESENT in the targets and macro F1 the mean over
classes present in targets or predictions, as sklearn computes them; torchmetrics' plain macro
averages would count absent classes as zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_recall,
)

#: What every probe reports, in this order (the paper's three, then macro F1).
METRICS = ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1")


def classification_metrics(y_true: Tensor, y_pred: Tensor, num_classes: int) -> dict[str, float]:
    """accuracy, balanced_accuracy, weighted_f1 (the paper's three) and macro_f1, as floats in [0, 1]."""
    y_true, y_pred = y_true.long().cpu(), y_pred.long().cpu()
    if y_true.numel() == 0:
        raise ValueError("no samples to score")
    support = torch.bincount(y_true, minlength=num_classes)
    predicted = torch.bincount(y_pred, minlength=num_classes)
    recall = multiclass_recall(y_pred, y_true, num_classes=num_classes, average="none")
    f1 = multiclass_f1_score(y_pred, y_true, num_classes=num_classes, average="none")
    present = support > 0
    seen = present | (predicted > 0)
    return {
        "accuracy": float(multiclass_accuracy(y_pred, y_true, num_classes=num_classes, average="micro")),
        "balanced_accuracy": float(recall[present].mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()),
        "macro_f1": float(f1[seen].mean()),
    }


def confusion_matrix(y_true: Tensor, y_pred: Tensor, num_classes: int) -> Tensor:
    """Rows are true classes, columns predictions (counts)."""
    return multiclass_confusion_matrix(y_pred.long().cpu(), y_true.long().cpu(), num_classes=num_classes)
