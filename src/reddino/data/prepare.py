"""Turn parsed datasets into units: 224x224 patches and single-cell crops, one manifest per dataset.

Each image is decoded once; from it come its perceptual hash (for cross-source dedup), its patches
(non-overlapping tiles, background tiles dropped) and its cells (crops around the dataset's own boxes
or centre points, else around cells a segmenter finds). Work is cut into chunks of images written
atomically under a fingerprint of the settings, so a rerun skips finished chunks and an interrupted
run resumes; a bad image is recorded with its reason and never stops the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from reddino.data.dedup import perceptual_hash
from reddino.data.io import BadImageError, read_rgb
from reddino.data.manifest import UNIT_COLUMNS
from reddino.data.patches import foreground_fraction, square_boxes, tile_boxes
from reddino.data.segment import LOW_COVERAGE, SEGMENTATION_STATS
from reddino.data.sources.records import ParsedSource, Skipped

log = logging.getLogger("reddino.prepare")

# manifest = the units table plus where each unit came from
MANIFEST_COLUMNS = (*UNIT_COLUMNS, "split", "dataset", "image_hash")
IMAGE_INFO_COLUMNS = (
    "file",
    "dataset",
    "source",
    "subject",
    "split",
    "width",
    "height",
    "image_hash",
    *SEGMENTATION_STATS,  # NaN for images whose cells came from annotations
)
SKIPPED_COLUMNS = ("dataset", "file", "line", "reason")


@dataclass(frozen=True)
class PatchSettings:
    """Non-overlapping square tiles; ``side_px`` is the tile side in the image's own pixels."""

    enabled: bool
    size: int
    min_foreground: float
    background_percentile: float
    contrast: float
    target_pixel_size_um: float | None

    @classmethod
    def from_config(cls, patches: Mapping[str, Any], enabled: bool) -> PatchSettings:
        """From the ``patches`` section of ``conf/unit_cutting/``."""
        return cls(enabled=enabled, **patches)

    def side_px(self, pixel_size_um: float | None) -> int:
        """Tile side in native pixels: resampling to a common pixel size = cutting larger/smaller tiles."""
        if self.target_pixel_size_um is None or pixel_size_um is None:
            return self.size
        return max(1, round(self.size * self.target_pixel_size_um / pixel_size_um))


@dataclass(frozen=True)
class CellSettings:
    """Square crops around cells: ``point_window`` px around centre points, ``box_context`` x box side."""

    enabled: bool
    point_window: int
    box_context: float
    drop_labels: tuple[str, ...]
    segment: str  # "unlabelled" (images with no annotations) | "always" | "never"
    min_area: int

    @classmethod
    def from_config(cls, cells: Mapping[str, Any], enabled: bool) -> CellSettings:
        """From the ``cells`` section of ``conf/unit_cutting/``."""
        return cls(enabled=enabled, **{**cells, "drop_labels": tuple(cells["drop_labels"])})

    def __post_init__(self) -> None:
        if self.segment not in ("unlabelled", "always", "never"):
            raise ValueError(f"cells.segment must be unlabelled | always | never, got {self.segment!r}")


@dataclass
class ChunkResult:
    """Units, image rows and skipped items of one chunk."""

    units: pd.DataFrame
    images: pd.DataFrame
    skipped: pd.DataFrame


def cell_boxes(objects: pd.DataFrame, cells: CellSettings) -> np.ndarray:
    """Square crop boxes around annotated objects: points get a fixed window, boxes a context margin."""
    return square_crops(objects, cells.box_context, cells.point_window)


