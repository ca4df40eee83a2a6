"""On-disk layout parsers: turn a dataset folder into images, labelled objects and skipped items.

A catalog entry names a parser (``layout["parser"]``) plus its options, a ``subject`` spec and a
``source`` spec; ``parse_source`` runs the parser and then applies both specs. Parsers only read image
headers (size), never decode pixels, so parsing a whole dataset takes seconds. Bad data (unreadable
headers, noisy label lines, broken XML) becomes ``Skipped`` records and the run goes on; a
configuration error (missing folder, a glob that matches nothing, an unknown option) raises
``ValueError`` because no amount of data cleaning fixes it.
"""

from __future__ import annotations

import csv
import inspect
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import defusedxml.ElementTree as SafeET
import pandas as pd
from defusedxml import DefusedXmlException
from PIL import Image

from reddino.data.io import upright_size
from reddino.data.sources.records import IMAGE_COLUMNS, OBJECT_COLUMNS, ParsedSource, Skipped, empty_objects

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NAN = float("nan")

# --------------------------------------------------------------------------------------------------
# shared helpers

_FILES_READ: ContextVar[set[str] | None] = ContextVar("files_read", default=None)


def _note_read(path: Path) -> None:
    """Record an annotation file a parser reads, so that ``unused_files`` does not report it."""
    seen = _FILES_READ.get()
    if seen is not None:
        seen.add(str(path))


