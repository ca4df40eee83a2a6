"""Cutting units from parsed images: tiles with background filtering, cell crops, bad images, resume,
cross-source dedup, manifest reading, source weighting and the labelled DataModule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from reddino.data.datamodules import source_weights
from reddino.data.datasets import LabelledUnitDataset, eval_transform
from reddino.data.dedup import find_duplicates, perceptual_hash
from reddino.data.manifest import read_manifest
from reddino.data.patches import foreground_fraction, tile_boxes
from reddino.data.prepare import (
    CellSettings,
    PatchSettings,
    cell_boxes,
    prepare_parsed,
    process_chunk,
    write_parquet_atomic,
)
from reddino.data.sources.records import OBJECT_COLUMNS, ParsedSource, Skipped, empty_objects

PATCHES = PatchSettings(
    enabled=True,
    size=32,
    min_foreground=0.05,
    background_percentile=90,
    contrast=20,
    target_pixel_size_um=None,
)
CELLS = CellSettings(
    enabled=True, point_window=20, box_context=1.5, drop_labels=("WBC",), segment="unlabelled", min_area=10
)


def smear(width: int, height: int, discs: list[tuple[int, int, int]]) -> np.ndarray:
    """Light background with dark discs (cx, cy, r): a cartoon smear."""
    yy, xx = np.mgrid[:height, :width]
    img = np.full((height, width, 3), 230, np.uint8)
    for cx, cy, r in discs:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (150, 60, 90)
    return img


def write(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def image_rows(files, source="ds", subject=None):
    return pd.DataFrame(
        {
            "file": files,
            "width": 0,
            "height": 0,
            "source": source,
            "subject": subject or [f"{source}/{i}" for i in range(len(files))],
            "split": None,
        }
    )


def test_foreground_fraction_separates_empty_tiles():
    img = smear(64, 32, [(16, 16, 10)])  # a cell in the left tile only
    boxes = tile_boxes(64, 32, 32)
    frac = foreground_fraction(img, boxes, 90, 20)
    assert frac[0] == pytest.approx((np.pi * 100) / 1024, abs=0.03)
    assert frac[1] == 0.0
    # brightness does not matter: the background level is measured per smear
    assert foreground_fraction(img // 2 + 10, boxes, 90, 20)[1] == 0.0


def test_cell_boxes_points_and_boxes():
    objects = pd.DataFrame(
        {
            "file": ["a", "a"],
            "x0": [np.nan, 10.0],
            "y0": [np.nan, 10.0],
            "x1": [np.nan, 30.0],
            "y1": [np.nan, 20.0],
            "cx": [50.0, 20.0],
            "cy": [40.0, 15.0],
            "label": ["normal", "RBC"],
        }
    )
    boxes = cell_boxes(objects, CELLS)
    assert boxes.tolist() == [[40, 30, 60, 50], [5, 0, 35, 30]]  # 20 px window; 1.5 x 20 px box side


def test_process_chunk_cuts_units_and_reports_bad_images(tmp_path):
    good = write(tmp_path / "good.png", smear(96, 64, [(16, 16, 10), (70, 40, 12)]))
    tiny = write(tmp_path / "tiny.png", smear(20, 20, [(10, 10, 5)]))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    images = image_rows([good, tiny, str(tmp_path / "broken.jpg")])
    objects = pd.DataFrame(
        {
            "file": [good, good],
            "x0": [np.nan, 58.0],
            "y0": [np.nan, 28.0],
            "x1": [np.nan, 82.0],
            "y1": [np.nan, 52.0],
            "cx": [16.0, 70.0],
            "cy": [16.0, 40.0],
            "label": ["normal", "WBC"],
        }
    )[list(OBJECT_COLUMNS)]

    def segment(rgb):
        return pd.DataFrame(
            {"x0": [2], "y0": [2], "x1": [18], "y1": [18], "cx": [10.0], "cy": [10.0], "area": [80]}
        )

    result = process_chunk("ds", images, objects, PATCHES, CELLS, None, 8, segment)
    units = result.units
    patches = units[units["unit"] == "patch"]
    # 96x64 -> 3x2 tiles of 32; tiles without any disc are dropped
    assert set(zip(patches["x0"], patches["y0"], strict=True)) == {
        (0, 0),
        (32, 32),
        (64, 32),
    }  # (64, 0) holds a sliver < 5%
    cells = units[units["unit"] == "cell"]
    assert cells[cells["file"] == good]["label"].tolist() == ["normal"]  # the WBC was dropped
    assert cells[cells["file"] == tiny]["label"].isna().all() and (cells["file"] == tiny).sum() == 1
    assert set(result.images["file"]) == {good, tiny}
    assert result.images["image_hash"].str.len().eq(16).all()
    reasons = dict(zip(result.skipped["file"], result.skipped["reason"], strict=True))
    assert "cannot decode" in reasons[str(tmp_path / "broken.jpg")]
    assert "smaller than one 32px patch" in reasons[tiny]


def test_segment_never_and_missing_segmenter(tmp_path):
    f = write(tmp_path / "a.png", smear(64, 64, [(20, 20, 8)]))
    never = CellSettings(**{**CELLS.__dict__, "segment": "never"})
    result = process_chunk("ds", image_rows([f]), empty_objects(), PATCHES, never, None, 8, None)
    assert not result.units["unit"].eq("cell").any()
    with pytest.raises(ValueError, match="no segmenter"):
        process_chunk("ds", image_rows([f]), empty_objects(), PATCHES, CELLS, None, 8, None)
    with pytest.raises(ValueError, match=r"cells\.segment"):
        CellSettings(**{**CELLS.__dict__, "segment": "sometimes"})


def test_patch_side_follows_pixel_size():
    p = PatchSettings(**{**PATCHES.__dict__, "size": 224, "target_pixel_size_um": 0.1})
    assert p.side_px(0.05) == 448  # finer pixels: a larger native tile covers the same area
    assert p.side_px(None) == 224


def test_prepare_parsed_resumes_chunks(tmp_path):
    files = [write(tmp_path / f"{i}.png", smear(64, 64, [(20 + i, 20, 8)])) for i in range(5)]
    parsed = ParsedSource(image_rows(files), empty_objects(), [Skipped("x.txt", "malformed line", 3)])
    calls = []

    def segment(rgb):
        calls.append(1)
        return pd.DataFrame(
            {"x0": [2], "y0": [2], "x1": [18], "y1": [18], "cx": [10.0], "cy": [10.0], "area": [80]}
        )

    args = (tmp_path / "work", PATCHES, CELLS, None, 8, 2, segment, {"v": 1})
    first, counts = prepare_parsed("ds", parsed, *args)
    assert counts == {"computed": 3, "reused": 0, "redone": 0} and len(calls) == 5
    again, counts = prepare_parsed("ds", parsed, *args)
    assert counts == {"computed": 0, "reused": 3, "redone": 0} and len(calls) == 5
    pd.testing.assert_frame_equal(first.units, again.units)
    assert "malformed line" in set(again.skipped["reason"])
    # a changed setting invalidates the work; a changed file invalidates only its chunk
    _, counts = prepare_parsed("ds", parsed, *args[:-1], {"v": 2})
    assert counts["computed"] == 3
    write(files[4], smear(64, 64, [(30, 30, 9)]))
    _, counts = prepare_parsed("ds", parsed, *args[:-1], {"v": 2})
    assert counts == {"computed": 1, "reused": 2, "redone": 0}


def test_a_truncated_finished_chunk_is_computed_again(tmp_path, caplog):
    files = [write(tmp_path / f"{i}.png", smear(64, 64, [(20 + i, 20, 8)])) for i in range(4)]
    parsed = ParsedSource(image_rows(files), empty_objects(), [])
    no_cells = pd.DataFrame({c: [] for c in ("x0", "y0", "x1", "y1", "cx", "cy", "area")})
    args = (tmp_path / "work", PATCHES, CELLS, None, 8, 2, lambda rgb: no_cells, {"v": 1})
    first, _ = prepare_parsed("ds", parsed, *args)
    units = sorted((tmp_path / "work" / "parts").glob("00001-*.units.parquet"))[0]
    units.write_bytes(units.read_bytes()[:40])  # cut short, e.g. a full disk on a copy
    with caplog.at_level("WARNING", logger="reddino.prepare"):
        again, counts = prepare_parsed("ds", parsed, *args)
    assert counts == {"computed": 1, "reused": 1, "redone": 1}
    assert "is unreadable" in caplog.text and "computing it again" in caplog.text
    pd.testing.assert_frame_equal(first.units, again.units)


def test_find_duplicates_keeps_the_earlier_dataset(tmp_path):
    base = smear(120, 90, [(30, 30, 12), (80, 50, 15), (60, 70, 9)])
    h = perceptual_hash(base, 8)
    resized = np.asarray(Image.fromarray(base).resize((104, 78)))
    other = smear(120, 90, [(100, 20, 14)])
    images = pd.DataFrame(
        {
            "file": ["bccd/a.jpg", "txl/a_small.jpg", "txl/b.jpg", "bccd/a_copy.jpg"],
            "dataset": ["bccd", "txl", "txl", "bccd"],
            "image_hash": [h, perceptual_hash(resized, 8), perceptual_hash(other, 8), h],
        }
    )
    dups = find_duplicates(images, max_distance=6, priority=["bccd", "txl"])
    assert dups["file"].tolist() == ["txl/a_small.jpg"]  # same-dataset copies are left alone
    assert dups["duplicate_dataset"].tolist() == ["bccd"]
    reverse = find_duplicates(images, max_distance=6, priority=["txl", "bccd"])
    assert set(reverse["file"]) == {"bccd/a.jpg", "bccd/a_copy.jpg"}
    with pytest.raises(ValueError, match="priority"):
        find_duplicates(images, 6, ["bccd"])


def test_read_manifest_filters_and_errors(tmp_path):
    units = pd.DataFrame(
        {
            "file": ["a", "a", "b"],
            "x0": [0, 0, 0],
            "y0": [0, 0, 0],
            "x1": [4, 4, 4],
            "y1": [4, 4, 4],
            "unit": ["patch", "cell", "cell"],
            "source": ["s1", "s1", "s2"],
            "subject": ["s1/a", "s1/a", "s2/b"],
            "label": [None, "normal", None],
            "dataset": ["d1", "d1", "d2"],
            "image_hash": ["0" * 16] * 3,
        }
    )
    path = tmp_path / "m.parquet"
    write_parquet_atomic(units, path)
    assert len(read_manifest(path, "cell", None, None, labelled_only=False)) == 2
    assert read_manifest(path, "cell", None, None, labelled_only=True)["label"].tolist() == ["normal"]
    # relative files resolve against the prepared folder (<prepared>/manifests/x.parquet -> <prepared>)
    files = read_manifest(path, "cell", ["d2"], None, labelled_only=False)["file"].tolist()
    assert files == [str(tmp_path.parent / "b")]
    with pytest.raises(ValueError, match="no source"):
        read_manifest(path, "cell", None, ["s9"], labelled_only=False)
    with pytest.raises(ValueError, match="no patch units left"):
        read_manifest(path, "patch", ["d2"], None, labelled_only=False)
    with pytest.raises(FileNotFoundError, match="make prepare"):
        read_manifest(tmp_path / "none.parquet", "cell", None, None, labelled_only=False)


def test_source_weights_balance_sources():
    sources = pd.Series(["a"] * 6 + ["b"] * 2)
    assert source_weights(sources, "natural") is None
    w = source_weights(sources, "balanced")
    assert w[:6].sum() == pytest.approx(0.5) and w[6:].sum() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="source_weighting"):
        source_weights(sources, "uniform")


def test_labelled_units_are_served_in_order(tmp_path):
    f = write(tmp_path / "a.png", smear(64, 64, [(20, 20, 8)]))
    units = pd.DataFrame(
        {
            "file": [f] * 3,
            "x0": [0, 10, 20],
            "y0": [0, 0, 0],
            "x1": [16, 26, 36],
            "y1": [16, 16, 16],
            "unit": "cell",
            "source": "s",
            "subject": "s/a",
            "label": ["b", "a", "b"],
        }
    )
    dataset = LabelledUnitDataset(units, eval_transform(8, [0.5] * 3, [0.25] * 3), ["a", "b"], 4)
    batches = list(DataLoader(dataset, batch_size=2, shuffle=False))
    assert [b[0].shape for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    assert np.concatenate([b[1].numpy() for b in batches]).tolist() == [1, 0, 1]


def test_materialise_units_writes_identical_crops_once(tmp_path):
    from reddino.data.patches import crop_padded
    from reddino.data.prepare import materialise_units

    img = smear(64, 48, [(20, 20, 8), (50, 30, 9)])
    f = write(tmp_path / "a.png", img)
    units = pd.DataFrame(
        {
            "file": [f, f],
            "x0": [0, 40],
            "y0": [0, 30],
            "x1": [32, 72],  # the second box leaves the image: padded like on-the-fly crops
            "y1": [32, 60],
            "unit": ["patch", "cell"],
            "source": "s",
            "subject": "s/a",
            "label": [None, "normal"],
            "dataset": "ds",
        }
    )
    crops = materialise_units(units, tmp_path / "units", 4)
    for row, crop in zip(units.itertuples(), crops.itertuples(), strict=True):
        expected = crop_padded(img, (row.x0, row.y0, row.x1, row.y1))
        np.testing.assert_array_equal(np.asarray(Image.open(crop.file)), expected)
        assert (crop.x0, crop.y0, crop.x1, crop.y1) == (0, 0, 32, 30 if row.Index else 32)
    assert crops["label"].isna().tolist() == [True, False] and crops["label"].iloc[1] == "normal"
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "units").rglob("*.png"))]
    materialise_units(units, tmp_path / "units", 4)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "units").rglob("*.png"))] == mtimes


def test_low_segmentation_coverage_is_noted(tmp_path):
    f = write(tmp_path / "s.png", smear(64, 64, [(20, 20, 8)]))

    def segment(rgb):
        boxes = pd.DataFrame(
            {"x0": [2], "y0": [2], "x1": [18], "y1": [18], "cx": [10.0], "cy": [10.0], "area": [80]}
        )
        boxes.attrs["segmentation"] = {
            "segmented_cells": 1.0,
            "cell_diameter_px": 16.0,
            "cell_area_p10": 80.0,
            "cell_area_median": 80.0,
            "cell_area_p90": 80.0,
            "foreground_covered": 0.2,
        }
        return boxes

    result = process_chunk("ds", image_rows([f]), empty_objects(), PATCHES, CELLS, None, 8, segment)
    assert result.images["foreground_covered"].tolist() == [0.2]
    assert result.images["segmented_cells"].tolist() == [1.0]
    assert any("segmentation covers 20% of the stained foreground" in r for r in result.skipped["reason"])


def test_read_manifest_can_keep_only_the_unlabelled_images_of_an_evaluation_dataset(tmp_path):
    rows = [
        ("a.png", "cell", "eval", "normal"),  # a labelled image of the evaluation set ...
        ("a.png", "patch", "eval", None),  # ... whose patches must go with it
        ("b.png", "cell", "eval", None),  # an unlabelled smear of the same dataset: kept
        ("c.png", "cell", "other", "RBC"),  # another dataset's boxes: untouched
    ]
    frame = pd.DataFrame(
        {
            "file": [str(tmp_path / r[0]) for r in rows],
            "x0": 0, "y0": 0, "x1": 8, "y1": 8,
            "unit": [r[1] for r in rows],
            "source": [r[2] for r in rows],
            "subject": "s",
            "label": [r[3] for r in rows],
            "split": None,
            "dataset": [r[2] for r in rows],
            "image_hash": "0",
        }
    )  # fmt: skip
    path = tmp_path / "manifests" / "union.parquet"
    path.parent.mkdir()
    frame.to_parquet(path)
    cells = read_manifest(path, "cell", None, None, False, unlabelled_images_of=["eval"])
    assert sorted(f.rsplit("/", 1)[-1] for f in cells["file"]) == ["b.png", "c.png"]
    assert len(read_manifest(path, "patch", None, None, False)) == 1
    with pytest.raises(ValueError, match="no patch units left"):  # a.png's patch went with its labels
        read_manifest(path, "patch", None, None, False, unlabelled_images_of=["eval"])
