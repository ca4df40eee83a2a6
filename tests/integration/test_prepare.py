"""``reddino-prepare`` end to end: bad input on fixture datasets, then the shared real datasets feeding a
short pretraining run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict
from PIL import Image

from conftest import data_root
from reddino.workflows.preparation import run as prepare
from reddino.workflows.pretraining import run as pretrain


def smear(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = np.full((height, width, 3), 225, np.uint8)
    for _ in range(max(4, width * height // 900)):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 10)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (170, 70, 100)
    return img


def make_points_dataset(root: Path) -> dict[str, int]:
    """A Chula-like centre-point dataset with one of every kind of bad input."""
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    for i in range(4):
        Image.fromarray(smear(96, 64, i)).save(root / "img" / f"{i}.png")
        (root / "lab" / f"{i}.txt").write_text("20 20 0\n50 30 1\n")
    (root / "lab" / "0.txt").write_text("20 20 0\nnot a line\n500 20 0\n20 20 0\n30 30 7\n")
    Image.fromarray(smear(96, 64, 9).mean(axis=2).astype(np.uint8)).save(root / "img" / "grey.png")
    Image.fromarray(smear(96, 64, 10)[..., 0].astype(np.uint16) * 200).save(root / "img" / "sixteen.png")
    rgba = np.concatenate([smear(96, 64, 11), np.full((64, 96, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba).save(root / "img" / "rgba.png")
    Image.fromarray(smear(20, 20, 12)).save(root / "img" / "tiny.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.fromarray(smear(96, 64, 13)).save(root / "img" / "trunc.jpg")
    data = (root / "img" / "trunc.jpg").read_bytes()
    (root / "img" / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (root / "img" / "empty.png").write_bytes(b"")
    return {"good_images": 7}  # 4 plain + grey + sixteen + rgba (tiny decodes too but gives no patch)


def source_spec(name: str, root: str, layout: dict) -> dict:
    """What a user's one YAML file for their own dataset holds."""
    return {
        "name": name,
        "title": name,
        "citation": "test fixture",
        "licence": "MIT",
        "homepage": "https://example.org",
        "download": [],
        "access": "created by the test",
        "modality": "brightfield",
        "stain": "unknown",
        "magnification": None,
        "pixel_size_um": None,
        "labels": "fixture",
        "role": ["pretrain"],
        "root": root,
        "units": ["cell", "patch"],
        "verified_layout": True,
        "layout": layout,
        "subject": {"from": "image"},
        "source": {"from": "constant"},
    }