@dataclass
class _Collector:
    """Accumulates rows while a parser walks the files, then builds the ParsedSource frames."""

    root: Path
    images: list[dict[str, Any]] = field(default_factory=list)
    objects: list[tuple[Any, ...]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skip(self, file: Path | str, reason: str, line: int | None = None) -> None:
        self.skipped.append(Skipped(str(file), reason, line))

    def image(
        self, path: Path, size: tuple[int, int], split: str | None = None, subject: str | None = None
    ) -> None:
        """Add an image; the default subject is the image itself (its path under root, no suffix)."""
        self.images.append(
            {
                "file": str(path),
                "width": size[0],
                "height": size[1],
                "source": self.root.name,
                "subject": subject if subject is not None else _relative_id(path, self.root),
                "split": split,
            }
        )

    def box(self, image: Path, box: Sequence[float], label: str) -> None:
        x0, y0, x1, y1 = (float(v) for v in box)
        self.objects.append((str(image), x0, y0, x1, y1, (x0 + x1) / 2, (y0 + y1) / 2, label))

    def point(self, image: Path, x: float, y: float, label: str) -> None:
        self.objects.append((str(image), NAN, NAN, NAN, NAN, float(x), float(y), label))

    def header(self, path: Path) -> tuple[int, int] | None:
        """The image size from its header, or None after recording why it cannot be read."""
        header = read_header(path)
        if isinstance(header, str):
            self.skip(path, f"cannot read image header: {header}")
            return None
        width, height, pages = header
        if pages > 1:  # multi-page TIFF (or animation): the first page is the image
            self.skip(path, f"pages 2-{pages} of a {pages}-page image not used (the first page is)")
        size = (width, height)
        return size

    def result(self) -> ParsedSource:
        return ParsedSource(_images_frame(self.images), _objects_frame(self.objects), list(self.skipped))


def read_header(path: Path) -> tuple[int, int, int] | str:
    """(width, height, pages) from the image header, or a short description of why it cannot be read."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            width, height = upright_size(im)  # the size read_rgb gives: EXIF orientation applied
            pages = int(getattr(im, "n_frames", 1))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if width <= 0 or height <= 0:
        return f"zero-area image {width}x{height}"
    return int(width), int(height), pages


def _images_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(IMAGE_COLUMNS))
    frame = frame.astype({"width": "int64", "height": "int64", "file": "object", "split": "object"})
    splits = [s if isinstance(s, str) else None for s in frame["split"]]
    frame["split"] = pd.Series(splits, index=frame.index, dtype="object")  # None, never NaN
    return frame


def _objects_frame(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    if not rows:
        return empty_objects()
    return pd.DataFrame(rows, columns=list(OBJECT_COLUMNS))


def _natural_key(path: Path) -> list[Any]:
    """Sort key that orders '2.jpg' before '10.jpg' (reports read in the dataset's own order)."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", path.as_posix()))]


def _glob(root: Path, pattern: str, extensions: Iterable[str] | None = None) -> list[Path]:
    """Files under root matching pattern (and an extension), sorted; nothing matching is a config error."""
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist")
    allowed = (
        {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions} if extensions else None
    )
    try:
        matches = list(root.glob(pattern))
    except (NotImplementedError, ValueError) as exc:  # absolute or empty patterns
        raise ValueError(f"bad glob pattern {pattern!r} under {root}: {exc}") from exc
    files = [p for p in matches if p.is_file() and (allowed is None or p.suffix.lower() in allowed)]
    if not files:
        raise ValueError(f"no files match {pattern!r} under {root}")
    return sorted(files, key=_natural_key)


def _relative_id(path: Path, root: Path) -> str:
    """Path relative to root without suffix, '/'-separated: a stable per-image id."""
    return Path(os.path.relpath(path, root)).with_suffix("").as_posix()


def _label_map(class_names: Mapping[Any, Any] | None) -> dict[str, str] | None:
    """Class map with string keys (YAML may give ints), or None when the raw labels are used as is."""
    if class_names is None:
        return None
    return {str(k).strip(): str(v) for k, v in class_names.items()}


def _class_id(token: str) -> str | None:
    """Integer class id as a string ('1', '1.0' -> '1'), or None when the token is not an integer."""
    try:
        value = float(token)
    except ValueError:
        return None
    return str(int(value)) if math.isfinite(value) and value.is_integer() else None


def _floats(tokens: Sequence[str]) -> list[float] | None:
    """All tokens as finite floats, or None if any is not a number."""
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


def _read_lines(path: Path, col: _Collector) -> list[str] | None:
    """A label file's lines (BOM and CRLF tolerated), or None after recording why it cannot be read."""
    try:
        _note_read(path)
        return path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError as exc:
        col.skip(path, f"cannot read label file: {exc}")
        return None


def _resolve_label(raw: str, names: dict[str, str] | None) -> str | None:
    """The class name for a raw label; None when a map is given and does not know it."""
    if names is None:
        return raw
    return names.get(raw)


def _clip_box(
    box: Sequence[float], width: int, height: int, tolerance: float
) -> tuple[float, float, float, float] | str:
    """Clip a pixel box that pokes at most ``tolerance`` px out of the image; else say what is wrong."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return f"degenerate box: {_fmt(box)}"
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        return f"box outside image: {_fmt(box)} in {width}x{height}"
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return f"box outside image: {_fmt(box)} in {width}x{height}"
    return clipped


def _fmt(values: Iterable[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


# --------------------------------------------------------------------------------------------------
# parsers


def parse_flat(
    root: Path, images: str = "**/*", extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> ParsedSource:
    """Unlabelled images (pretraining material).

    Options: ``images`` glob relative to root (default every file below it), ``extensions`` kept
    (case-insensitive; default common image types, so READMEs and label files are ignored).
    """
    col = _Collector(root)
    for path in _glob(root, images, extensions):
        size = col.header(path)
        if size is not None:
            col.image(path, size)
    return col.result()


def parse_folder_per_class(
    root: Path,
    images_dir: str = ".",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    class_names: Mapping[str, str] | None = None,
) -> ParsedSource:
    """Single-cell crops sorted into one folder per class: ``images_dir/<class>/**/<image>``.

    The label is the top-level folder name, mapped through ``class_names`` ({folder: name}) when
    given; then folders missing from the map are skipped (one record per folder with its file count),
    so a renamed or extra folder is visible in the report instead of silently becoming a class. The
    object box is the whole image. Files directly in ``images_dir`` have no class and are reported.
    Options: ``images_dir`` (relative to root, default "."), ``extensions``, ``class_names``.
    """
    base = root / images_dir
    files = _glob(base, "**/*", extensions)
    names = _label_map(class_names)
    col = _Collector(root)
    unknown: dict[str, int] = {}
    for path in files:
        parts = path.relative_to(base).parts
        if len(parts) < 2:
            col.skip(path, "not in a class folder")
            continue
        label = _resolve_label(parts[0], names)
        if label is None:
            unknown[parts[0]] = unknown.get(parts[0], 0) + 1
            continue
        size = col.header(path)
        if size is not None:
            col.image(path, size)
            col.box(path, (0, 0, size[0], size[1]), label)
    for folder, count in unknown.items():
        col.skip(base / folder, f"unknown class folder: {count} files")
    return col.result()


def parse_centre_points(
    root: Path,
    images: str,
    labels: str,
    class_names: Mapping[Any, str] | None = None,
) -> ParsedSource:
    """Cell centre points, one label file per image with lines ``x y class_id`` (Chula RBC-12).

    Options: ``images`` glob relative to root (e.g. "Dataset/*.jpg"); ``labels`` path template
    relative to root with ``{stem}``, ``{name}`` or ``{parent}`` of the image (e.g.
    "Label/{stem}.txt"); ``class_names`` {id: name} (unknown ids are skipped when given).
    Images without a label file stay as unlabelled images (still usable for patches). Bad lines
    (malformed, unknown class, point outside the image, repeated point) are skipped with their
    line number; a repeated point keeps its first line, and a point listed with two different classes
    is dropped altogether as a conflict.
    """
    names = _label_map(class_names)
    col = _Collector(root)
    for path in _glob(root, images):
        size = col.header(path)
        if size is None:
            continue
        col.image(path, size)
        label_file = root / labels.format(stem=path.stem, name=path.name, parent=path.parent.name)
        if label_file.is_file():
            _parse_point_lines(label_file, path, size, names, col)
    return col.result()


def _label_lines(
    label_file: Path, n_values: int, class_first: bool, names: dict[str, str] | None, col: _Collector
) -> Iterator[tuple[int, str, str, list[float]]]:
    """(line number, class id, class name, numbers) of each usable line of a text label file.

    Lines are ``class v1 .. vn`` (``class_first``, YOLO) or ``v1 .. vn class`` (Chula); blank lines
    are ignored, malformed lines and unknown class ids are skipped with their line number.
    """
    for number, line in enumerate(_read_lines(label_file, col) or [], start=1):
        tokens = line.split()
        if not tokens:
            continue
        well_formed = len(tokens) == n_values + 1
        numbers = tokens[1:] if class_first else tokens[:-1]
        values = _floats(numbers) if well_formed else None
        class_id = _class_id(tokens[0] if class_first else tokens[-1]) if well_formed else None
        if values is None or class_id is None:
            col.skip(label_file, f"malformed line: {line.strip()!r}", number)
            continue
        label = _resolve_label(class_id, names)
        if label is None:
            col.skip(label_file, f"unknown class id: {class_id}", number)
            continue
        yield number, class_id, label, values


def _parse_point_lines(
    label_file: Path, image: Path, size: tuple[int, int], names: dict[str, str] | None, col: _Collector
) -> None:
    seen: dict[tuple[float, float], tuple[int, str]] = {}
    kept: dict[tuple[float, float], tuple[float, float, str]] = {}
    conflicts: set[tuple[float, float]] = set()
    for number, class_id, label, xy in _label_lines(label_file, 2, False, names, col):
        x, y = xy
        if not (0 <= x < size[0] and 0 <= y < size[1]):
            col.skip(label_file, f"point outside image: ({x:g}, {y:g}) in {size[0]}x{size[1]}", number)
            continue
        if (x, y) in seen:
            first, first_class = seen[(x, y)]
            if first_class == class_id:
                col.skip(label_file, f"duplicate point: same as line {first}", number)
            else:  # one cell, two classes: neither label can be trusted
                col.skip(label_file, f"conflicting classes: line {first} says {first_class}", number)
                conflicts.add((x, y))
            continue
        seen[(x, y)] = (number, class_id)
        kept[(x, y)] = (x, y, label)
    for key, (x, y, label) in kept.items():
        if key in conflicts:
            col.skip(label_file, f"conflicting classes at ({x:g}, {y:g}): point dropped", seen[key][0])
        else:
            col.point(image, x, y, label)


def parse_yolo(
    root: Path,
    images: str,
    images_part: str = "images",
    labels_part: str = "labels",
    label_suffix: str = ".txt",
    class_names: Mapping[Any, str] | None = None,
    split_from_parent: bool = False,
    tolerance: float = 0.01,
) -> ParsedSource:
    """YOLO boxes: per image a label file with lines ``class cx cy w h`` normalised to [0, 1] (TXL-PBC).

    Options: ``images`` glob relative to root; the label file is the image path with its last
    ``images_part`` folder replaced by ``labels_part`` and the suffix by ``label_suffix``;
    ``class_names`` {id: name}; ``split_from_parent`` uses the image's folder name (train/val/test)
    as split; ``tolerance`` (fraction of the image side) lets boxes that touch the border through,
    clipped, while values further out are skipped as errors. Images without a label file are kept
    unlabelled (YOLO's background images). Malformed lines, out-of-range values, zero-area boxes,
    unknown classes and repeated lines are skipped with their line number.
    """
    names = _label_map(class_names)
    col = _Collector(root)
    for path in _glob(root, images):
        label_file = _yolo_label_path(path, root, images_part, labels_part, label_suffix)
        size = col.header(path)
        if size is None:
            continue
        col.image(path, size, split=path.parent.name if split_from_parent else None)
        if label_file.is_file():
            _parse_yolo_lines(label_file, path, size, names, tolerance, col)
    return col.result()


def _yolo_label_path(image: Path, root: Path, images_part: str, labels_part: str, suffix: str) -> Path:
    parts = list(image.relative_to(root).parts)
    hits = [i for i, part in enumerate(parts[:-1]) if part == images_part]
    if not hits:
        raise ValueError(f"{image}: no {images_part!r} folder in its path to replace by {labels_part!r}")
    parts[hits[-1]] = labels_part
    return (root.joinpath(*parts)).with_suffix(suffix)


def _parse_yolo_lines(
    label_file: Path,
    image: Path,
    size: tuple[int, int],
    names: dict[str, str] | None,
    tolerance: float,
    col: _Collector,
) -> None:
    seen: dict[tuple[str, float, float, float, float], int] = {}
    for number, class_id, label, values in _label_lines(label_file, 4, True, names, col):
        box = _yolo_box(values, size, tolerance)
        if isinstance(box, str):
            col.skip(label_file, box, number)
            continue
        key = (class_id, *values)
        if key in seen:
            col.skip(label_file, f"duplicate box: same as line {seen[key]}", number)
            continue
        seen[key] = number
        col.box(image, box, label)


def _yolo_box(values: Sequence[float], size: tuple[int, int], tolerance: float) -> tuple[float, ...] | str:
    """Pixel box (x0, y0, x1, y1) from normalised (cx, cy, w, h), or why the values are unusable."""
    cx, cy, w, h = values
    if any(v < -tolerance or v > 1 + tolerance for v in values):
        return f"value out of range: {_fmt(values)}"
    if w <= 0 or h <= 0:
        return f"zero-area box: {_fmt(values)}"
    edges = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    if min(edges) < -tolerance or max(edges) > 1 + tolerance:
        return f"box outside image: {_fmt(values)}"
    x0, y0, x1, y1 = (min(max(e, 0.0), 1.0) for e in edges)
    if x1 <= x0 or y1 <= y0:
        return f"zero-area box: {_fmt(values)} after clipping to the image"
    return x0 * size[0], y0 * size[1], x1 * size[0], y1 * size[1]


def parse_voc(
    root: Path,
    annotations: str,
    images_dir: str = "JPEGImages",
    image_suffix: str = ".jpg",
    class_names: Mapping[str, str] | None = None,
    splits_dir: str | None = None,
    split_names: Sequence[str] = ("train", "val", "test"),
    tolerance: float = 1.0,
) -> ParsedSource:
    """Pascal VOC XML boxes, one annotation file per image (BCCD).

    Options: ``annotations`` glob relative to root; ``images_dir`` relative to root; the image is
    ``<filename>`` from the XML, else the XML's stem + ``image_suffix``; ``class_names`` {raw: name}
    (unknown names skipped when given); ``splits_dir`` with ``{split}.txt`` image-id lists for each
    of ``split_names`` (the first list naming an image wins); ``tolerance`` in pixels for boxes
    reaching past the border (clipped). VOC boxes are 1-based inclusive: x0 = xmin - 1 and x1 = xmax
    (exclusive). Unreadable XML, a missing image, malformed, degenerate (xmax <= xmin, a click
    without a drag) or out-of-image boxes are skipped.
    """
    names = _label_map(class_names)
    splits = _voc_splits(root / splits_dir, split_names) if splits_dir else {}
    col = _Collector(root)
    seen_images: dict[Path, Path] = {}
    for xml_path in _glob(root, annotations):
        try:
            _note_read(xml_path)
            tree = SafeET.parse(xml_path).getroot()  # hardened: no entities, no external references
        except (ET.ParseError, DefusedXmlException, OSError) as exc:
            col.skip(xml_path, f"cannot parse XML: {exc}")
            continue
        image = _voc_image(tree, xml_path, root / images_dir, image_suffix)
        if image is None:
            col.skip(xml_path, f"missing image: {tree.findtext('filename') or xml_path.stem + image_suffix}")
            continue
        if image in seen_images:
            col.skip(
                xml_path, f"duplicate image: {image.name} already annotated by {seen_images[image].name}"
            )
            continue
        seen_images[image] = xml_path
        size = col.header(image)
        if size is None:
            continue
        col.image(image, size, split=splits.get(image.stem))
        for index, obj in enumerate(tree.findall("object"), start=1):
            _voc_object(obj, index, xml_path, image, size, names, tolerance, col)
    return col.result()


def _voc_splits(folder: Path, split_names: Sequence[str]) -> dict[str, str]:
    """Image id -> split name from VOC ``ImageSets/Main/{split}.txt`` lists."""
    splits: dict[str, str] = {}
    for split in split_names:
        list_file = folder / f"{split}.txt"
        if not list_file.is_file():
            raise ValueError(f"split list {list_file} does not exist")
        _note_read(list_file)
        for line in list_file.read_text(encoding="utf-8-sig").splitlines():
            if line.split():
                splits.setdefault(line.split()[0], split)
    return splits


def _voc_image(tree: ET.Element, xml_path: Path, images_dir: Path, suffix: str) -> Path | None:
    """The annotated image: ``<filename>`` if it exists, else the XML stem with the image suffix."""
    named = (tree.findtext("filename") or "").strip()
    candidates = [images_dir / Path(named).name] if named else []
    candidates.append(images_dir / f"{xml_path.stem}{suffix}")
    return next((c for c in candidates if c.is_file()), None)


def _voc_object(
    obj: ET.Element,
    index: int,
    xml_path: Path,
    image: Path,
    size: tuple[int, int],
    names: dict[str, str] | None,
    tolerance: float,
    col: _Collector,
) -> None:
    raw = (obj.findtext("name") or "").strip()
    corners = _floats([obj.findtext(f"bndbox/{k}") or "" for k in ("xmin", "ymin", "xmax", "ymax")])
    where = f"object {index} ({raw or 'no name'})"
    if not raw or corners is None:
        col.skip(xml_path, f"malformed object: {where}")
        return
    label = _resolve_label(raw, names)
    if label is None:
        col.skip(xml_path, f"unknown class name: {raw}")
        return
    xmin, ymin, xmax, ymax = corners
    if xmax <= xmin or ymax <= ymin:
        col.skip(xml_path, f"degenerate box: {where} {_fmt(corners)}")
        return
    box = _clip_box((xmin - 1, ymin - 1, xmax, ymax), size[0], size[1], tolerance)
    if isinstance(box, str):
        col.skip(xml_path, f"box outside image: {where} {_fmt(corners)} in {size[0]}x{size[1]}")
        return
    col.box(image, box, label)


@dataclass(frozen=True)
class TableColumns:
    """Which CSV columns hold what (None: not in this table)."""

    file: str
    label: str | None
    subject: str | None
    boxes: tuple[str, ...] | None


@dataclass
class _CsvState:
    """What earlier rows established: image sizes, subjects and row keys (for duplicates); ``root``
    bounds where a row's image may be (a table naming files outside the dataset folder is refused)."""

    root: Path
    sizes: dict[Path, tuple[int, int] | None] = field(default_factory=dict)
    subjects: dict[Path, str] = field(default_factory=dict)
    seen: dict[tuple[Any, ...], int] = field(default_factory=dict)


def parse_csv_table(
    root: Path,
    table: str,
    images_dir: str = ".",
    file_column: str = "file",
    label_column: str | None = "label",
    subject_column: str | None = None,
    box_columns: Sequence[str] | None = None,
    class_names: Mapping[str, str] | None = None,
) -> ParsedSource:
    """One CSV row per labelled object (Elsafty-style tables of single-cell images).

    Options: ``table`` CSV path relative to root; ``images_dir`` the folder ``file_column`` paths
    are relative to (relative to root); ``label_column`` (None: unlabelled images); ``subject_column``
    (slide/patient, used by ``subject: {from: column}``); ``box_columns`` four columns x0, y0, x1, y1
    in 0-based pixels, x1/y1 exclusive (absent: the box is the whole image); ``class_names`` {raw:
    name}. Rows with a missing image, an empty or unknown label, an empty subject, a bad box or that
    repeat an earlier row are skipped with their CSV line number.
    """
    if box_columns is not None and len(box_columns) != 4:
        raise ValueError(f"box_columns must name 4 columns (x0, y0, x1, y1), got {list(box_columns)}")
    columns = TableColumns(
        file_column, label_column, subject_column, tuple(box_columns) if box_columns else None
    )
    table_path = root / table
    rows = read_table_rows(table_path, columns)
    names = _label_map(class_names)
    col = _Collector(root)
    state = _CsvState(root)
    for line, row in rows:
        _csv_row(row, line, table_path, root / images_dir, columns, names, state, col)
    return col.result()


def read_table_rows(path: Path, columns: TableColumns) -> list[tuple[int, dict[str, str]]]:
    """(line number, stripped cells) per data row; a missing table or column is a config error.

    A ``.parquet`` table is read too: its rows are numbered from 1 (no header line), cells as text."""
    if not path.is_file():
        raise ValueError(f"CSV table {path} does not exist")
    _note_read(path)
    wanted = [c for c in (columns.file, columns.label, columns.subject, *(columns.boxes or ())) if c]
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise ValueError(f"table {path} lacks columns {missing} (has {list(frame.columns)})")
        text = frame.astype(object).where(frame.notna(), "").astype(str)
        rows = [
            (i + 1, {k: v.strip() for k, v in row.items()}) for i, row in enumerate(text.to_dict("records"))
        ]
        if not rows:
            raise ValueError(f"table {path} has no rows")
        return rows
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in wanted if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"CSV table {path} lacks columns {missing} (has {reader.fieldnames})")
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}) for row in reader]
    if not rows:
        raise ValueError(f"CSV table {path} has no rows")
    return rows


