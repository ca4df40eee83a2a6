"""Image reading (bad input), unit geometry and the labelled dataset's global label map."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reddino.data.datasets import LabelledUnitDataset, eval_transform
from reddino.data.io import BadImageError, read_rgb
from reddino.data.manifest import validate_units
from reddino.data.patches import crop_padded, square_boxes, tile_boxes


def test_read_rgb_normalises_modes(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(tmp_path / "16.png")
    g = read_rgb(tmp_path / "g.png")
    assert g.shape == (8, 8, 3) and g.dtype == np.uint8 and (g[..., 0] == grey).all()
    assert read_rgb(tmp_path / "rgba.png").shape == (8, 8, 3)
    sixteen = read_rgb(tmp_path / "16.png")
    assert sixteen.dtype == np.uint8 and sixteen.min() == 0 and sixteen.max() == 255


def test_read_rgb_errors_name_the_file(tmp_path):
    with pytest.raises(BadImageError, match=r"missing\.jpg: file not found"):
        read_rgb(tmp_path / "missing.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match=r"junk\.jpg: cannot decode"):
        read_rgb(tmp_path / "junk.jpg")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match=r"trunc\.jpg"):
        read_rgb(tmp_path / "trunc.jpg")


def test_tiles_are_non_overlapping_full_tiles():
    boxes = tile_boxes(640, 480, 224)
    assert boxes.tolist() == [[0, 0, 224, 224], [224, 0, 448, 224], [0, 224, 224, 448], [224, 224, 448, 448]]
    assert len(tile_boxes(100, 100, 224)) == 0
    with pytest.raises(ValueError):
        tile_boxes(10, 10, 0)


def test_crop_padded_replicates_edges_outside_the_image():
    image = np.arange(25, dtype=np.uint8).reshape(5, 5, 1)
    crop = crop_padded(image, (-2, -1, 3, 2))
    assert crop.shape == (3, 5, 1)
    assert crop[1, :, 0].tolist() == [0, 0, 0, 1, 2]  # row 0 of the image, left-padded with its edge
    assert crop_padded(image, (1, 1, 3, 3))[..., 0].tolist() == [[6, 7], [11, 12]]
    with pytest.raises(ValueError, match="outside"):
        crop_padded(image, (10, 10, 12, 12))
    sq = square_boxes(np.array([10.0]), np.array([20.0]), 8.0)
    assert sq.tolist() == [[6, 16, 14, 24]]


def test_square_boxes_of_edge_slivers_still_overlap_the_image():
    """A cell cut by the smear's edge down to a 1-px sliver: centre 0.5, box side 1.2 x its 1 px. Plain
    floor/round arithmetic put that box at x in [-1, 0), wholly outside, and crop_padded raised mid-run."""
    boxes = square_boxes(
        np.array([0.5, 383.5, 10.0]), np.array([337.3, 0.5, 20.0]), np.array([1.2, 1.2, 8.0])
    )
    image = np.zeros((384, 384, 3), np.uint8)
    for box in boxes:
        assert crop_padded(image, box).shape[:2] == (box[3] - box[1], box[2] - box[0])
    assert boxes[0].tolist() == [0, 337, 1, 338] and boxes[1].tolist() == [383, 0, 384, 1]
    assert boxes[2].tolist() == [6, 16, 14, 24]  # ordinary boxes are unchanged


def _units(tmp_path, labels):
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "a.png")
    return pd.DataFrame(
        {
            "file": str(tmp_path / "a.png"),
            "x0": 0,
            "y0": 0,
            "x1": 20,
            "y1": 20,
            "unit": "cell",
            "source": "s",
            "subject": "s/1",
            "label": labels,
        }
    )


def test_labelled_dataset_uses_one_global_label_map(tmp_path):
    ds = LabelledUnitDataset(
        _units(tmp_path, ["b", "a"]),
        eval_transform(16, (0.5,) * 3, (0.5,) * 3),
        ["a", "b", "c"],
        cache_size=4,
    )
    image, label = ds[0]
    assert image.shape == (3, 16, 16) and label == 1 and ds[1][1] == 0
    with pytest.raises(ValueError, match="outside the label map"):
        LabelledUnitDataset(
            _units(tmp_path, ["a", "zzz"]),
            eval_transform(16, (0.5,) * 3, (0.5,) * 3),
            ["a", "b"],
            cache_size=4,
        )


def test_validate_units_reports_problems(tmp_path):
    units = _units(tmp_path, ["a"])
    with pytest.raises(ValueError, match="lacks columns"):
        validate_units(units.drop(columns=["subject"]))
    with pytest.raises(ValueError, match="empty box"):
        validate_units(units.assign(x1=0))
    with pytest.raises(ValueError, match="is empty"):
        validate_units(units.iloc[:0])
