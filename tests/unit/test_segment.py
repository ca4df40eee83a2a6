"""Single-cell segmentation: the classical backend on drawn smears, the mask measurements, and the
Cellpose backend's local-weights-only contract (never a download), exercised on the real package."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image
from scipy import ndimage as ndi

from reddino.data.io import read_rgb
from reddino.data.segment import (
    BOX_COLUMNS,
    CellposeSegmenter,
    ClassicalSegmenter,
    LazySegmenter,
    Segmenter,
    SegmenterWeightsMissing,
    _downloads_forbidden,
    build_segmenter,
    cellpose_default_model,
    estimate_cell_diameter,
    label_boxes,
    match_centres,
    resolve_cellpose_weights,
)
from reddino.runtime.paths import config_dir

# The values tuned on Chula (benchmarks/segment_chula.md), exactly as the preparation config carries them.
UNIT_CUTTING = OmegaConf.load(config_dir() / "unit_cutting" / "default.yaml")
CLASSICAL = OmegaConf.to_container(UNIT_CUTTING.segmentation.classical)
CELLPOSE = {
    "weights": None,
    "diameter": 40.0,
    "gpu": False,
    "batch_size": 1,
    "flow_threshold": 0.4,
    "cellprob_threshold": 0.0,
    "min_size": 15,
    "use_bfloat16": True,
}
RADIUS = 20


def draw_smear(
    shape: tuple[int, int], centres: list[tuple[float, float]], seed: int = 0, radius: float = RADIUS
) -> np.ndarray:
    """Stained discs on a light background, rendered as optical density (overlaps add, like real smears).

    Each disc has a dense rim and a pale centre (the pallor), so a plain threshold leaves a ring and
    a hole; the segmenter must fill it.
    """
    h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    od = np.zeros(shape)
    for cx, cy in centres:
        r = np.hypot(xx - cx, yy - cy)
        inside = np.clip(radius + 0.5 - r, 0.0, 1.0)
        od += inside * (0.42 - 0.36 * np.exp(-((r / (0.4 * radius)) ** 2)))
    absorb = np.array([0.25, 1.0, 0.55])
    light = np.array([235.0, 232.0, 240.0])
    rng = np.random.default_rng(seed)
    image = light * 10.0 ** (-od[..., None] * absorb) + rng.normal(0.0, 2.0, (h, w, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def grid_centres(n_cols: int, n_rows: int, step: int, offset: int) -> list[tuple[float, float]]:
    return [(offset + i * step, offset + j * step) for j in range(n_rows) for i in range(n_cols)]


@pytest.fixture(scope="module")
def classical() -> ClassicalSegmenter:
    return ClassicalSegmenter(**CLASSICAL)


# --------------------------------------------------------------------------------------------------
# Classical backend
# --------------------------------------------------------------------------------------------------


def test_isolated_discs_one_label_each(classical):
    centres = grid_centres(6, 4, 80, 60)  # 24 discs, well inside a 480x360 image
    mask = classical.segment(draw_smear((360, 480), centres))
    assert mask.dtype == np.int32 and mask.shape == (360, 480)
    assert mask.max() == len(np.unique(mask)) - 1  # numbered 1..n
    assert abs(int(mask.max()) - len(centres)) <= 1
    hits = [mask[int(cy), int(cx)] for cx, cy in centres]
    assert all(hits) and len(set(hits)) == len(centres)


def test_pallor_is_filled_not_a_ring(classical):
    centres = [(60.0, 60.0), (140.0, 60.0)]
    image = draw_smear((120, 200), centres)
    no_filling = ClassicalSegmenter(**{**CLASSICAL, "max_hole_area": 0})
    assert not no_filling.foreground_mask(image)[60, 60], "the drawn pallor must threshold as a hole"
    mask = classical.segment(image)
    assert mask.max() == 2
    for label in (1, 2):
        region = mask == label
        assert ndi.binary_fill_holes(region).sum() == region.sum()  # solid: no hole left inside
        assert region.sum() == pytest.approx(np.pi * RADIUS**2, rel=0.15)
    assert mask[60, 60] and mask[60, 140]


def test_touching_pairs_are_split(classical):
    # three pairs whose discs overlap (centre distance 0.8-0.9 of the diameter)
    pairs = [((60, 60), (94, 60)), ((200, 60), (236, 70)), ((60, 170), (60, 206))]
    centres = [c for pair in pairs for c in pair]
    mask = classical.segment(draw_smear((260, 320), centres))
    for a, b in pairs:
        la, lb = mask[a[1], a[0]], mask[b[1], b[0]]
        assert la and lb and la != lb, f"pair {a}-{b} not split"
    assert mask.max() == len(centres)
    points = np.array(centres, dtype=float)
    assert match_centres(mask, points)["recall"] == 1.0


def test_border_cells(classical):
    # a sliver (centre outside the image), a cell mostly inside touching the edge, a free cell
    centres = [(-6.0, 60.0), (18.0, 150.0), (120.0, 100.0)]  # sliver: ~390 px
    image = draw_smear((200, 220), centres)
    mask = classical.segment(image)
    assert mask[60, 2] == 0, "sliver of a cut cell must be dropped"
    assert mask[150, 18] and mask[100, 120]
    keep_all = ClassicalSegmenter(**{**CLASSICAL, "border_min_area": 0}).segment(image)
    assert keep_all[60, 2] != 0
    drop_all = ClassicalSegmenter(**{**CLASSICAL, "border_min_area": CLASSICAL["max_area"] + 1}).segment(
        image
    )
    assert drop_all[150, 18] == 0 and drop_all[100, 120] != 0 and drop_all.max() == 1


def test_blank_and_noise_images_give_empty_masks(classical):
    blank = np.full((120, 160, 3), 230, np.uint8)
    assert classical.segment(blank).max() == 0
    noise = np.clip(230 + np.random.default_rng(1).normal(0, 3, (120, 160, 3)), 0, 255).astype(np.uint8)
    mask = classical.segment(noise)
    assert mask.shape == (120, 160) and mask.dtype == np.int32 and mask.max() == 0


def test_grayscale_goes_through_read_rgb(classical, tmp_path):
    grey = draw_smear((120, 200), [(60.0, 60.0), (140.0, 60.0)])[..., 1]
    with pytest.raises(ValueError, match="read_rgb"):
        classical.segment(grey)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    mask = classical.segment(read_rgb(tmp_path / "grey.png"))
    assert mask.max() == 2


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="foreground"):
        ClassicalSegmenter(**{**CLASSICAL, "foreground": "blue"})
    with pytest.raises(ValueError, match="threshold"):
        ClassicalSegmenter(**{**CLASSICAL, "threshold": "median"})
    with pytest.raises(ValueError, match="max_area"):
        ClassicalSegmenter(**{**CLASSICAL, "max_area": 10})
    with pytest.raises(TypeError):
        ClassicalSegmenter(cell_diameter=40.0)  # every parameter is required


@pytest.mark.real_data
def test_classical_on_chula_dense_smears(classical):
    root = os.environ.get("REDDINO_DATA_ROOT")
    chula = Path(root or "/nonexistent") / "chula-rbc-12"
    if not (chula / "Label" / "2.txt").is_file():
        pytest.skip("REDDINO_DATA_ROOT/chula-rbc-12 not available")
    recovered = points = 0
    for n in (2, 101, 256):
        pts = np.loadtxt(chula / "Label" / f"{n}.txt", ndmin=2)[:, :2]
        result = match_centres(classical.segment(read_rgb(chula / "Dataset" / f"{n}.jpg")), pts)
        recovered, points = recovered + result["recovered"], points + result["points"]
    assert recovered / points >= 0.85


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def hand_mask() -> np.ndarray:
    mask = np.zeros((20, 30), np.int32)
    mask[2:6, 3:9] = 1  # x 3..8, y 2..5
    mask[10:18, 10:20] = 2
    mask[1:4, 25:29] = 5  # a non-consecutive label
    return mask


def test_label_boxes_exclusive_ends_and_centroids():
    boxes = label_boxes(hand_mask())
    assert list(boxes.columns) == list(BOX_COLUMNS)
    assert list(boxes.index) == [1, 2, 5]
    assert boxes.loc[1, ["x0", "y0", "x1", "y1", "area"]].tolist() == [3, 2, 9, 6, 24]
    assert boxes.loc[2, ["cx", "cy"]].tolist() == pytest.approx([14.5, 13.5])
    assert boxes.loc[5, "area"] == 12
    empty = label_boxes(np.zeros((5, 5), np.int32))
    assert empty.empty and list(empty.columns) == list(BOX_COLUMNS)


def test_match_centres_exact_counts():
    points = np.array(
        [
            [5.0, 3.0],  # in cell 1, alone -> recovered
            [12.0, 12.0],  # cell 2 holds two points -> merged, neither recovered
            [18.2, 16.6],  # rounds to (18, 17): cell 2
            [0.0, 19.0],  # background
            [30.0, 5.0],  # outside the image (x == width): left out
        ]
    )
    result = match_centres(hand_mask(), points)
    assert result == {
        "recall": 0.25,  # 1 recovered of 4 points inside the image
        "precision": pytest.approx(2 / 3),  # cells 1 and 2 hold points, cell 5 does not
        "points": 4,
        "points_outside": 1,
        "points_in_background": 1,
        "recovered": 1,
        "cells": 3,
        "cells_with_point": 2,
        "merged_cells": 1,
    }
    none = match_centres(np.zeros((4, 4), np.int32), np.empty((0, 2)))
    assert np.isnan(none["recall"]) and np.isnan(none["precision"])


# --------------------------------------------------------------------------------------------------
# Factory and the Cellpose backend (real cellpose package, never a download)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def cellpose_models():
    return pytest.importorskip("cellpose.models")


@pytest.fixture
def model_dirs(tmp_path, monkeypatch, cellpose_models) -> tuple[Path, Path]:
    """An empty env model dir and an empty cellpose MODEL_DIR: the machine's own ~/.cellpose never counts."""
    env_dir, home_dir = tmp_path / "env_models", tmp_path / "home_models"
    env_dir.mkdir()
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(env_dir))
    monkeypatch.setattr(cellpose_models, "MODEL_DIR", home_dir)
    return env_dir, home_dir