class _RowProblem(Exception):
    """A CSV row that cannot be used; the message is the skip reason."""


def _csv_row(
    cell: dict[str, str],
    line: int,
    table: Path,
    images_dir: Path,
    columns: TableColumns,
    names: dict[str, str] | None,
    state: _CsvState,
    col: _Collector,
) -> None:
    """Validate one CSV row; an image is added on its first valid row, and each labelled row is an object."""
    try:
        image, label, subject, box = _csv_fields(cell, images_dir, columns, names, state)
    except _RowProblem as problem:
        col.skip(table, str(problem), line)
        return
    key = (image, label, *(box or ()))
    if key in state.seen:
        col.skip(table, f"duplicate row: same as line {state.seen[key]}", line)
        return
    if image not in state.sizes:
        state.sizes[image] = col.header(image)
        if state.sizes[image] is not None:
            col.image(image, state.sizes[image], subject=subject)
            if subject is not None:
                state.subjects[image] = subject
    size = state.sizes[image]
    if size is None:
        return
    state.seen[key] = line
    if label is None:
        return
    clipped = _clip_box(box, size[0], size[1], 1.0) if box else (0.0, 0.0, float(size[0]), float(size[1]))
    if isinstance(clipped, str):
        col.skip(table, clipped, line)
        return
    col.box(image, clipped, label)


