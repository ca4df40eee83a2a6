"""Evaluation splits. Cells of one smear/subject are near-duplicates, so folds are grouped by default."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def grouped_kfold(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold where no group (image, slide or subject) appears on both sides of a split."""
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ValueError(f"{n_splits} grouped folds need at least {n_splits} groups, got {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    yield from splitter.split(np.zeros(len(labels)), labels, groups)
