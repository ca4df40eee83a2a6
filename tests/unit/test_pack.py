"""Packing a prepared folder into a relocatable JPEG copy, and relative ``file`` paths in manifests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reddino.data.datasets import UnitDataset
from reddino.data.io import read_rgb
from reddino.data.manifest import read_manifest, resolve_files
from reddino.data.pack import pack
from reddino.data.prepare import MANIFEST_COLUMNS, write_parquet_atomic


def smear(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth cartoon smear (light background, dark discs): JPEG-friendly like real smears."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = np.full((height, width, 3), 225, np.float64)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 12)
        disc = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img -= disc * np.array([80.0, 150.0, 120.0])
    return np.clip(img, 0, 255).astype(np.uint8)


def units_for(file: Path, dataset: str, width: int, height: int) -> pd.DataFrame:
    """Two patches (one past the border: crops pad) and one labelled cell of one image, real schema."""
    rows = [
        (0, 0, 32, 32, "patch", None),
        (width - 16, height - 16, width + 16, height + 16, "patch", None),
        (10, 12, 30, 32, "cell", "normal cell"),
    ]
    frame = pd.DataFrame(rows, columns=["x0", "y0", "x1", "y1", "unit", "label"])
    return frame.assign(
        file=str(file),
        source=dataset,
        subject=f"{dataset}/{file.stem}",
        split=None,
        dataset=dataset,
        image_hash="0" * 16,
    )[list(MANIFEST_COLUMNS)]


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A prepared folder with absolute paths: a PNG and a JPEG smear of dataset `a`, a grey 16-bit PNG
    of dataset `b`, and per-dataset + union manifests, an images table and a report."""
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(smear(64, 48, 0)).save(raw / "one.png")
    Image.fromarray(smear(48, 40, 1)).save(raw / "two.jpg", quality=95)
    grey = (smear(40, 40, 2)[..., 1].astype(np.uint16) * 200).astype(np.uint16)
    Image.fromarray(grey).save(raw / "three.png")
    out = tmp_path / "prepared"
    a = pd.concat([units_for(raw / "one.png", "a", 64, 48), units_for(raw / "two.jpg", "a", 48, 40)])
    b = units_for(raw / "three.png", "b", 40, 40)
    write_parquet_atomic(a.reset_index(drop=True), out / "manifests" / "a.parquet")
    write_parquet_atomic(b.reset_index(drop=True), out / "manifests" / "b.parquet")
    write_parquet_atomic(pd.concat([a, b], ignore_index=True), out / "manifests" / "union.parquet")
    images = pd.DataFrame({"file": [str(raw / "one.png"), str(raw / "two.jpg")], "dataset": "a"})
    write_parquet_atomic(images, out / "manifests" / "a.images.parquet")
    (out / "report.md").write_text("# report\n")
    (out / "work").mkdir()
    (out / "work" / "chunk.parquet").write_bytes(b"x" * 10)
    return out


def crops(units: pd.DataFrame) -> list[np.ndarray]:
    dataset = UnitDataset(units, transform=lambda x: x, cache_size=4)
    return [dataset.crop(i) for i in range(len(dataset))]


