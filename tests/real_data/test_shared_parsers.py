"""The layout parsers on the three shared real datasets, read in place (header reads only: seconds).

Counts are the exact numbers observed on the shared copies and checked against their README:
Chula RBC-12 and BCCD are clean apart from two empty label files and two zero-size BCCD boxes;
TXL-PBC repeats 38 label lines verbatim (33 RBC, 5 WBC), which the yolo parser skips as duplicates.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from reddino.data.sources.parsers import parse_source
from reddino.data.sources.records import ParsedSource

pytestmark = pytest.mark.real_data

CHULA_CLASSES = {
    0: "normal cell",
    1: "macrocyte",
    2: "microcyte",
    3: "spherocyte",
    4: "target cell",
    5: "stomatocyte",
    6: "ovalocyte",
    7: "teardrop",
    8: "burr cell",
    9: "schistocyte",
    10: "uncategorised",
    11: "hypochromia",
    12: "elliptocyte",
}
# The README's per-class table (all label files); no Chula line is skipped, so these are exact.
CHULA_COUNTS = {
    "normal cell": 6330,
    "macrocyte": 689,
    "microcyte": 461,
    "spherocyte": 3449,
    "target cell": 2753,
    "stomatocyte": 1996,
    "ovalocyte": 2140,
    "teardrop": 307,
    "burr cell": 785,
    "schistocyte": 897,
    "uncategorised": 184,
    "hypochromia": 1063,
    "elliptocyte": 1052,
}
TXL_SIZES = {"640x480": "bccd", "416x416": "bcd", "360x363": "pbc", "366x369": "pbc", "575x575": "raabin"}


def dataset(folder: str) -> Path:
    """The shared dataset folder, or skip with the reason it is not available."""
    root = os.environ.get("REDDINO_DATA_ROOT")
    if not root:
        pytest.skip("REDDINO_DATA_ROOT is not set (point it at the shared datasets folder)")
    path = Path(root) / folder
    if not path.is_dir():
        pytest.skip(f"{path} does not exist (REDDINO_DATA_ROOT={root})")
    return path


@pytest.fixture(scope="module")
def chula() -> ParsedSource:
    layout = {
        "parser": "centre_points",
        "images": "Dataset/*.jpg",
        "labels": "Label/{stem}.txt",
        "class_names": CHULA_CLASSES,
    }
    return parse_source(
        "chula_rbc12", dataset("chula-rbc-12"), layout, {"from": "image"}, {"from": "constant"}
    )


@pytest.fixture(scope="module")
def txl() -> ParsedSource:
    layout = {
        "parser": "yolo",
        "images": "TXL_PBC/images/*/*.jpg",
        "class_names": {0: "WBC", 1: "RBC", 2: "Platelets"},
        "split_from_parent": True,
    }
    source = {"from": "image_size", "sizes": TXL_SIZES}
    return parse_source("txl_pbc", dataset("txl-pbc"), layout, {"from": "image"}, source)


@pytest.fixture(scope="module")
def bccd() -> ParsedSource:
    layout = {
        "parser": "voc",
        "annotations": "BCCD/Annotations/*.xml",
        "images_dir": "BCCD/JPEGImages",
        "splits_dir": "BCCD/ImageSets/Main",
    }
    return parse_source("bccd", dataset("bccd"), layout, {"from": "image"}, {"from": "constant"})


UNUSED = "not used by the layout"


def unused(parsed: ParsedSource, root: Path) -> list[str]:
    """Files under the root that the layout did not read, each reported with a reason."""
    return sorted(
        Path(s.file).relative_to(root).as_posix() for s in parsed.skipped if s.reason.startswith(UNUSED)
    )


def without_unused(parsed: ParsedSource) -> ParsedSource:
    kept = [s for s in parsed.skipped if not s.reason.startswith(UNUSED)]
    return ParsedSource(parsed.images, parsed.objects, kept)


def test_chula_rbc12(chula: ParsedSource):
    root = dataset("chula-rbc-12")
    images, objects = chula.images, chula.objects
    assert len(images) == 738
    assert set(zip(images["width"], images["height"], strict=True)) == {(640, 480)}
    assert unused(chula, root) == ["LICENSE", "README.md"]
    assert len(without_unused(chula).skipped) == 0  # no duplicate or out-of-bounds lines in this copy
    assert len(objects) == 22_106
    assert objects["label"].value_counts().to_dict() == CHULA_COUNTS
    assert objects[["x0", "y0", "x1", "y1"]].isna().all().all()
    labelled = set(objects["file"])
    assert len(labelled) == 621  # 623 label files, of which 53.txt and 56.txt are empty
    no_label_file = [f for f in images["file"] if not (root / "Label" / f"{Path(f).stem}.txt").is_file()]
    assert len(no_label_file) == 115
    unlabelled = sorted(int(Path(f).stem) for f in set(images["file"]) - labelled)
    assert len(unlabelled) == 117 and {53, 56} <= set(unlabelled)
    assert images["subject"].is_unique and images["subject"].iloc[0] == "chula_rbc12/Dataset/1"


def test_txl_pbc(txl: ParsedSource):
    images, objects = txl.images, txl.objects
    assert len(images) == 1440
    assert images["source"].value_counts().to_dict() == {
        "txl_pbc:pbc": 500,  # 486 of 360x363 + 14 of 366x369
        "txl_pbc:raabin": 500,
        "txl_pbc:bccd": 221,
        "txl_pbc:bcd": 219,
    }
    assert images["split"].value_counts().to_dict() == {"train": 1008, "val": 288, "test": 144}
    assert unused(txl, dataset("txl-pbc")) == [
        "LICENSE.txt",
        "README.md",
        "TXL_PBC/README.md",
        "TXL_PBC/data.yaml",
        "TXL_PBC/labels/classes.txt",
        "TXL_PBC/labels/test/classes.txt",
        "TXL_PBC/labels/train/classes.txt",
        "TXL_PBC/labels/val/classes.txt",
    ]
    txl = without_unused(txl)
    assert txl.skipped_by_reason() == Counter({"duplicate box": 38})
    source_of = {Path(f).stem: src for f, src in zip(images["file"], images["source"], strict=True)}
    assert Counter(source_of[Path(s.file).stem] for s in txl.skipped) == {
        "txl_pbc:pbc": 36,
        "txl_pbc:raabin": 2,
    }
    # README: 24,271 RBC boxes; 33 RBC and 5 WBC lines repeat an earlier line of the same file verbatim
    assert objects["label"].value_counts().to_dict() == {
        "RBC": 24_271 - 33,
        "WBC": 1515 - 5,
        "Platelets": 851,
    }
    assert (objects["x0"] >= 0).all() and (objects["x1"] > objects["x0"]).all()
    sizes = images.set_index("file")[["width", "height"]]
    joined = objects.join(sizes, on="file")
    assert (joined["x1"] <= joined["width"]).all() and (joined["y1"] <= joined["height"]).all()
    assert objects["file"].nunique() == 1440  # every image has at least one box


def test_bccd(bccd: ParsedSource):
    root = dataset("bccd")
    assert len(list((root / "BCCD" / "Annotations").glob("*.xml"))) == 364
    assert len(list((root / "BCCD" / "JPEGImages").glob("*.jpg"))) == 364
    images, objects = bccd.images, bccd.objects
    assert len(images) == 364
    assert set(zip(images["width"], images["height"], strict=True)) == {(640, 480)}
    assert images["split"].value_counts().to_dict() == {"train": 205, "val": 87, "test": 72}
    # README: RBC 4,155; two RBC boxes in 00338.xml and 00343.xml have xmin == xmax and ymin == ymax
    assert unused(bccd, root) == ["BCCD/ImageSets/Main/trainval.txt", "LICENSE", "README.md"]
    bccd = without_unused(bccd)
    assert bccd.skipped_by_reason() == Counter({"degenerate box": 2})
    assert sorted(Path(s.file).name for s in bccd.skipped) == ["BloodImage_00338.xml", "BloodImage_00343.xml"]
    assert objects["label"].value_counts().to_dict() == {"RBC": 4153, "WBC": 372, "Platelets": 361}
    assert objects[["x0", "y0"]].min().min() >= 0
    assert objects["x1"].max() <= 640 and objects["y1"].max() <= 480