def _csv_fields(
    cell: dict[str, str],
    images_dir: Path,
    columns: TableColumns,
    names: dict[str, str] | None,
    state: _CsvState,
) -> tuple[Path, str | None, str | None, list[float] | None]:
    """(image, label, subject, box) of one row; raises _RowProblem naming what is wrong."""
    name = cell.get(columns.file, "")
    image = images_dir / name
    if name and not image.resolve().is_relative_to(state.root.resolve()):
        raise _RowProblem(f"image outside the dataset folder: {name!r} ({image.resolve()})")
    if not name or not image.is_file():
        raise _RowProblem(f"missing image: {name!r}")
    label = cell.get(columns.label, "") if columns.label else None
    if columns.label and not label:
        raise _RowProblem("empty label")
    if label is not None and names is not None:
        if label not in names:
            raise _RowProblem(f"unknown class name: {label}")
        label = names[label]
    subject = cell.get(columns.subject, "") if columns.subject else None
    if columns.subject and not subject:
        raise _RowProblem("empty subject")
    if subject is not None and state.subjects.get(image, subject) != subject:
        raise _RowProblem(f"conflicting subject: {subject!r}, earlier rows say {state.subjects[image]!r}")
    box = _floats([cell.get(c, "") for c in columns.boxes]) if columns.boxes else None
    if columns.boxes and box is None:
        raise _RowProblem(f"malformed box: {[cell.get(c) for c in columns.boxes]}")
    return image, label, subject, box


