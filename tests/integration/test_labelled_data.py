"""``data=folder`` and ``data=table``: a user's own labelled cells evaluated without a catalog entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reddino.data.labelled import SKIPPED_ATTR, read_labelled_folder, read_labelled_table
from reddino.workflows.evaluation import run

COLOURS = {"disc": (200, 60, 60), "sphere": (60, 60, 200), "target": (60, 200, 60)}


def cell(colour: tuple[int, int, int], seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def folder(tmp_path):
    """Three class folders (one holding a single crop), a broken file and a stray file at the top."""
    root = tmp_path / "cells"
    for name, colour in COLOURS.items():
        n = 1 if name == "target" else 12
        (root / name).mkdir(parents=True)
        for i in range(n):
            cell(colour, i).save(root / name / f"{i}.png")
    (root / "disc" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    cell((0, 0, 0), 0).save(root / "stray.png")
    return root


def test_a_folder_per_class_gives_one_unit_per_readable_crop(folder):
    units = read_labelled_folder(folder)
    assert sorted(units["label"].value_counts().items()) == [("disc", 12), ("sphere", 12), ("target", 1)]
    assert (units["x1"] - units["x0"]).eq(24).all() and units["subject"].eq(units["file"]).all()
    reasons = " | ".join(units.attrs[SKIPPED_ATTR])
    assert "broken.png" in reasons and "stray.png: not in a class folder" in reasons


def test_a_table_with_groups_sources_and_boxes(tmp_path, folder):
    rows = []
    for i, path in enumerate(sorted(folder.glob("[ds]*/*[0-9].png"))):
        rows.append(
            {
                "file": str(path.relative_to(tmp_path)),
                "label": path.parent.name,
                "patient": f"p{i % 4}",
                "lab": "A" if i % 2 else "B",
                "x0": 2,
                "y0": 2,
                "x1": 18,
                "y1": 14,
            }
        )
    rows.append({**rows[0], "file": "cells/disc/absent.png"})
    rows.append({**rows[1], "label": ""})
    table = pd.DataFrame(rows)
    boxes = ["x0", "y0", "x1", "y1"]
    for path in (tmp_path / "cells.csv", tmp_path / "cells.parquet"):
        table.to_csv(path, index=False) if path.suffix == ".csv" else table.to_parquet(path)
        units = read_labelled_table(path, "file", "label", "patient", "lab", boxes, 1.25)
        assert len(units) == 24 and set(units["subject"]) == {"p0", "p1", "p2", "p3"}
        assert set(units["source"]) == {"A", "B"}
        assert (units["x1"] - units["x0"]).eq(20).all()  # 1.25 x the longer side (16), square, centred
        reasons = " | ".join(units.attrs[SKIPPED_ATTR])
        assert "missing image: 'cells/disc/absent.png'" in reasons and "empty label" in reasons
    with pytest.raises(ValueError, match="lacks columns"):
        read_labelled_table(tmp_path / "cells.csv", "path", "label", None, None, None, 1.25)


def test_eval_on_a_folder_says_the_folds_may_leak_and_reports_the_skipped_files(folder, make_cfg, capsys):
    cfg = make_cfg(
        "data=folder",
        f"data.path={folder}",
        "features.image_size=24",
        "model.patch_size=8",
        "++model.overrides={embed_dim:32,depth:1,num_heads:2}",
        "feature_sets=[random_init,morphometrics]",
        "eval.n_splits=3",
        "probes.knn.ks=[1,3]",
        "probes.linear.max_iter=20",
        "umap.enabled=false",
        "batch_effects.enabled=false",
        "logger=csv",
        "progress=false",
        config_name="eval",
    )
    summary = run(cfg)
    printed = capsys.readouterr().out
    assert (
        "folds grouped by 'subject': 25 groups of 25 units (WARNING: every unit is its own group" in printed
    )
    assert summary["protocol"]["classes"] == ["disc", "sphere", "target"]
    assert summary["protocol"]["skipped"] == 2
    assert set(summary["results"]) == {"random_init", "morphometrics"}
    out = json.loads(Path(cfg.paths.output_dir, "results.json").read_text())
    assert out["protocol"]["group_by"] == "subject"
    skipped = pd.read_csv(f"{cfg.paths.output_dir}/skipped.csv")["skipped"].str.cat(sep=" | ")
    assert "broken.png" in skipped


def test_transfer_trains_on_one_dataset_and_tests_on_another_through_a_class_map(tmp_path, make_cfg):
    """eval=transfer: probes fit on lab A's crops, scored on lab B's (another stain), fine -> coarse."""
    for lab, shift in (("lab_a", 0), ("lab_b", 25)):
        for name, colour in COLOURS.items():
            (tmp_path / lab / name).mkdir(parents=True)
            for i in range(8):
                cell(tuple(c + shift for c in colour), i + shift).save(tmp_path / lab / name / f"{i}.png")
    transfer = (
        "data=folder",
        f"data.path={tmp_path / 'lab_a'}",
        "eval=transfer",
        f"eval.test_units.path={tmp_path / 'lab_b'}",
        "logger=csv",
        "progress=false",
    )
    cfg = make_cfg(
        *transfer,
        "eval.class_map={disc: normal, sphere: abnormal, target: abnormal}",
        "features.image_size=24",
        "model.patch_size=8",
        "++model.overrides={embed_dim:32,depth:1,num_heads:2}",
        "feature_sets=[random_init,morphometrics]",
        "probes.knn.ks=[1]",
        "probes.linear.max_iter=20",
        "umap.enabled=false",
        "batch_effects.enabled=false",
        config_name="eval",
    )
    summary = run(cfg)
    assert summary["protocol"]["splits"] == ["transfer"]
    assert summary["protocol"]["classes"] == ["abnormal", "normal"]
    for by_probe in summary["results"].values():
        for scores in by_probe.values():
            confusion = np.asarray(scores["confusion"])
            assert scores["n_test"] == 24 and set(scores["per_class_f1"]) == {"abnormal", "normal"}
            assert confusion.shape == (2, 2) and confusion.sum() == 24
    with pytest.raises(ValueError, match=r"class_map maps \['ellipse'\]"):
        run(make_cfg(*transfer, "eval.class_map={ellipse: normal}", config_name="eval"))