def square_crops(objects: pd.DataFrame, box_context: float, point_window: int) -> np.ndarray:
    """Square boxes centred on each object: ``box_context`` x the longer side of its box, or
    ``point_window`` px around a centre point (an object without a box)."""
    if objects.empty:
        return np.zeros((0, 4), dtype=np.int64)
    has_box = objects[["x0", "y0", "x1", "y1"]].notna().all(axis=1).to_numpy()
    side = np.where(
        has_box,
        box_context
        * np.maximum(objects["x1"] - objects["x0"], objects["y1"] - objects["y0"]).fillna(0).to_numpy(),
        float(point_window),
    )
    return square_boxes(
        objects["cx"].to_numpy(dtype=np.float64), objects["cy"].to_numpy(dtype=np.float64), side
    )


def _units_frame(
    boxes: np.ndarray, unit: str, labels: Sequence[Any], image: Mapping[str, Any]
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "file": image["file"],
            "x0": boxes[:, 0],
            "y0": boxes[:, 1],
            "x1": boxes[:, 2],
            "y1": boxes[:, 3],
            "unit": unit,
            "source": image["source"],
            "subject": image["subject"],
            "label": pd.Series(list(labels), dtype=object),
            "split": image.get("split"),
        }
    )


def units_of_image(
    rgb: np.ndarray,
    image: Mapping[str, Any],
    objects: pd.DataFrame,
    patches: PatchSettings,
    cells: CellSettings,
    pixel_size_um: float | None,
    segment: Callable[[np.ndarray], pd.DataFrame] | None,
) -> tuple[list[pd.DataFrame], list[str], dict[str, float]]:
    """The units one decoded image gives, notes on what it could not give (for the report), and what
    segmentation found (``SEGMENTATION_STATS``; empty when the image was not segmented)."""
    frames: list[pd.DataFrame] = []
    notes: list[str] = []
    segmentation: dict[str, float] = {}
    h, w = rgb.shape[:2]
    if patches.enabled:
        side = patches.side_px(pixel_size_um)
        boxes = tile_boxes(w, h, side)
        if len(boxes) == 0:
            notes.append(f"image {w}x{h} smaller than one {side}px patch: no patches")
        else:
            keep = foreground_fraction(rgb, boxes, patches.background_percentile, patches.contrast)
            boxes = boxes[keep >= patches.min_foreground]
            frames.append(_units_frame(boxes, "patch", [None] * len(boxes), image))
    if cells.enabled:
        kept = objects[~objects["label"].isin(cells.drop_labels)] if not objects.empty else objects
        use_segmenter = cells.segment == "always" or (cells.segment == "unlabelled" and objects.empty)
        if use_segmenter:
            if segment is None:
                raise ValueError("cells.segment asks for segmentation but no segmenter was built")
            found = segment(rgb)
            stats = found.attrs.get("segmentation")
            if stats is not None:
                segmentation.update(stats)
                if stats["foreground_covered"] < LOW_COVERAGE:  # NaN (no stain) compares False
                    notes.append(
                        f"segmentation covers {stats['foreground_covered']:.0%} of the stained foreground "
                        f"({int(stats['segmented_cells'])} cells, estimated diameter "
                        f"{stats['cell_diameter_px']:.0f} px): cells may be split, merged or dropped"
                    )
            found = found[found["area"] >= cells.min_area]
            boxes = square_boxes(
                found["cx"].to_numpy(),
                found["cy"].to_numpy(),
                cells.box_context
                * np.maximum(found["x1"] - found["x0"], found["y1"] - found["y0"]).to_numpy(),
            )
            frames.append(_units_frame(boxes, "cell", [None] * len(boxes), image))
        elif not kept.empty:
            frames.append(_units_frame(cell_boxes(kept, cells), "cell", kept["label"].tolist(), image))
    return frames, notes, segmentation