PARSERS: dict[str, Callable[..., ParsedSource]] = {
    "flat": parse_flat,
    "folder_per_class": parse_folder_per_class,
    "centre_points": parse_centre_points,
    "yolo": parse_yolo,
    "voc": parse_voc,
    "csv_table": parse_csv_table,
}


# --------------------------------------------------------------------------------------------------
# catalog entry -> ParsedSource


def parse_source(
    name: str,
    root: Path,
    layout: Mapping[str, Any],
    subject: Mapping[str, Any] | None,
    source: Mapping[str, Any] | None,
) -> ParsedSource:
    """Parse one catalog entry: run ``layout["parser"]`` on root, then assign source ids and subjects.

    ``source``: {from: constant} (id = name) or {from: image_size, sizes: {"WxH": suffix}} (id =
    "name:suffix"; unmapped sizes skipped). ``subject``: {from: image | parent | regex (pattern, first
    group on the path relative to root) | column (csv_table's subject_column) | constant (value)};
    subjects are prefixed with the source id so they are unique across sources. Missing specs mean
    {from: constant} and {from: image}.
    """
    layout = dict(layout)
    parser = _parser(layout.pop("parser", None))
    root = Path(root)
    try:
        inspect.signature(parser).bind(root, **layout)
    except TypeError as exc:
        allowed = [p for p in inspect.signature(parser).parameters if p != "root"]
        raise ValueError(
            f"{name}: bad options for parser {parser.__name__} ({exc}); options: {allowed}"
        ) from exc
    subject = dict(subject or {"from": "image"})
    if subject.get("from") == "column" and not layout.get("subject_column"):
        raise ValueError(f"{name}: subject {{from: column}} needs parser csv_table with subject_column")
    token = _FILES_READ.set(set())
    try:
        parsed = parser(root, **layout)
        read = _FILES_READ.get() or set()
    finally:
        _FILES_READ.reset(token)
    parsed = _apply_source(parsed, name, dict(source or {"from": "constant"}))
    parsed = _apply_subject(parsed, root, name, subject)
    return ParsedSource(parsed.images, parsed.objects, parsed.skipped + unused_files(root, parsed, read))


