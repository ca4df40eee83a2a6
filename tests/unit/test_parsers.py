"""Layout parsers on tiny fixtures: the good path, and every kind of bad data becoming a Skipped record."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from reddino.data.sources.parsers import PARSERS, parse_source, read_header
from reddino.data.sources.records import IMAGE_COLUMNS, OBJECT_COLUMNS, ParsedSource


def write_image(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    """A small solid image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 120, 130)).save(path)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def skips(parsed: ParsedSource) -> list[tuple[str, int | None, str]]:
    """(file name, line, reason category) of each skipped item, in order."""
    return [(Path(s.file).name, s.line, s.reason.split(":")[0]) for s in parsed.skipped]


def names(frame, column: str = "file") -> list[str]:
    return [Path(f).name for f in frame[column]]


def check_columns(parsed: ParsedSource) -> None:
    assert tuple(parsed.images.columns) == IMAGE_COLUMNS
    assert tuple(parsed.objects.columns) == OBJECT_COLUMNS


# ------------------------------------------------------------------------------------------ headers


def test_read_header_reads_sizes_and_describes_failures(tmp_path):
    good = write_image(tmp_path / "good.png", (7, 5))
    assert read_header(good) == (7, 5, 1)
    (tmp_path / "zero.jpg").write_bytes(b"")
    assert read_header(tmp_path / "zero.jpg") == "empty file"
    (tmp_path / "junk.png").write_bytes(b"\x00garbage bytes, not an image" * 4)
    assert "UnidentifiedImageError" in read_header(tmp_path / "junk.png")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:12])  # signature only, header cut off
    assert isinstance(read_header(tmp_path / "cut.png"), str)
    assert isinstance(read_header(tmp_path / "missing.png"), str)


# ------------------------------------------------------------------------------------------ flat


def test_flat_keeps_readable_images_sorted_and_skips_bad_headers(tmp_path):
    write_image(tmp_path / "a" / "10.png", (12, 8))
    write_image(tmp_path / "a" / "2.png", (9, 6))
    write_image(tmp_path / "b" / "x.jpg", (64, 48))
    png = write_image(tmp_path / "full.png", (64, 48)).read_bytes()
    (tmp_path / "full.png").unlink()
    (tmp_path / "b" / "late_cut.png").write_bytes(png[:-12])  # PNG end chunk gone, header intact
    (tmp_path / "b" / "zero.jpg").write_bytes(b"")
    (tmp_path / "b" / "junk.png").write_bytes(b"not an image at all")
    write_text(tmp_path / "README.txt", "ignored: not an image extension")
    parsed = PARSERS["flat"](tmp_path)
    check_columns(parsed)
    # natural order (2 before 10); a file cut after its header is kept: only headers are read here
    assert names(parsed.images) == ["2.png", "10.png", "late_cut.png", "x.jpg"]
    assert list(parsed.images["width"]) == [9, 12, 64, 64]
    assert list(parsed.images["height"]) == [6, 8, 48, 48]
    assert parsed.objects.empty
    assert skips(parsed) == [
        ("junk.png", None, "cannot read image header"),
        ("zero.jpg", None, "cannot read image header"),
    ]
    assert "empty file" in parsed.skipped[1].reason


def test_flat_glob_and_extension_filter(tmp_path):
    write_image(tmp_path / "x" / "a.PNG")
    write_image(tmp_path / "y" / "b.png")
    parsed = PARSERS["flat"](tmp_path, images="x/*", extensions=["png"])
    assert names(parsed.images) == ["a.PNG"]