def process_chunk(
    dataset: str,
    images: pd.DataFrame,
    objects: pd.DataFrame,
    patches: PatchSettings,
    cells: CellSettings,
    pixel_size_um: float | None,
    hash_size: int,
    segment: Callable[[np.ndarray], pd.DataFrame] | None,
) -> ChunkResult:
    """Decode each image once and cut its units; undecodable images are skipped with the reason."""
    by_file = {f: g for f, g in objects.groupby("file", sort=False)} if not objects.empty else {}
    empty = objects.iloc[0:0]
    unit_frames: list[pd.DataFrame] = []
    image_rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for image in images.to_dict("records"):
        try:
            rgb = read_rgb(image["file"])
        except BadImageError as exc:
            skipped.append({"dataset": dataset, "file": image["file"], "line": None, "reason": str(exc)})
            continue
        image = {**image, "width": rgb.shape[1], "height": rgb.shape[0]}
        image_hash = perceptual_hash(rgb, hash_size)
        frames, notes, segmentation = units_of_image(
            rgb, image, by_file.get(image["file"], empty), patches, cells, pixel_size_um, segment
        )
        skipped.extend({"dataset": dataset, "file": image["file"], "line": None, "reason": n} for n in notes)
        for frame in frames:
            unit_frames.append(frame.assign(dataset=dataset, image_hash=image_hash))
        image_rows.append(
            {
                **{c: image.get(c) for c in IMAGE_INFO_COLUMNS},
                "dataset": dataset,
                "image_hash": image_hash,
                **{c: segmentation.get(c, float("nan")) for c in SEGMENTATION_STATS},
            }
        )
    units = pd.concat(unit_frames, ignore_index=True) if unit_frames else empty_manifest()
    return ChunkResult(
        units=units[list(MANIFEST_COLUMNS)],
        images=pd.DataFrame(image_rows, columns=list(IMAGE_INFO_COLUMNS)),
        skipped=pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS)),
    )


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in MANIFEST_COLUMNS})


def skipped_frame(dataset: str, items: Sequence[Skipped]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"dataset": dataset, "file": s.file, "line": s.line, "reason": s.reason} for s in items],
        columns=list(SKIPPED_COLUMNS),
    )