def test_prepare_reports_every_bad_input_and_goes_on(make_cfg, tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_points_dataset(data / "points")
    (data / "empty").mkdir(parents=True)
    monkeypatch.setenv("REDDINO_DATA_ROOT", str(data))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    cfg = make_cfg("output_dir=" + str(tmp_path / "prepared"), "progress=false", config_name="prepare")
    user_yaml = tmp_path / "points.yaml"
    layout = {
        "parser": "centre_points",
        "images": "img/*",
        "labels": "lab/{stem}.txt",
        "class_names": {0: "normal", 1: "spherocyte"},
    }
    OmegaConf.save(OmegaConf.create(source_spec("points", "points", layout)), user_yaml)
    with open_dict(cfg):
        cfg.sources = {
            "points": OmegaConf.load(user_yaml),
            "empty": source_spec("empty", "empty", {"parser": "flat", "images": "*.png"}),
            "absent": source_spec("absent", "absent", {"parser": "flat", "images": "*.png"}),
            # online: one download without a sha256 (refused), one that cannot connect (failed)
            "unverified": {
                **source_spec("unverified", "unverified", {"parser": "flat", "images": "*.png"}),
                "download": [
                    {"url": "http://127.0.0.1:9/u.zip", "sha256": None, "archive": "zip", "extract_to": "."}
                ],
            },
            "failed": {
                **source_spec("failed", "failed", {"parser": "flat", "images": "*.png"}),
                "download": [
                    {
                        "url": "http://127.0.0.1:9/f.zip",
                        "sha256": "0" * 64,
                        "archive": "zip",
                        "extract_to": ".",
                    }
                ],
            },
        }
        cfg.offline = False
        cfg.patches.size = 32
        cfg.cells.point_window = 24
        cfg.segmentation.backend = "classical"
        cfg.segmentation.classical.update(cell_diameter=16.0, min_area=50, max_area=1000, border_min_area=0)
        cfg.cells.min_area = 50
    report = prepare(cfg)

    out = tmp_path / "prepared"
    manifest = pd.read_parquet(out / "manifests" / "points.parquet")
    images = pd.read_parquet(out / "manifests" / "points.images.parquet")
    assert len(images) == 8  # 7 good + the tiny one (decodable, too small for a patch)
    assert {"grey.png", "sixteen.png", "rgba.png"} <= {Path(f).name for f in images["file"]}
    skipped = pd.read_csv(out / "skipped.csv")
    reasons = " | ".join(
        f"{Path(f).name}: {r}" for f, r in zip(skipped["file"], skipped["reason"], strict=True)
    )
    for expected in (
        "corrupt.png",
        "trunc.jpg",
        "empty.png",
        "tiny.png: image 20x20 smaller than one 32px patch",
        "malformed",
        "outside",
        "duplicate",
        "unknown class",
    ):
        assert expected in reasons, (expected, reasons)
    cells = manifest[manifest["unit"] == "cell"]
    labelled = cells[cells["label"].notna()]
    # 3 clean label files x 2 points + 0.txt's one valid point
    assert len(labelled) == 7 and set(labelled["label"]) == {"normal", "spherocyte"}
    assert (manifest["unit"] == "patch").sum() > 0
    # the unlabelled images (grey, sixteen, rgba, tiny) went through the fallback segmenter
    assert report["segmenter"] == "classical" and cells["label"].isna().sum() > 0
    (seg,) = report["segmentation"]  # per source: what segmentation found, and how much stain it covers
    assert seg["dataset"] == "points" and seg["images_segmented"] == 4 and seg["cells"] > 0
    assert 0 <= seg["foreground_covered"] <= 1 and "Segmented images" in (out / "report.md").read_text()
    assert images["segmented_cells"].notna().sum() == 4  # per image, in the images manifest
    assert set(report["unavailable"]) == {"empty", "absent", "unverified", "failed"}
    assert report["unavailable"]["unverified"].startswith("UnverifiedDownloadError: unverified: no sha256")
    assert report["unavailable"]["failed"].startswith("DownloadFailedError: failed: download of")
    assert "absent" in report["unavailable"]["absent"] and "empty" in report["unavailable"]["empty"]
    assert "not prepared" in (out / "report.md").read_text()


@pytest.mark.real_data
@pytest.mark.slow
def test_prepare_shared_datasets_then_pretrain_on_real_patches(make_cfg, tmp_path):
    root = data_root()
    if root is None or not (root / "chula-rbc-12").is_dir():
        pytest.skip("REDDINO_DATA_ROOT does not hold the shared datasets")
    prepared = tmp_path / "prepared"
    overrides = [f"output_dir={prepared}", "progress=false", "max_images=30", "chunk_size=16"]
    report = prepare(make_cfg(*overrides, config_name="prepare"))
    units = pd.DataFrame(report["units"]).set_index("source")
    assert set(units.index) == {
        "chula_rbc12",
        "bccd",
        "txl_pbc:bccd",
        "txl_pbc:bcd",
        "txl_pbc:pbc",
        "txl_pbc:raabin",
    }
    chula = pd.read_parquet(prepared / "manifests" / "chula_rbc12.parquet")
    chula_cells = chula[chula["unit"] == "cell"]
    assert chula_cells["subject"].str.startswith("chula_rbc12/").all()
    annotated = chula_cells[chula_cells["label"].notna()]
    assert len(annotated) > 300 and (annotated["x1"] - annotated["x0"]).eq(72).all()
    # images without a label file are segmented (fallback backend here): unlabelled cells
    segmented = chula_cells[chula_cells["label"].isna()]
    assert report["segmenter"] == "classical" and len(segmented) > 0
    assert not set(segmented["file"]) & set(annotated["file"])
    txl = pd.read_parquet(prepared / "manifests" / "txl_pbc.parquet")
    assert set(txl.loc[txl["unit"] == "cell", "label"]) == {"RBC"}  # WBC and platelets dropped
    union = pd.read_parquet(prepared / "manifests" / "union.parquet")
    duplicates = pd.read_csv(prepared / "duplicates.csv")
    assert not set(duplicates["file"]) & set(union["file"])
    assert json.loads((prepared / "report.json").read_text())["union_units"] == len(union)

    again = prepare(make_cfg(*overrides, config_name="prepare"))
    assert all(t["chunks_reused"] > 0 for t in again["throughput"].values())
    assert again["units"] == report["units"]

    cfg = make_cfg("debug=fast", "data=real", f"paths.prepared_dir={prepared}", "report.max_units=200")
    summary = pretrain(cfg)
    assert summary["steps"] == cfg.ssl.optim.total_steps
    assert summary["protocol"]["sources"] == ["chula_rbc12"]
    assert np.isfinite(summary["results"]["pretrained_teacher"]["knn1"]["weighted_f1"]["mean"])
