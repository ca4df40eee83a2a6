"""Batch-effect measures on hand-made embeddings: separated sources vs identically distributed ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reddino.eval.batch_effects import neighbour_source_mixing, source_predictability

pytestmark = pytest.mark.usefixtures("single_thread")


def _sources(n_per: tuple[int, ...]) -> np.ndarray:
    return np.repeat(np.array([f"s{i}" for i in range(len(n_per))]), n_per)


def test_separated_sources_have_mixing_ratio_zero():
    rng = np.random.default_rng(0)
    sources = _sources((100, 60, 40))
    offsets = {"s0": 0.0, "s1": 100.0, "s2": -100.0}
    x = rng.normal(size=(200, 8)) + np.array([offsets[s] for s in sources])[:, None]
    out = neighbour_source_mixing(torch.from_numpy(x), sources, k=10, chunk_size=64)
    assert out["observed"] == 0.0
    assert out["ratio"] == 0.0
    # expected = mean over samples of (N - n_s) / (N - 1) = (100*100 + 60*140 + 40*160) / 200 / 199
    assert out["expected"] == pytest.approx((100 * 100 + 60 * 140 + 40 * 160) / 200 / 199)
    assert out["per_source"]["s1"]["expected"] == pytest.approx(140 / 199)


def test_identically_distributed_sources_are_mixed():
    rng = np.random.default_rng(1)
    sources = _sources((300, 300, 150))
    rng.shuffle(sources)
    x = torch.from_numpy(rng.normal(size=(750, 8)))
    out = neighbour_source_mixing(x, sources, k=20, chunk_size=128)
    assert out["ratio"] == pytest.approx(1.0, abs=0.05)


def test_self_is_excluded_by_index_even_for_duplicates():
    """Two identical points of different sources: each one's single neighbour is the other one."""
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0], [10.0, 11.0]])
    out = neighbour_source_mixing(x, np.array(["a", "b", "a", "a"]), k=1)
    assert out["per_source"]["b"]["observed"] == 1.0
    assert out["observed"] == pytest.approx(0.5)  # rows 0 and 1 see the other source, rows 2 and 3 don't


def test_mixing_rejects_impossible_k():
    with pytest.raises(ValueError, match="k must lie"):
        neighbour_source_mixing(torch.zeros(5, 2), np.array(list("aabbb")), k=5)


def _images(n_images: int, cells: int, n_sources: int, shift: float, seed: int):
    """Images of ``cells`` cells, round-robin over sources; each source offset by ``shift`` along one axis."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_images), cells)
    source_idx = groups % n_sources
    x = rng.normal(size=(len(groups), 16))
    x[np.arange(len(groups)), source_idx] += shift
    return torch.from_numpy(x), np.array([f"src{i}" for i in source_idx]), groups


def test_source_predictability_high_under_strong_batch_effect():
    x, sources, groups = _images(40, 10, 4, shift=6.0, seed=0)
    out = source_predictability(x, sources, groups, n_splits=5, seed=0, C=None, max_iter=200)
    assert out["chance"] == 0.25
    assert out["n_sources"] == 4
    assert out["balanced_accuracy"] > 0.99
    assert len(out["folds"]) == 5


def test_source_predictability_at_chance_without_batch_effect():
    x, sources, groups = _images(40, 10, 4, shift=0.0, seed=1)
    out = source_predictability(x, sources, groups, n_splits=5, seed=0, C=None, max_iter=200)
    assert out["balanced_accuracy"] == pytest.approx(0.25, abs=0.08)