def fingerprint(settings: Mapping[str, Any], files: Sequence[str]) -> str:
    """Stable id of a chunk's work: its settings and the files (with size and mtime) it covers."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()[:16]


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write next to the target, then rename: a killed run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_parsed(
    dataset: str,
    parsed: ParsedSource,
    work_dir: Path,
    patches: PatchSettings,
    cells: CellSettings,
    pixel_size_um: float | None,
    hash_size: int,
    chunk_size: int,
    segment: Callable[[np.ndarray], pd.DataFrame] | None,
    settings: Mapping[str, Any],
    progress: Callable[[int], None] | None = None,
) -> tuple[ChunkResult, dict[str, int]]:
    """Process a parsed dataset chunk by chunk, reusing chunks a previous run finished.

    Returns the merged result and counts of chunks computed vs reused.
    """
    parts = work_dir / "parts"
    images = parsed.images.sort_values("file", kind="stable").reset_index(drop=True)
    results: list[ChunkResult] = []
    counts = {"computed": 0, "reused": 0, "redone": 0}  # redone: a finished chunk found unreadable
    for start in range(0, len(images), chunk_size):
        chunk = images.iloc[start : start + chunk_size]
        key = fingerprint(settings, chunk["file"].tolist())
        paths = {
            k: parts / f"{start // chunk_size:05d}-{key}.{k}.parquet" for k in ("units", "images", "skipped")
        }
        finished = all(p.is_file() for p in paths.values())
        result = _read_finished_chunk(paths) if finished else None
        if result is not None:
            counts["reused"] += 1
        else:
            counts["redone"] += int(finished)
            objects = parsed.objects[parsed.objects["file"].isin(set(chunk["file"]))]
            result = process_chunk(dataset, chunk, objects, patches, cells, pixel_size_um, hash_size, segment)
            # images last: its presence marks the chunk complete
            for k in ("units", "skipped", "images"):
                write_parquet_atomic(getattr(result, k), paths[k])
            counts["computed"] += 1
        results.append(result)
        if progress is not None:
            progress(len(chunk))
    merged = ChunkResult(
        units=_concat([r.units for r in results], MANIFEST_COLUMNS),
        images=_concat([r.images for r in results], IMAGE_INFO_COLUMNS),
        skipped=_concat(
            [skipped_frame(dataset, parsed.skipped), *(r.skipped for r in results)], SKIPPED_COLUMNS
        ),
    )
    return merged, counts


def _read_finished_chunk(paths: Mapping[str, Path]) -> ChunkResult | None:
    """A finished chunk's tables, or None (logged) when one of them is truncated or unreadable, so the
    chunk is computed again instead of crashing the rerun."""
    try:
        return ChunkResult(*(pd.read_parquet(paths[k]) for k in ("units", "images", "skipped")))
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.warning("work chunk %s is unreadable (%s): computing it again", paths["images"].name, exc)
        for path in paths.values():
            path.unlink(missing_ok=True)
        return None


def _concat(frames: Sequence[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pd.concat(frames, ignore_index=True)[list(columns)]


def materialise_units(units: pd.DataFrame, out_dir: Path, image_cache_size: int) -> pd.DataFrame:
    """Write every unit's crop as a PNG under ``out_dir`` and return the manifest pointing at them.

    For training on file systems where decoding whole smears per crop is the bottleneck. File names
    are content addresses of (source file, box), so a rerun skips crops already written; writes are
    atomic. The returned rows keep every column, with ``file`` the crop and the box its full extent.
    """
    from PIL import Image

    from reddino.data.datasets import ImageCache  # local: keeps torch out of the preparation imports
    from reddino.data.patches import crop_padded

    cache = ImageCache(image_cache_size)
    rows = units.reset_index(drop=True).copy()
    files, widths, heights = [], [], []
    for unit in rows.itertuples(index=False):
        box = (int(unit.x0), int(unit.y0), int(unit.x1), int(unit.y1))
        key = hashlib.sha1(f"{unit.file}|{box}".encode()).hexdigest()[:20]
        path = out_dir / str(unit.dataset) / key[:2] / f"{key}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
            Image.fromarray(crop_padded(cache.get(unit.file), box)).save(tmp)
            os.replace(tmp, path)
        files.append(str(path))
        widths.append(box[2] - box[0])
        heights.append(box[3] - box[1])
    return rows.assign(file=files, x0=0, y0=0, x1=widths, y1=heights)


def segmentation_summary(images: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and source id, over the images that were segmented: how many, the cells found, the
    estimated cell diameter, the cell size distribution and how much stained foreground the accepted
    cells cover (median, and the share of images below ``LOW_COVERAGE``)."""
    seg = images[images["segmented_cells"].notna()]
    if seg.empty:
        return pd.DataFrame(columns=["dataset", "source", "images_segmented"])
    grouped = seg.groupby(["dataset", "source"])
    return grouped.agg(
        images_segmented=("file", "size"),
        cells=("segmented_cells", "sum"),
        cell_diameter_px=("cell_diameter_px", "median"),
        cell_area_p10=("cell_area_p10", "median"),
        cell_area_median=("cell_area_median", "median"),
        cell_area_p90=("cell_area_p90", "median"),
        foreground_covered=("foreground_covered", "median"),
        images_low_coverage=("foreground_covered", lambda c: int((c < LOW_COVERAGE).sum())),
    ).reset_index()


def coverage_warnings(segmentation: pd.DataFrame) -> list[str]:
    """One warning per source whose accepted cells cover less than ``LOW_COVERAGE`` of the stain."""
    return [
        f"{r.dataset} / {r.source}: accepted cells cover a median {r.foreground_covered:.0%} of the stained "
        f"foreground ({r.images_low_coverage} of {r.images_segmented} images below {LOW_COVERAGE:.0%}); "
        f"estimated cell diameter {r.cell_diameter_px:.0f} px. Check the magnification (pixel size) and "
        "segmentation settings, or use cellpose"
        for r in segmentation.itertuples(index=False)
        if not r.foreground_covered >= LOW_COVERAGE
    ]