def test_flat_empty_or_missing_folder_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no files match '\*\*/\*' under .*empty"):
        PARSERS["flat"](tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        PARSERS["flat"](tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ folder per class


def make_class_folders(root: Path) -> None:
    write_image(root / "cells" / "normal" / "a.png", (20, 22))
    write_image(root / "cells" / "normal" / "slide1" / "b.png", (21, 23))
    write_image(root / "cells" / "sickle" / "c.png", (24, 25))
    (root / "cells" / "sickle" / "d.png").write_bytes(b"corrupt")
    write_image(root / "cells" / "junk" / "e.png")
    write_image(root / "cells" / "junk" / "f.png")
    write_image(root / "cells" / "loose.png")


def test_folder_per_class_maps_folders_and_reports_unknown_ones(tmp_path):
    make_class_folders(tmp_path)
    parsed = PARSERS["folder_per_class"](
        tmp_path, images_dir="cells", class_names={"normal": "normal cell", "sickle": "sickle cell"}
    )
    check_columns(parsed)
    assert names(parsed.images) == ["a.png", "b.png", "c.png"]
    assert list(parsed.objects["label"]) == ["normal cell", "normal cell", "sickle cell"]
    whole = parsed.objects.iloc[2]
    assert (whole.x0, whole.y0, whole.x1, whole.y1, whole.cx, whole.cy) == (0, 0, 24, 25, 12, 12.5)
    assert skips(parsed) == [
        ("loose.png", None, "not in a class folder"),
        ("d.png", None, "cannot read image header"),
        ("junk", None, "unknown class folder"),
    ]
    assert parsed.skipped[2].reason == "unknown class folder: 2 files"
    assert list(parsed.images["subject"]) == ["cells/normal/a", "cells/normal/slide1/b", "cells/sickle/c"]


def test_folder_per_class_without_map_uses_folder_names(tmp_path):
    make_class_folders(tmp_path)
    parsed = PARSERS["folder_per_class"](tmp_path / "cells")
    assert sorted(parsed.objects["label"].value_counts().items()) == [
        ("junk", 2),
        ("normal", 2),
        ("sickle", 1),
    ]
    assert [s[2] for s in skips(parsed)] == ["not in a class folder", "cannot read image header"]


# ------------------------------------------------------------------------------------------ centre points

CHULA_LABELS = "\n".join(
    [
        "10 12 0",  # 1 ok
        "20 5 1",  # 2 ok
        "",  # 3 blank: ignored
        "5 5",  # 4 malformed (2 fields)
        "a b 0",  # 5 malformed
        "10 10 7",  # 6 unknown class id
        "40 5 0",  # 7 outside (x == width)
        "-1 5 0",  # 8 outside
        "10 12 0",  # 9 duplicate of line 1
        "10 12 1",  # 10 same point, other class: a conflict, both dropped
        "3.5 4.5 1.0",  # 11 float coordinates and class id: ok
        "1 1 0.5",  # 12 malformed class id
        "7 7 0 9",  # 13 malformed (4 fields)
    ]
)


def make_chula(root: Path) -> None:
    for stem in ("1", "2", "3", "10"):
        write_image(root / "Dataset" / f"{stem}.jpg", (40, 30))
    (root / "Dataset" / "4.jpg").write_bytes(b"")
    write_text(root / "Label" / "1.txt", CHULA_LABELS)
    write_text(root / "Label" / "2.txt", "")  # empty label file: no objects
    write_text(root / "Label" / "4.txt", "1 1 0\n")  # its image is unreadable
    (root / "Label" / "10.txt").write_bytes("\ufeff1 2 0\r\n3 4 0\r\n".encode())  # BOM + CRLF


CHULA_LAYOUT = {
    "images": "Dataset/*.jpg",
    "labels": "Label/{stem}.txt",
    "class_names": {0: "normal", 1: "macro"},
}


def test_centre_points_good_and_bad_lines(tmp_path):
    make_chula(tmp_path)
    parsed = PARSERS["centre_points"](tmp_path, **CHULA_LAYOUT)
    check_columns(parsed)
    assert names(parsed.images) == ["1.jpg", "2.jpg", "3.jpg", "10.jpg"]  # 3.jpg: no label file, kept
    assert skips(parsed) == [
        ("1.txt", 4, "malformed line"),
        ("1.txt", 5, "malformed line"),
        ("1.txt", 6, "unknown class id"),
        ("1.txt", 7, "point outside image"),
        ("1.txt", 8, "point outside image"),
        ("1.txt", 9, "duplicate point"),
        ("1.txt", 10, "conflicting classes"),
        ("1.txt", 12, "malformed line"),
        ("1.txt", 13, "malformed line"),
        ("1.txt", 1, "conflicting classes at (10, 12)"),
        ("4.jpg", None, "cannot read image header"),
    ]
    assert parsed.skipped[5].reason == "duplicate point: same as line 1"
    assert parsed.skipped[6].reason == "conflicting classes: line 1 says 0"
    objects = parsed.objects
    assert names(objects) == ["1.jpg"] * 2 + ["10.jpg"] * 2
    assert list(zip(objects["cx"], objects["cy"], objects["label"], strict=True)) == [
        (20, 5, "macro"),
        (3.5, 4.5, "macro"),
        (1, 2, "normal"),
        (3, 4, "normal"),
    ]
    assert objects[["x0", "y0", "x1", "y1"]].isna().all().all()
    unlabelled = set(parsed.images["file"]) - set(objects["file"])
    assert sorted(Path(f).name for f in unlabelled) == ["2.jpg", "3.jpg"]


def test_centre_points_without_class_map_keeps_ids(tmp_path):
    make_chula(tmp_path)
    parsed = PARSERS["centre_points"](tmp_path, images="Dataset/*.jpg", labels="Label/{stem}.txt")
    assert parsed.objects["label"].value_counts().to_dict() == {"0": 2, "1": 2, "7": 1}
    assert "unknown class id" not in parsed.skipped_by_reason()


def test_centre_points_glob_matching_nothing(tmp_path):
    make_chula(tmp_path)
    with pytest.raises(ValueError, match=r"'Dataset/\*\.png'"):
        PARSERS["centre_points"](tmp_path, images="Dataset/*.png", labels="Label/{stem}.txt")


# ------------------------------------------------------------------------------------------ yolo

YOLO_LABELS = "\n".join(
    [
        "1 0.5 0.5 0.2 0.4",  # 1 ok: (40, 15, 60, 35) in 100x50
        "0 0.1 0.1 0.2 0.2",  # 2 ok, touching the top-left corner: (0, 0, 20, 10)
        "1 0.995 0.5 0.02 0.2",  # 3 ok, 0.005 past the right border: clipped to x1 = 100
        "1 1.2 0.5 0.1 0.1",  # 4 value out of range
        "1 0.98 0.5 0.1 0.1",  # 5 box outside image (right edge 1.03)
        "1 0.5 0.5 0 0.1",  # 6 zero-area box
        "5 0.5 0.5 0.1 0.1",  # 7 unknown class id
        "1 0.5 0.5",  # 8 malformed
        "x 0.5 0.5 0.1 0.1",  # 9 malformed
        "1 nan 0.5 0.1 0.1",  # 10 malformed
        "1.0 0.50 0.5 0.2 0.4",  # 11 duplicate of line 1 (same numbers)
        "",  # 12 blank
        "2 0.5 0.5 0.2 0.4",  # 13 same box, other class: kept
    ]
)


def make_yolo(root: Path) -> None:
    write_image(root / "set" / "images" / "train" / "a.jpg", (100, 50))
    write_image(root / "set" / "images" / "val" / "b.jpg", (30, 30))
    write_image(root / "set" / "images" / "val" / "c.jpg", (100, 50))  # no label file: background
    (root / "set" / "images" / "val" / "d.jpg").write_bytes(b"\xff\xd8\xff broken")
    write_text(root / "set" / "labels" / "train" / "a.txt", YOLO_LABELS)
    write_text(root / "set" / "labels" / "val" / "b.txt", "0 0.5 0.5 1 1\n")
    write_text(root / "set" / "labels" / "val" / "classes.txt", "WBC\nRBC\nPlatelets\n")


YOLO_LAYOUT = {
    "images": "set/images/*/*.jpg",
    "class_names": {0: "WBC", 1: "RBC", 2: "Platelets"},
    "split_from_parent": True,
}


def test_yolo_boxes_splits_and_bad_lines(tmp_path):
    make_yolo(tmp_path)
    parsed = PARSERS["yolo"](tmp_path, **YOLO_LAYOUT)
    check_columns(parsed)
    assert names(parsed.images) == ["a.jpg", "b.jpg", "c.jpg"]
    assert list(parsed.images["split"]) == ["train", "val", "val"]
    assert skips(parsed) == [
        ("a.txt", 4, "value out of range"),
        ("a.txt", 5, "box outside image"),
        ("a.txt", 6, "zero-area box"),
        ("a.txt", 7, "unknown class id"),
        ("a.txt", 8, "malformed line"),
        ("a.txt", 9, "malformed line"),
        ("a.txt", 10, "malformed line"),
        ("a.txt", 11, "duplicate box"),
        ("d.jpg", None, "cannot read image header"),
    ]
    boxes = [tuple(round(v, 6) for v in row) for row in parsed.objects[["x0", "y0", "x1", "y1"]].to_numpy()]
    assert boxes == [(40, 15, 60, 35), (0, 0, 20, 10), (98.5, 20, 100, 30), (40, 15, 60, 35), (0, 0, 30, 30)]
    assert list(parsed.objects["label"]) == ["RBC", "WBC", "RBC", "Platelets", "WBC"]
    assert parsed.objects["cx"].round(6).tolist() == [50, 10, 99.25, 50, 15]


def test_yolo_label_path_options_and_no_split(tmp_path):
    write_image(tmp_path / "img" / "a.png", (10, 10))
    write_text(tmp_path / "ann" / "a.lbl", "3 0.5 0.5 0.5 0.5\n")
    parsed = PARSERS["yolo"](
        tmp_path, images="img/*.png", images_part="img", labels_part="ann", label_suffix=".lbl"
    )
    assert parsed.objects["label"].tolist() == ["3"]
    assert parsed.images["split"].tolist() == [None]
    with pytest.raises(ValueError, match="no 'images' folder"):
        PARSERS["yolo"](tmp_path, images="img/*.png")


# ------------------------------------------------------------------------------------------ voc


def voc_xml(filename: str | None, objects: list[tuple[str | None, tuple[str, str, str, str] | None]]) -> str:
    parts = ["<annotation>", "<folder>JPEGImages</folder>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    for name, box in objects:
        parts.append("<object>")
        if name is not None:
            parts.append(f"<name>{name}</name>")
        if box is not None:
            xmin, ymin, xmax, ymax = box
            parts.append(
                f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"
            )
        parts.append("</object>")
    return "\n".join([*parts, "</annotation>"])


def make_voc(root: Path) -> None:
    ann, img = root / "V" / "Annotations", root / "V" / "JPEGImages"
    for stem in ("a", "d", "e"):
        write_image(img / f"{stem}.jpg", (64, 48))
    (img / "g.jpg").write_bytes(b"")
    a_objects = [
        ("RBC", ("1", "1", "10", "5")),  # ok -> (0, 0, 10, 5)
        ("WBC", ("20", "10", "64", "48")),  # ok, reaching the last pixel -> (19, 9, 64, 48)
        ("RBC", ("30", "30", "30", "40")),  # degenerate
        ("RBC", ("50", "10", "70", "20")),  # outside the image
        ("Platelets", ("0", "40", "5", "49")),  # 1 px past two borders: clipped -> (0, 39, 5, 48)
        ("RBC", None),  # malformed: no box
        ("RBC", ("1", "x", "5", "5")),  # malformed: not a number
        (None, ("1", "1", "5", "5")),  # malformed: no name
        ("Unknown", ("1", "1", "5", "5")),  # unknown class name
    ]
    write_text(ann / "a.xml", voc_xml("a.jpg", a_objects))
    write_text(ann / "b.xml", "<annotation><object>")  # broken XML
    write_text(ann / "c.xml", voc_xml("c.jpg", [("RBC", ("1", "1", "5", "5"))]))  # no image
    write_text(ann / "d.xml", voc_xml(None, [("RBC", ("2.0", "2.0", "6.5", "6.5"))]))  # image from stem
    write_text(ann / "e.xml", voc_xml("renamed.jpg", []))  # filename wrong: stem fallback, no objects
    write_text(ann / "f.xml", voc_xml("a.jpg", [("RBC", ("1", "1", "5", "5"))]))  # a.jpg again
    write_text(ann / "g.xml", voc_xml("g.jpg", [("RBC", ("1", "1", "5", "5"))]))  # unreadable image
    main = root / "V" / "ImageSets" / "Main"
    write_text(main / "train.txt", "a\ng\n")
    write_text(main / "val.txt", "d\n\n")
    write_text(main / "test.txt", "a\n")  # a is already in train: first list wins


VOC_LAYOUT = {
    "annotations": "V/Annotations/*.xml",
    "images_dir": "V/JPEGImages",
    "class_names": {"RBC": "RBC", "WBC": "WBC", "Platelets": "platelet"},
    "splits_dir": "V/ImageSets/Main",
}


def test_voc_boxes_splits_and_problems(tmp_path):
    make_voc(tmp_path)
    parsed = PARSERS["voc"](tmp_path, **VOC_LAYOUT)
    check_columns(parsed)
    assert names(parsed.images) == ["a.jpg", "d.jpg", "e.jpg"]
    assert list(parsed.images["split"]) == ["train", "val", None]
    assert skips(parsed) == [
        ("a.xml", None, "degenerate box"),
        ("a.xml", None, "box outside image"),
        ("a.xml", None, "malformed object"),
        ("a.xml", None, "malformed object"),
        ("a.xml", None, "malformed object"),
        ("a.xml", None, "unknown class name"),
        ("b.xml", None, "cannot parse XML"),
        ("c.xml", None, "missing image"),
        ("f.xml", None, "duplicate image"),
        ("g.jpg", None, "cannot read image header"),
    ]
    assert parsed.skipped[0].reason == "degenerate box: object 3 (RBC) 30,30,30,40"
    boxes = parsed.objects[["x0", "y0", "x1", "y1"]].to_numpy().tolist()
    assert boxes == [[0, 0, 10, 5], [19, 9, 64, 48], [0, 39, 5, 48], [1, 1, 6.5, 6.5]]
    assert list(parsed.objects["label"]) == ["RBC", "WBC", "platelet", "RBC"]
    assert names(parsed.objects) == ["a.jpg"] * 3 + ["d.jpg"]


def test_voc_without_map_and_missing_split_list(tmp_path):
    make_voc(tmp_path)
    parsed = PARSERS["voc"](tmp_path, annotations="V/Annotations/*.xml", images_dir="V/JPEGImages")
    assert parsed.objects["label"].value_counts().to_dict() == {
        "RBC": 2,
        "WBC": 1,
        "Platelets": 1,
        "Unknown": 1,
    }
    assert parsed.images["split"].isna().all()
    with pytest.raises(ValueError, match=r"val\.txt does not exist"):
        PARSERS["voc"](tmp_path, annotations="V/Annotations/*.xml", splits_dir="V", split_names=["val"])


# ------------------------------------------------------------------------------------------ csv table

CSV_ROWS = """path,cell type,slide,x0,y0,x1,y1
s1/a.png,sickle,S1,0,0,10,10
s1/missing.png,sickle,S1,0,0,10,10
s1/a.png,,S1,0,0,10,10
s1/a.png,alien,S1,0,0,10,10
s1/b.png,normal,,0,0,10,10
s1/a.png,normal,S2,0,0,10,10
s1/a.png,sickle,S1,0,0,10,10
s1/bad.png,normal,S1,0,0,10,10
s1/a.png,normal,S1,0,0,x,10
s1/a.png,normal,S1,5,5,40,10
s1/a.png,normal,S1,2,2,21,11
s2/c.png,normal,S2,0,0,5,5
"""


def make_csv(root: Path) -> None:
    write_image(root / "imgs" / "s1" / "a.png", (20, 10))
    write_image(root / "imgs" / "s1" / "b.png", (20, 10))
    write_image(root / "imgs" / "s2" / "c.png", (8, 8))
    (root / "imgs" / "s1" / "bad.png").write_bytes(b"nope")
    write_text(root / "table.csv", CSV_ROWS)


CSV_LAYOUT = {
    "table": "table.csv",
    "images_dir": "imgs",
    "file_column": "path",
    "label_column": "cell type",
    "subject_column": "slide",
    "box_columns": ["x0", "y0", "x1", "y1"],
    "class_names": {"sickle": "sickle cell", "normal": "normal cell"},
}


def test_csv_table_rows_and_line_numbers(tmp_path):
    make_csv(tmp_path)
    parsed = PARSERS["csv_table"](tmp_path, **CSV_LAYOUT)
    check_columns(parsed)
    assert skips(parsed) == [
        ("table.csv", 3, "missing image"),
        ("table.csv", 4, "empty label"),
        ("table.csv", 5, "unknown class name"),
        ("table.csv", 6, "empty subject"),
        ("table.csv", 7, "conflicting subject"),
        ("table.csv", 8, "duplicate row"),
        ("bad.png", None, "cannot read image header"),
        ("table.csv", 10, "malformed box"),
        ("table.csv", 11, "box outside image"),
    ]
    assert parsed.skipped[5].reason == "duplicate row: same as line 2"
    assert names(parsed.images) == ["a.png", "c.png"]
    assert list(parsed.images["subject"]) == ["S1", "S2"]
    assert parsed.objects[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [
        [0, 0, 10, 10],
        [2, 2, 20, 10],
        [0, 0, 5, 5],
    ]
    assert list(parsed.objects["label"]) == ["sickle cell", "normal cell", "normal cell"]


def test_csv_table_whole_image_boxes_and_config_errors(tmp_path):
    make_csv(tmp_path)
    parsed = PARSERS["csv_table"](
        tmp_path, table="table.csv", images_dir="imgs", file_column="path", label_column="cell type"
    )
    # without a class map 'alien' is a label; without a subject column line 6 is fine; no boxes: whole image
    assert list(zip(names(parsed.objects), parsed.objects["label"], strict=True)) == [
        ("a.png", "sickle"),
        ("a.png", "alien"),
        ("b.png", "normal"),
        ("a.png", "normal"),
        ("c.png", "normal"),
    ]
    assert parsed.objects[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [[0, 0, 20, 10]] * 4 + [
        [0, 0, 8, 8]
    ]
    assert skips(parsed) == [
        ("table.csv", 3, "missing image"),
        ("table.csv", 4, "empty label"),
        ("table.csv", 8, "duplicate row"),
        ("bad.png", None, "cannot read image header"),
        ("table.csv", 10, "duplicate row"),
        ("table.csv", 11, "duplicate row"),
        ("table.csv", 12, "duplicate row"),
    ]
    assert parsed.images["subject"].tolist() == ["imgs/s1/a", "imgs/s1/b", "imgs/s2/c"]
    with pytest.raises(ValueError, match=r"lacks columns \['file', 'label'\]"):
        PARSERS["csv_table"](tmp_path, table="table.csv")
    with pytest.raises(ValueError, match="does not exist"):
        PARSERS["csv_table"](tmp_path, table="nope.csv")


# ------------------------------------------------------------------------------------------ parse_source


def test_parse_source_image_size_sources_drop_unmapped_images_and_their_objects(tmp_path):
    make_yolo(tmp_path)
    layout = {"parser": "yolo", **YOLO_LAYOUT}
    parsed = parse_source(
        "txl", tmp_path, layout, {"from": "image"}, {"from": "image_size", "sizes": {"100x50": "big"}}
    )
    assert names(parsed.images) == ["a.jpg", "c.jpg"]
    assert list(parsed.images["source"]) == ["txl:big", "txl:big"]
    assert list(parsed.images["subject"]) == ["txl:big/set/images/train/a", "txl:big/set/images/val/c"]
    assert set(names(parsed.objects)) == {"a.jpg"} and len(parsed.objects) == 4
    assert "unmapped image size: 30x30" in [s.reason for s in parsed.skipped]
    assert parsed.skipped_by_reason()["unmapped image size"] == 1


def test_parse_source_subject_specs(tmp_path):
    make_chula(tmp_path)
    layout = {"parser": "centre_points", **CHULA_LAYOUT}
    run = lambda subject: parse_source("chula", tmp_path, layout, subject, {"from": "constant"})  # noqa: E731
    assert run(None).images["subject"].tolist() == [
        "chula/Dataset/1",
        "chula/Dataset/2",
        "chula/Dataset/3",
        "chula/Dataset/10",
    ]
    assert run(None).images["split"].tolist() == [None] * 4
    assert set(run({"from": "parent"}).images["subject"]) == {"chula/Dataset"}
    assert set(run({"from": "constant", "value": "lab"}).images["subject"]) == {"chula/lab"}
    assert set(run({"from": "image"}).images["source"]) == {"chula"}
    by_regex = run({"from": "regex", "pattern": r"/(1\d*)\.jpg$"})
    assert by_regex.images["subject"].tolist() == ["chula/1", "chula/10"]
    assert [
        k
        for k in skips(by_regex)
        if k[2] != "not used by the layout (neither one of its images nor an annotation file it reads)"
    ][-2:] == [
        ("2.jpg", None, "subject pattern did not match"),
        ("3.jpg", None, "subject pattern did not match"),
    ]
    assert set(names(by_regex.objects)) == {"1.jpg", "10.jpg"}
    with pytest.raises(ValueError, match="needs a group"):
        run({"from": "regex", "pattern": r"\d+"})
    with pytest.raises(ValueError, match="needs parser csv_table with subject_column"):
        run({"from": "column"})
    with pytest.raises(ValueError, match="subject spec needs"):
        run({"from": "folder"})


def test_parse_source_column_subjects(tmp_path):
    make_csv(tmp_path)
    parsed = parse_source(
        "elsafty", tmp_path, {"parser": "csv_table", **CSV_LAYOUT}, {"from": "column"}, None
    )
    assert parsed.images["subject"].tolist() == ["elsafty/S1", "elsafty/S2"]


def test_parse_source_config_errors(tmp_path):
    make_chula(tmp_path)
    with pytest.raises(ValueError, match="unknown layout parser 'coco'"):
        parse_source("x", tmp_path, {"parser": "coco"}, None, None)
    with pytest.raises(ValueError, match=r"bad options for parser .*'labels'"):
        parse_source(
            "x", tmp_path, {"parser": "centre_points", "images": "Dataset/*.jpg", "label": "x"}, None, None
        )
    with pytest.raises(ValueError, match="source spec needs"):
        parse_source("x", tmp_path, {"parser": "flat"}, None, {"from": "size"})
    with pytest.raises(ValueError, match="non-empty sizes map"):
        parse_source("x", tmp_path, {"parser": "flat"}, None, {"from": "image_size"})


def test_every_parser_result_has_the_record_columns_and_no_nan_points(tmp_path):
    make_chula(tmp_path)
    parsed = parse_source("c", tmp_path, {"parser": "centre_points", **CHULA_LAYOUT}, None, None)
    check_columns(parsed)
    assert parsed.images["width"].dtype == "int64"
    assert not any(math.isnan(v) for v in parsed.objects["cx"])


# ------------------------------------------------------------------------------------------ unused files


def test_every_unused_file_under_the_root_gets_a_reason(tmp_path):
    import os

    make_chula(tmp_path)
    write_image(tmp_path / "other" / "anim.gif")
    write_image(tmp_path / "extra" / "stray.png")
    write_text(tmp_path / "README.md", "about")
    pages = [Image.new("RGB", (40, 30), c) for c in ((1, 2, 3), (4, 5, 6), (7, 8, 9))]
    pages[0].save(tmp_path / "Dataset" / "stack.tif", save_all=True, append_images=pages[1:])
    os.symlink(tmp_path / "nowhere.png", tmp_path / "Dataset" / "dangling.png")
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    layout = {**CHULA_LAYOUT, "parser": "centre_points", "images": "Dataset/*.*"}
    parsed = parse_source("chula", tmp_path, layout, None, None)
    reasons = {Path(s.file).name: s.reason for s in parsed.skipped if s.line is None}
    assert reasons["anim.gif"] == "unsupported image type .gif (read: .png, .jpg, .jpeg, .tif, .tiff, .bmp)"
    assert reasons["stray.png"] == "image not matched by the layout's images pattern"
    assert reasons["README.md"].startswith("not used by the layout")
    assert reasons["stack.tif"] == "pages 2-3 of a 3-page image not used (the first page is)"
    assert reasons["dangling.png"].startswith("dangling symbolic link to ")
    assert reasons["loop_a"].startswith("symbolic link loop") and reasons["loop_b"].startswith("symbolic")
    assert "stack.tif" in names(parsed.images)
    # the label files the parser read and the images it used are not reported
    assert not {"1.txt", "2.txt", "10.txt", "1.jpg", "3.jpg"} & set(reasons)


def test_a_csv_table_cannot_reach_outside_the_dataset_folder(tmp_path):
    write_image(tmp_path / "outside.png")
    root = tmp_path / "root"
    write_image(root / "imgs" / "a.png")
    write_text(root / "t.csv", "path,label\na.png,x\n../../outside.png,x\n")
    parsed = PARSERS["csv_table"](
        root, table="t.csv", images_dir="imgs", file_column="path", label_column="label"
    )
    assert names(parsed.images) == ["a.png"]
    assert skips(parsed) == [("t.csv", 3, "image outside the dataset folder")]
