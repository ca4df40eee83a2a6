"""Evaluation splits. Cells of one smear/subject are near-duplicates, so folds are grouped by default.

Protocols (``make_splits``):

- ``grouped_kfold``: stratified k-fold with no group (image, slide, subject) on both sides. Ours.
- ``stratified_kfold``: the reference's ungrouped StratifiedKFold (no shuffle when ``seed`` is None).
  Cells of one image land in train and test, so it measures near-duplicate retrieval as much as
  generalisation; kept to show that difference, never validated for leakage.
- ``loso``: leave one source (dataset, scanner, lab) out, the paper's Elsafty-style generalisation test.
- ``fixed``: a given train/test column of the manifest.
- ``transfer``: train on one dataset, test on another (``split`` tags "train" / "test" set by
  ``reddino-eval`` from ``data.eval_units`` and ``eval.test_units``): the batch-effect test of a
  probe trained on public data and used on a lab's own cells.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

PROTOCOLS = ("grouped_kfold", "stratified_kfold", "loso", "fixed", "transfer")


@dataclass(frozen=True, eq=False)
class Split:
    """One train/test partition, as integer row indices into the evaluated table."""

    name: str
    train_idx: np.ndarray
    test_idx: np.ndarray


def grouped_kfold(
    labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold where no group (image, slide or subject) appears on both sides of a split."""
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ValueError(f"{n_splits} grouped folds need at least {n_splits} groups, got {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    yield from splitter.split(np.zeros(len(labels)), labels, groups)


def stratified_kfold(
    labels: np.ndarray, n_splits: int, seed: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The reference's ungrouped stratified folds; ``seed=None`` keeps its order-based, unshuffled folds."""
    labels = np.asarray(labels)
    if n_splits < 2:
        raise ValueError(f"k-fold needs n_splits >= 2, got {n_splits}")
    if len(labels) < n_splits:
        raise ValueError(f"{n_splits} folds need at least {n_splits} samples, got {len(labels)}")
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=seed is not None, random_state=seed)
    yield from splitter.split(np.zeros(len(labels)), labels)


def leave_one_group_out(groups: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """Hold out each distinct value of ``groups`` (a source) once: (train_idx, test_idx, held_out_name)."""
    groups = np.asarray(groups)
    names = np.unique(groups)
    if len(names) < 2:
        raise ValueError(f"leave-one-source-out needs at least 2 sources, got {len(names)}: {names.tolist()}")
    for name in names:
        held = groups == name
        yield np.flatnonzero(~held), np.flatnonzero(held), str(name)


def fixed_split(
    split_names: np.ndarray, train: str = "train", test: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Rows tagged ``train`` vs rows tagged ``test``; other tags (e.g. "val") are left out."""
    split_names = np.asarray(split_names).astype(str)
    train_idx, test_idx = np.flatnonzero(split_names == train), np.flatnonzero(split_names == test)
    missing = [name for name, idx in ((train, train_idx), (test, test_idx)) if len(idx) == 0]
    if missing:
        raise ValueError(
            f"no rows tagged {missing}; split names present: {sorted(set(split_names.tolist()))}"
        )
    return train_idx, test_idx


def check_no_group_leakage(split: Split, groups: np.ndarray) -> None:
    """Raise if any group has rows on both sides of ``split`` (near-duplicates would inflate scores)."""
    groups = np.asarray(groups)
    shared = np.intersect1d(groups[split.train_idx], groups[split.test_idx])
    if len(shared):
        raise ValueError(
            f"split {split.name!r}: {len(shared)} groups on both sides (e.g. {shared[:3].tolist()})"
        )


def make_splits(
    protocol: str,
    labels: np.ndarray,
    groups: np.ndarray | None,
    sources: np.ndarray | None,
    splits: np.ndarray | None,
    n_splits: int,
    seed: int | None,
) -> list[Split]:
    """All train/test partitions of ``protocol`` (one of ``PROTOCOLS``), validated against group leakage.

    ``groups`` (image/subject ids) are required by ``grouped_kfold`` and, when given, checked for every
    protocol but ``stratified_kfold`` (leaky by design). ``sources`` drive ``loso``; ``splits`` (per-row
    "train"/"test" tags) drive ``fixed``.
    """
    labels = np.asarray(labels)
    for name, column in (("groups", groups), ("sources", sources), ("splits", splits)):
        if column is not None and len(column) != len(labels):
            raise ValueError(f"{name} has {len(column)} rows but labels has {len(labels)}")
    if protocol == "grouped_kfold":
        if groups is None:
            raise ValueError("grouped_kfold needs groups (image or subject ids)")
        if seed is None:
            raise ValueError("grouped_kfold shuffles groups and needs an integer seed")
        folds = grouped_kfold(labels, np.asarray(groups), n_splits, seed)
        result = [Split(f"fold{i}", tr, te) for i, (tr, te) in enumerate(folds)]
    elif protocol == "stratified_kfold":
        folds = stratified_kfold(labels, n_splits, seed)
        return [Split(f"fold{i}", tr, te) for i, (tr, te) in enumerate(folds)]
    elif protocol == "loso":
        if sources is None:
            raise ValueError("loso needs a source per row")
        result = [Split(f"loso:{name}", tr, te) for tr, te, name in leave_one_group_out(sources)]
    elif protocol in ("fixed", "transfer"):
        if splits is None:
            raise ValueError(f"the {protocol} protocol needs a split tag per row")
        result = [Split(protocol, *fixed_split(splits))]
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if groups is not None:
        for split in result:
            check_no_group_leakage(split, groups)
    return result