@pytest.fixture
def no_network(monkeypatch, cellpose_models) -> list[str]:
    """Fail loudly on any download or socket connection; returns the URLs cellpose tried to fetch."""
    import cellpose.utils

    attempts: list[str] = []

    def fake_download(url, dst, progress=True):
        attempts.append(url)
        raise AssertionError(f"download attempted: {url}")

    def no_connect(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setattr(cellpose.utils, "download_url_to_file", fake_download)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return attempts


def test_build_segmenter_classical_and_errors():
    seg = build_segmenter("classical", CELLPOSE, CLASSICAL)
    assert isinstance(seg, Segmenter) and seg.name == "classical"
    assert seg.describe()["border_min_area"] == 800
    with pytest.raises(ValueError, match="backend"):
        build_segmenter("stardist", CELLPOSE, CLASSICAL)
    with pytest.raises(ValueError, match=r"unknown \['typo'\]"):
        build_segmenter("classical", CELLPOSE, {**CLASSICAL, "typo": 1})


def test_missing_weights_message_and_no_download(model_dirs, no_network, cellpose_models):
    env_dir, home_dir = model_dirs
    default = cellpose_default_model()
    assert default in cellpose_models.MODEL_NAMES
    with pytest.raises(SegmenterWeightsMissing) as info:
        build_segmenter("cellpose", CELLPOSE, CLASSICAL)
    message = str(info.value)
    assert str(env_dir / default) in message and str(home_dir / default) in message
    assert cellpose_models._MODEL_URL + default in message
    assert "CELLPOSE_LOCAL_MODELS_PATH" in message
    assert no_network == [] and not home_dir.exists()  # not even cellpose's model dir was created


def test_missing_explicit_path_is_named(model_dirs, no_network, tmp_path):
    missing = tmp_path / "nowhere" / "my_model.pt"
    with pytest.raises(SegmenterWeightsMissing, match=r"my_model\.pt") as info:
        CellposeSegmenter(**{**CELLPOSE, "weights": str(missing)})
    assert str(missing) in str(info.value)
    assert no_network == []


def test_cellpose_own_download_path_is_blocked(model_dirs, no_network, cellpose_models):
    """If cellpose itself decided to fetch a model, the guard stops it before any network access."""
    with _downloads_forbidden(), pytest.raises(SegmenterWeightsMissing, match="downloads are disabled"):
        cellpose_models.CellposeModel(gpu=False, pretrained_model=cellpose_default_model())
    assert no_network == []
    assert cellpose_models.cache_model_path.__name__ == "cache_model_path"  # restored afterwards


def test_auto_falls_back_to_classical_with_warning(model_dirs, no_network, caplog):
    env_dir, _ = model_dirs
    with caplog.at_level(logging.WARNING, logger="reddino.data.segment"):
        seg = build_segmenter("auto", CELLPOSE, CLASSICAL)
    assert seg.name == "classical"
    assert str(env_dir / cellpose_default_model()) in caplog.text
    assert "classical" in caplog.text and "fell back" in seg.selection_note
    assert no_network == []


def test_auto_uses_cellpose_when_weights_are_local(model_dirs, no_network, monkeypatch, cellpose_models):
    """Selection and wiring only (the network itself is exercised in the slow test below)."""
    env_dir, _ = model_dirs
    weights = env_dir / cellpose_default_model()
    weights.write_bytes(b"placeholder")
    options = {**CELLPOSE, "weights": weights.name}  # by name, looked up in the local dirs
    built = {}

    class FakeModel:
        device = "cpu"

        def __init__(self, **kwargs):
            built.update(kwargs)

        def eval(self, image, **kwargs):
            built["eval"] = kwargs
            return np.ones(image.shape[:2], np.uint16), None, None

    monkeypatch.setattr(cellpose_models, "CellposeModel", FakeModel)
    seg = build_segmenter("auto", options, CLASSICAL)
    assert seg.name == "cellpose" and "found" in seg.selection_note
    assert built["pretrained_model"] == str(weights.resolve()) and built["gpu"] is False
    mask = seg.segment(np.zeros((8, 10, 3), np.uint8))
    assert mask.dtype == np.int32 and mask.shape == (8, 10)
    assert built["eval"]["diameter"] == 40.0 and built["eval"]["channel_axis"] == -1
    assert resolve_cellpose_weights(str(weights)) == weights.resolve()
    assert no_network == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_real_cellpose_runs_on_locally_made_weights(model_dirs, no_network, cellpose_models):
    """Cellpose-SAM end to end with a randomly initialised weights file in cellpose's own format.

    cellpose 4 always builds the full ViT-L CPSAM (305 M parameters; ``CellposeModel`` passes no size
    arguments), so the file is the real 1.2 GB state dict written by cellpose's ``save_model``. Random
    weights segment nothing meaningful: only shapes, dtypes and the no-download contract are checked.
    """
    import torch
    from cellpose.vit import CPSAM

    env_dir, _ = model_dirs
    weights = env_dir / cellpose_default_model()
    torch.manual_seed(0)
    try:
        net = CPSAM()
        net.save_model(str(weights))
        del net
        seg = build_segmenter("auto", CELLPOSE, CLASSICAL)
        assert seg.name == "cellpose" and seg.describe()["weights"] == str(weights.resolve())
        image = draw_smear((96, 128), [(40.0, 48.0), (90.0, 48.0)])
        mask = seg.segment(image)
        assert mask.shape == (96, 128) and mask.dtype == np.int32 and mask.min() >= 0
        assert isinstance(label_boxes(mask), pd.DataFrame)
    finally:
        weights.unlink(missing_ok=True)
    assert no_network == []


# --------------------------------------------------------------------------------------------------
# Smears at another magnification
# --------------------------------------------------------------------------------------------------


def scaled_smear(radius: float, pairs: bool = False) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """A 5 x 3 grid of discs of ``radius`` (optionally every second one touching a neighbour)."""
    step = 4 * radius
    centres = grid_centres(5, 3, int(step), int(2 * radius))
    if pairs:
        centres += [(cx + 1.8 * radius, cy) for cx, cy in centres[::2]]
    shape = (int(2 * radius + 3 * step), int(2 * radius + 5 * step))
    return draw_smear(shape, centres, radius=radius), centres


@pytest.mark.parametrize("radius", [8, 20, 40])
def test_the_cell_diameter_is_estimated_at_any_magnification(classical, radius):
    image, _ = scaled_smear(radius)
    estimate = estimate_cell_diameter(classical.stained(image))
    assert estimate is not None and abs(estimate - 2 * radius) <= 0.2 * 2 * radius
    assert estimate_cell_diameter(np.zeros((50, 50), bool)) is None


@pytest.mark.parametrize("radius", [8, 40])
def test_cells_at_half_or_twice_the_size_come_out_whole(classical, radius):
    image, centres = scaled_smear(radius, pairs=True)
    mask = classical.segment(image)
    hits = [mask[int(cy), int(cx)] for cx, cy in centres]
    assert all(hits) and len(set(hits)) == len(centres) == int(mask.max())
    as_written = classical.segment_as_written(image)  # parameters for 40 px cells: misses or splits
    assert len({as_written[int(cy), int(cx)] for cx, cy in centres} - {0}) < len(centres)


def test_at_chula_size_the_parameters_stay_as_written(classical):
    image, _ = scaled_smear(RADIUS, pairs=True)
    assert classical.scale_for(image) == 1.0
    np.testing.assert_array_equal(classical.segment(image), classical.segment_as_written(image))
    fixed = ClassicalSegmenter(**{**CLASSICAL, "estimate_diameter": False})
    assert fixed.scale_for(scaled_smear(40)[0]) == 1.0


def test_segmentation_stats_travel_with_the_boxes():
    segment = LazySegmenter({"backend": "classical", "cellpose": CELLPOSE, "classical": CLASSICAL})
    image, centres = scaled_smear(RADIUS)
    boxes = segment(image)
    stats = boxes.attrs["segmentation"]
    assert stats["segmented_cells"] == len(centres) == len(boxes)
    assert stats["foreground_covered"] > 0.9
    assert abs(stats["cell_diameter_px"] - 2 * RADIUS) < 8
    assert stats["cell_area_p10"] <= stats["cell_area_median"] <= stats["cell_area_p90"]
