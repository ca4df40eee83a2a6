"""reddino.viz on tiny inputs: the results table's cells, the patch-token PCA and the UMAP panels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from reddino.ssl.backbone import build_backbone
from reddino.viz.pca import (
    PatchTokens,
    patch_foreground,
    patch_pca,
    patch_tokens,
    pca_figure,
    principal_components,
    unit_range,
)
from reddino.viz.plots import flat_columns, results_table, table_figure
from reddino.viz.umap import umap_panels

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _scores(mean: float, std: float) -> dict[str, float]:
    return {"mean": mean, "std": std}


def test_results_table_formats_mean_and_std_in_the_paper_layout():
    results = {
        "pretrained_teacher": {
            "knn1": {"weighted_f1": _scores(0.3567, 0.0123), "accuracy": _scores(0.4, 0.01)},
            "knn20": {"weighted_f1": _scores(0.5, 0.0)},
        },
        "random_init": {"knn1": {"weighted_f1": _scores(0.25, 0.02), "accuracy": _scores(0.3, 0.05)}},
        "dinobloom": {"linear": {"weighted_f1": _scores(0.9, 0.001)}, "knn20": {"accuracy": _scores(1.0, 0)}},
    }
    table = results_table(results, ["weighted_f1", "accuracy"])
    assert list(table.index) == ["teacher", "random init", "dinobloom"]
    assert list(table.columns) == [  # linear first, then k-NN by k, whichever entry point wrote them
        ("linear", "wF1"),
        ("linear", "Acc"),
        ("1-NN", "wF1"),
        ("1-NN", "Acc"),
        ("20-NN", "wF1"),
        ("20-NN", "Acc"),
    ]
    assert table.loc["teacher", ("1-NN", "wF1")] == "35.7 ± 1.2"
    assert table.loc["teacher", ("20-NN", "wF1")] == "50.0 ± 0.0"
    assert table.loc["teacher", ("20-NN", "Acc")] == ""  # a metric the run did not report stays empty
    assert table.loc["random init", ("20-NN", "wF1")] == ""  # a probe the model lacks stays empty
    assert table.loc["dinobloom", ("20-NN", "Acc")] == "100.0 ± 0.0"  # knn20 of reddino-eval = 20-NN
    assert table.loc["dinobloom", ("linear", "wF1")] == "90.0 ± 0.1"

    flat = flat_columns(table)
    assert list(flat.columns[:3]) == ["model", "linear wF1", "linear Acc"]
    fig = table_figure(table, "tiny")
    texts = {cell.get_text().get_text() for cell in fig.axes[0].tables[0].get_celld().values()}
    assert {"35.7 ± 1.2", "teacher", "1-NN\nwF1", "linear\nAcc"} <= texts


def test_principal_components_orders_by_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) * np.array([10.0, 3.0, 0.1])
    proj = principal_components(x, 2)
    assert proj.shape == (500, 2)
    assert proj[:, 0].std() == pytest.approx(10.0, rel=0.1)
    assert proj[:, 1].std() == pytest.approx(3.0, rel=0.1)


def test_unit_range_clips_outliers_per_column():
    values = np.stack([np.r_[np.arange(999.0), 1e6], np.linspace(-1.0, 1.0, 1000)], axis=1)
    scaled = unit_range(values, clip_percent=1.0)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert scaled[-1, 0] == 1.0 and scaled[500, 0] == pytest.approx(0.5, abs=0.01)  # not squeezed to ~0
    assert unit_range(values, clip_percent=0.0)[500, 0] < 0.001  # what min-max scaling would do
    np.testing.assert_allclose(unit_range(values, clip_percent=0.0)[:, 1], np.linspace(0, 1, 1000))


def test_patch_foreground_counts_covered_patches():
    instances = np.zeros((32, 32), np.uint16)
    instances[:16, :16] = 3  # the top-left quarter is one object
    instances[16:20, 16:20] = 4  # 1/4 of one 8x8 patch: below a 0.5 cover
    fg = patch_foreground(instances, (4, 4), min_cover=0.5)
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(fg, expected)


def _discs() -> tuple[np.ndarray, np.ndarray]:
    """Four dark stained discs on a bright background, and their instance map."""
    image = np.full((128, 128, 3), (235, 225, 230), np.uint8)
    instances = np.zeros((128, 128), np.uint16)
    for i, centre in enumerate([(30, 30), (90, 40), (40, 95), (95, 100)]):
        cv2.circle(image, centre, 22, (170, 80, 110), -1)
        cv2.circle(instances, centre, 22, i + 1, -1)
    return image, instances


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    tiny = {"embed_dim": 48, "depth": 2, "num_heads": 2}
    return build_backbone("vit_small_patch14_dinov2", 64, 8, 0.0, 1.0, True, tiny)


def test_pca_of_patch_tokens_separates_cells_from_background(tiny_vit):
    image, instances = _discs()
    tokens = patch_tokens(tiny_vit, image, 128, *IMAGENET)
    assert tokens.grid == (16, 16) and tokens.tokens.shape == (256, 48)
    truth = patch_foreground(instances, tokens.grid, 0.5)

    pca = patch_pca(tokens, foreground=None, clip_percent=1.0)  # foreground from the first component alone
    assert (pca.foreground == truth).mean() > 0.85  # the border patches are half cell, half background
    assert pca.rgb.shape == (16, 16, 3)
    assert pca.rgb.min() >= 0.0 and pca.rgb.max() <= 1.0
    assert (pca.rgb[~pca.foreground] == 0).all()
    assert np.ptp(pca.rgb[pca.foreground], axis=0).min() > 0.5  # each channel spans the foreground

    given = patch_pca(tokens, foreground=truth, clip_percent=1.0)
    np.testing.assert_array_equal(given.foreground, truth)
    fig = pca_figure(image, given, "tiny")
    assert len(fig.axes) == 3


def test_pca_foreground_side_follows_the_darker_patches():
    """The first component's sign is arbitrary: flipping the tokens must not flip the foreground."""
    rng = np.random.default_rng(0)
    dark = np.zeros((4, 4), bool)
    dark[1:3, 1:3] = True
    tokens = rng.normal(scale=0.01, size=(16, 8))
    tokens[dark.ravel(), 0] += 5.0
    brightness = np.where(dark, 60.0, 220.0)
    for sign in (1.0, -1.0):
        pca = patch_pca(PatchTokens(sign * tokens, (4, 4), brightness), foreground=None, clip_percent=0.0)
        np.testing.assert_array_equal(pca.foreground, dark)
    with pytest.raises(ValueError, match="patch grid"):
        patch_pca(PatchTokens(tokens, (4, 4), brightness), foreground=np.ones((2, 8), bool), clip_percent=0.0)


def test_umap_panels_share_coordinates_and_label_every_group():
    xy = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5], [3.0, 3.0]])
    fig = umap_panels(xy, {"class": ["a", "b", "a", "c"], "subject": ["s1", "s1", "s2", "s2"]}, "tiny")
    by_class, by_subject = fig.axes
    assert by_class.get_title() == "class" and by_subject.get_title() == "subject"
    assert [t.get_text() for t in by_class.get_legend().get_texts()] == ["a", "b", "c"]
    assert [t.get_text() for t in by_subject.get_legend().get_texts()] == ["s1", "s2"]
    for ax in (by_class, by_subject):
        points = np.concatenate([c.get_offsets() for c in ax.collections])
        assert sorted(map(tuple, points)) == sorted(map(tuple, xy))
    with pytest.raises(ValueError, match="3 labels for 4 points"):
        umap_panels(xy, {"class": ["a", "b", "c"]}, "bad")