def test_packed_copy_is_relocatable_and_matches_the_original(prepared: Path, tmp_path: Path):
    report = pack(prepared, tmp_path / "packed" / "prepared", quality=90, workers=1)
    assert report["images"] == 3 and report["unreadable"] == []
    moved = tmp_path / "elsewhere" / "prepared"
    shutil.move(tmp_path / "packed", tmp_path / "elsewhere")
    assert sorted(p.name for p in (moved / "manifests").iterdir()) == [
        "a.images.parquet",
        "a.parquet",
        "b.parquet",
        "union.parquet",
    ]
    assert (moved / "report.md").is_file() and not (moved / "work").exists()
    stored = pd.read_parquet(moved / "manifests" / "union.parquet")["file"]
    assert set(stored) == {"images/a/0.jpg", "images/a/1.jpg", "images/b/0.jpg"}  # relative, one per image

    for unit, labelled in (("patch", False), ("cell", True)):
        original = read_manifest(prepared / "manifests" / "union.parquet", unit, None, None, labelled)
        packed = read_manifest(moved / "manifests" / "union.parquet", unit, None, None, labelled)
        pd.testing.assert_frame_equal(original.drop(columns="file"), packed.drop(columns="file"))
        assert all(Path(f).is_file() and Path(f).is_relative_to(moved) for f in packed["file"])
        for before, after in zip(crops(original), crops(packed), strict=True):
            assert before.shape == after.shape and after.dtype == np.uint8
            assert np.abs(before.astype(int) - after.astype(int)).mean() < 3.0  # JPEG loss only

    # the 16-bit grey PNG is packed as the loader reads it (rescaled to 8 bits, 3 channels)
    grey = read_manifest(moved / "manifests" / "b.parquet", "patch", None, None, False)["file"].iloc[0]
    assert Image.open(grey).mode == "RGB"
    assert np.abs(read_rgb(grey).astype(int) - read_rgb(prepared.parent / "raw" / "three.png")).mean() < 3.0


def test_unreadable_image_is_reported_and_its_units_dropped(prepared: Path, tmp_path: Path):
    (prepared.parent / "raw" / "two.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "packed" / "prepared"
    report = pack(prepared, out, quality=80, datasets=["a"], workers=2)  # the process pool path
    assert report["images"] == 1
    [bad] = report["unreadable"]
    assert bad["file"].endswith("two.jpg") and "cannot decode" in bad["reason"]
    assert bad["units_dropped"] == 6  # 3 units in a.parquet + 3 in union.parquet
    dropped = {(u["manifest"], u["unit"]): (u["units"], u["dropped"]) for u in report["units"]}
    assert dropped[("union.parquet", "patch")] == (2, 2) and dropped[("a.parquet", "cell")] == (1, 1)
    assert not (out / "manifests" / "b.parquet").exists()  # dataset filter: b is not packed
    assert set(pd.read_parquet(out / "manifests" / "union.parquet")["dataset"]) == {"a"}
    listed = pd.read_csv(out / "pack_skipped.csv")
    assert listed["file"].str.endswith("two.jpg").all() and len(listed) == 1
    assert "two.jpg" in (out / "pack_report.md").read_text()
    assert json.loads((out / "pack_report.json").read_text())["images"] == 1
    # an existing folder that is not a pack is never overwritten
    with pytest.raises(ValueError, match="not empty"):
        pack(prepared, prepared.parent / "raw", workers=1)


def test_read_manifest_resolves_relative_files_against_the_prepared_folder(tmp_path: Path):
    units = units_for(Path("images/a/0.jpg"), "a", 64, 48)
    units.loc[1, "file"] = "/abs/elsewhere.jpg"
    write_parquet_atomic(units, tmp_path / "prep" / "manifests" / "m.parquet")
    files = read_manifest(tmp_path / "prep" / "manifests" / "m.parquet", "patch", None, None, False)["file"]
    assert files.tolist() == [str(tmp_path / "prep" / "images" / "a" / "0.jpg"), "/abs/elsewhere.jpg"]
    same = pd.Series(["/x/y.jpg"])
    assert resolve_files(same, tmp_path) is same  # absolute-only manifests are untouched
    # a missing image still fails at load time naming the resolved file
    with pytest.raises(ValueError, match=r"prep/images/a/0\.jpg: file not found"):
        UnitDataset(
            read_manifest(tmp_path / "prep" / "manifests" / "m.parquet", "cell", None, None, True),
            transform=lambda x: x,
            cache_size=0,
        ).crop(0)


def test_cli_packs_with_the_hydra_config(prepared: Path, tmp_path: Path):
    out = tmp_path / "cli" / "prepared"
    overrides = [f"prepared_dir={prepared}", f"out={out}", "quality=80", "manifests=[union]", "workers=1"]
    overrides += ["progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(
        [sys.executable, "-m", "reddino.pack", *overrides], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "images packed: 3" in done.stdout
    assert sorted(p.name for p in (out / "manifests").iterdir()) == ["union.parquet"]