# Image types Pillow may open but the layouts do not read as smears (animations, vector, web formats)
OTHER_IMAGE_SUFFIXES = (".gif", ".webp", ".heic", ".heif", ".jp2", ".svg", ".ico", ".psd")


def unused_files(root: Path, parsed: ParsedSource, read: set[str]) -> list[Skipped]:
    """A reason for every file under ``root`` that the layout did not use: nothing is dropped silently.

    Used means: an image of the result, a file already skipped with its own reason, or an annotation
    file the parser read. Links are not followed into folders; broken links and link loops are named.
    """
    used = {os.path.normpath(f) for f in (*parsed.images["file"], *parsed.objects["file"])}
    used |= {os.path.normpath(s.file) for s in parsed.skipped} | {os.path.normpath(f) for f in read}
    found: list[Skipped] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs):
            path = Path(folder) / name
            if path.is_symlink():
                reason = _link_problem(path)
                if reason:
                    found.append(Skipped(str(path), reason))
        for name in sorted(files):
            path = Path(folder) / name
            if os.path.normpath(path) in used:
                continue
            reason = _link_problem(path) if path.is_symlink() else None
            found.append(Skipped(str(path), reason or _unused_reason(path)))
    return found


def _link_problem(path: Path) -> str | None:
    try:
        path.stat()
    except FileNotFoundError:
        return f"dangling symbolic link to {os.readlink(path)!r}"
    except OSError as exc:  # ELOOP
        return f"symbolic link loop ({exc.strerror})"
    return None


def _unused_reason(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in OTHER_IMAGE_SUFFIXES:
        return f"unsupported image type {suffix} (read: {', '.join(IMAGE_EXTENSIONS)})"
    if suffix in IMAGE_EXTENSIONS:
        return "image not matched by the layout's images pattern"
    return "not used by the layout (neither one of its images nor an annotation file it reads)"


def _parser(key: Any) -> Callable[..., ParsedSource]:
    if key not in PARSERS:
        raise ValueError(f"unknown layout parser {key!r}; known: {sorted(PARSERS)}")
    return PARSERS[key]


def _keep(parsed: ParsedSource, images: pd.DataFrame, skipped: list[Skipped]) -> ParsedSource:
    """A ParsedSource restricted to ``images`` (their objects follow), with more skipped items."""
    objects = parsed.objects[parsed.objects["file"].isin(set(images["file"]))]
    return ParsedSource(
        images.reset_index(drop=True), objects.reset_index(drop=True), parsed.skipped + skipped
    )


def _apply_source(parsed: ParsedSource, name: str, spec: dict[str, Any]) -> ParsedSource:
    """Set each image's source id; images of unmapped sizes are skipped."""
    images = parsed.images.copy()
    kind = spec.get("from")
    if kind == "constant":
        images["source"] = name
        return _keep(parsed, images, [])
    if kind != "image_size":
        raise ValueError(f"{name}: source spec needs from: constant or image_size, got {spec}")
    sizes = {str(k).strip(): str(v) for k, v in (spec.get("sizes") or {}).items()}
    if not sizes:
        raise ValueError(f"{name}: source {{from: image_size}} needs a non-empty sizes map")
    keys = images["width"].astype(str) + "x" + images["height"].astype(str)
    known = keys.isin(set(sizes))
    skipped = [
        Skipped(f, f"unmapped image size: {k}")
        for f, k in zip(images["file"][~known], keys[~known], strict=True)
    ]
    images = images[known].copy()
    images["source"] = [f"{name}:{sizes[k]}" for k in keys[known]]
    return _keep(parsed, images, skipped)


def _apply_subject(parsed: ParsedSource, root: Path, name: str, spec: dict[str, Any]) -> ParsedSource:
    """Set each image's subject to "source/subject"; a regex that does not match skips the image."""
    images = parsed.images.copy()
    kind = spec.get("from")
    files = [Path(f) for f in images["file"]]
    if kind == "image":
        raw = [_relative_id(f, root) for f in files]
    elif kind == "parent":
        raw = [f.parent.name for f in files]
    elif kind == "column":
        raw = list(images["subject"])
    elif kind == "constant":
        if spec.get("value") in (None, ""):
            raise ValueError(f"{name}: subject {{from: constant}} needs a value")
        raw = [str(spec["value"])] * len(files)
    elif kind == "regex":
        raw = _regex_subjects(files, root, name, spec.get("pattern"))
    else:
        raise ValueError(
            f"{name}: subject spec needs from: image, parent, regex, column or constant, got {spec}"
        )
    matched = [r is not None for r in raw]
    pattern = spec.get("pattern")
    skipped = [
        Skipped(str(f), f"subject pattern did not match: {pattern}")
        for f, m in zip(files, matched, strict=True)
        if not m
    ]
    images["subject"] = [f"{s}/{r}" for s, r in zip(images["source"], raw, strict=True)]
    images = images[pd.Series(matched, index=images.index, dtype=bool)]
    return _keep(parsed, images, skipped)


def _regex_subjects(files: list[Path], root: Path, name: str, pattern: Any) -> list[str | None]:
    """First group of ``pattern`` searched in each path relative to root ('/'-separated), or None."""
    if not pattern:
        raise ValueError(f"{name}: subject {{from: regex}} needs a pattern")
    try:
        regex = re.compile(str(pattern))
    except re.error as exc:
        raise ValueError(f"{name}: bad subject pattern {pattern!r}: {exc}") from exc
    if regex.groups < 1:
        raise ValueError(f"{name}: subject pattern {pattern!r} needs a group, e.g. '^(\\w+)/'")
    found = [regex.search(Path(os.path.relpath(f, root)).as_posix()) for f in files]
    return [m.group(1) if m and m.group(1) else None for m in found]
