"""Single-cell segmentation of RBC smears: a classical (scikit-image) and a Cellpose backend.

Why two backends: Cellpose-SAM is the segmenter RedDino used to cut cells out of whole smears, but
its weights (about 1.2 GB) must be downloaded and our machines are often offline. The classical
backend needs nothing but scikit-image and is tuned for what brightfield RBC smears look like:
stained discs (dark in the green channel) with a pale central pallor on a light background, often
touching. ``build_segmenter("auto", ...)`` uses Cellpose when its weights are already on disk and
otherwise falls back to the classical backend, saying so in a WARNING.

Every backend maps an (H, W, 3) uint8 RGB image to an (H, W) int32 label mask, 0 = background,
1..n = cells. This module never downloads anything: a Cellpose model is only ever constructed from a
file that exists locally, and cellpose's own download hook is disabled while it is constructed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import filters, measure, segmentation
from skimage.feature import peak_local_max

log = logging.getLogger(__name__)

BACKENDS = ("cellpose", "classical", "auto")
FOREGROUND_MAPS = ("green_inverted", "green_od", "saturation")
THRESHOLD_METHODS = ("otsu", "li", "triangle", "yen")
CELLPOSE_ENV = "CELLPOSE_LOCAL_MODELS_PATH"


class SegmenterWeightsMissing(FileNotFoundError):
    """Cellpose weights not on disk; the message says where they were expected and how to get them."""


@runtime_checkable
class Segmenter(Protocol):
    """What the preparation step needs from a backend: a name for its report and ``segment``."""

    name: str

    def segment(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) int32 label mask, 0 = background."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend name and every parameter, for the preparation report."""
        ...


def _check_rgb(image: np.ndarray) -> None:
    """Reject anything but (H, W, 3) uint8: grayscale and other depths go through ``io.read_rgb`` first."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", None)
        raise ValueError(
            f"segment() needs an (H, W, 3) uint8 RGB array, got shape {shape} dtype {dtype}; "
            "convert with reddino.data.io.to_rgb_uint8 / read_rgb first"
        )


# --------------------------------------------------------------------------------------------------
# Classical backend
# --------------------------------------------------------------------------------------------------


def foreground_map(image: np.ndarray, kind: str) -> np.ndarray:
    """A float32 map in [0, 1] that is high where there is stain (cells) and low on the background.

    ``green_inverted``: 1 - G. Eosin-stained RBCs absorb green most, so G separates them best from
    the (white, grey or bluish) background. ``green_od``: green optical density -log10(G / G_light),
    G_light = the 99th percentile of G (the background light), clipped to [0, 1]; dividing by the
    light evens out exposure differences between smears, and the log makes a pale rim and a dense
    cell body differ by absorbance rather than by brightness. ``saturation``: (max - min) / max over
    RGB, for images where colour rather than darkness sets cells apart (e.g. a dark background).
    """
    rgb = image.astype(np.float32)
    if kind == "green_inverted":
        return 1.0 - rgb[..., 1] / 255.0
    if kind == "green_od":
        green = rgb[..., 1] + 1.0
        light = float(np.percentile(green, 99.0))
        return np.clip(-np.log10(green / light), 0.0, 1.0).astype(np.float32)
    if kind == "saturation":
        top = rgb.max(axis=2)
        bottom = rgb.min(axis=2)
        return np.where(top > 0, (top - bottom) / np.maximum(top, 1.0), 0.0).astype(np.float32)
    raise ValueError(f"foreground must be one of {FOREGROUND_MAPS}, got {kind!r}")


def _threshold_value(fmap: np.ndarray, threshold: str | float, factor: float) -> float:
    """An automatic threshold (times ``factor``) or a fixed one in the map's [0, 1] units."""
    if isinstance(threshold, str):
        if threshold not in THRESHOLD_METHODS:
            raise ValueError(f"threshold must be a float or one of {THRESHOLD_METHODS}, got {threshold!r}")
        if float(fmap.max()) == float(fmap.min()):
            return float(fmap.max())
        method = getattr(filters, f"threshold_{threshold}")
        return float(method(fmap)) * factor
    return float(threshold)


def _fill_small_holes(mask: np.ndarray, max_hole_area: int) -> np.ndarray:
    """Fill background pockets up to ``max_hole_area`` px: the central pallor, never the open background.

    A plain ``binary_fill_holes`` would also fill the background enclosed by a ring of touching cells;
    the area bound keeps those out. Pockets cut open by the image border are filled too (cells cut by
    the border still get a solid mask).
    """
    holes, n = ndi.label(~mask)
    if n == 0:
        return mask
    areas = np.bincount(holes.ravel(), minlength=n + 1)
    small = areas <= max_hole_area
    small[0] = False
    return mask | small[holes]


def _remove_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Zero out connected components smaller than ``min_area`` px (debris, platelets, noise)."""
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def _split_touching(
    mask: np.ndarray, cell_diameter: float, peak_separation: float, distance_sigma: float
) -> np.ndarray:
    """Watershed of the distance transform: one marker per cell, so touching discs come apart.

    Markers are distance-transform maxima at least ``peak_separation * cell_diameter`` apart: two
    overlapping discs keep one maximum each. The transform is first smoothed (``distance_sigma``)
    because the ridge along an elongated cell (elliptocytes) carries pixel-level bumps that would
    otherwise each seed a cell. A component left without a marker gets one at its maximum.
    """
    components, n = ndi.label(mask)
    if n == 0:
        return components.astype(np.int32)
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    if distance_sigma > 0:
        dist = cv2.GaussianBlur(dist, (0, 0), distance_sigma)
    min_distance = max(1, round(peak_separation * cell_diameter))
    peaks = peak_local_max(dist, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    n_markers = int(markers.max())
    unmarked = np.setdiff1d(np.arange(1, n + 1), components[markers > 0])
    if len(unmarked):
        extra = ndi.maximum_position(dist, components, unmarked)
        for k, (r, c) in enumerate(extra, start=n_markers + 1):
            markers[r, c] = k
    return segmentation.watershed(-dist, markers, mask=mask).astype(np.int32)


def _relabel_filtered(labels: np.ndarray, min_area: int, max_area: int, border_min_area: int) -> np.ndarray:
    """Drop objects outside [min_area, max_area] and border-touching ones below ``border_min_area``.

    Survivors are renumbered 1..n in their old order.
    """
    areas = np.bincount(labels.ravel())
    keep = (areas >= min_area) & (areas <= max_area)
    keep[0] = False
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep[edge] &= areas[edge] >= border_min_area
    new_ids = np.zeros(len(areas), np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labels]


class ClassicalSegmenter:
    """Threshold + hole filling + distance-transform watershed, for stained brightfield RBC smears.

    All parameters are required keyword arguments (the Hydra config writes each one down):

    * ``cell_diameter``: expected cell diameter in px; sets the watershed peak spacing, and every other
      px parameter below is written for cells of this size.
    * ``estimate_diameter``: estimate each image's own cell diameter (``estimate_cell_diameter``) and
      scale every px parameter by estimate / ``cell_diameter``, so a smear at another magnification
      (cells of 80 px instead of 40) is not cut into pieces; false keeps the parameters as written.
    * ``foreground``: one of ``FOREGROUND_MAPS`` (see ``foreground_map``).
    * ``threshold``: ``"otsu" | "li" | "triangle" | "yen"`` or a fixed value in [0, 1];
      ``threshold_factor`` scales an automatic one (< 1 also takes in the paler cell rims).
    * ``min_contrast``: mean foreground minus mean background (map units) below which the image is
      treated as blank and gets an empty mask -- otherwise Otsu would split pure noise into "cells".
    * ``smooth_sigma``: Gaussian sigma (px) on the map before thresholding (JPEG noise, dust).
    * ``closing_radius``: px; closes rims broken by a wide pallor before the holes are filled (0 = off).
    * ``max_hole_area``: px; background pockets up to this size are filled (the pallor).
    * ``peak_separation``: minimum distance between watershed markers as a fraction of the diameter.
    * ``distance_sigma``: px; Gaussian sigma on the distance transform before its peaks are taken
      (keeps elongated cells whole; 0 = off).
    * ``min_area`` / ``max_area``: px; objects outside are dropped (debris / unsplit clumps, overlays).
    * ``border_min_area``: px; cells touching the image border are kept only if at least this large,
      i.e. mostly inside the image (slivers of cut cells make poor crops and are never labelled).
      0 keeps every border cell; anything above ``max_area`` drops them all.
    """

    name = "classical"

    def __init__(
        self,
        *,
        cell_diameter: float,
        estimate_diameter: bool,
        foreground: str,
        threshold: str | float,
        threshold_factor: float,
        min_contrast: float,
        smooth_sigma: float,
        closing_radius: int,
        max_hole_area: int,
        peak_separation: float,
        distance_sigma: float,
        min_area: int,
        max_area: int,
        border_min_area: int,
    ) -> None:
        if foreground not in FOREGROUND_MAPS:
            raise ValueError(f"foreground must be one of {FOREGROUND_MAPS}, got {foreground!r}")
        if isinstance(threshold, str) and threshold not in THRESHOLD_METHODS:
            raise ValueError(f"threshold must be a float or one of {THRESHOLD_METHODS}, got {threshold!r}")
        if cell_diameter <= 0 or min_area < 0 or max_area < min_area:
            raise ValueError(
                "need cell_diameter > 0 and 0 <= min_area <= max_area, "
                f"got {cell_diameter}, {min_area}, {max_area}"
            )
        self.cell_diameter = float(cell_diameter)
        self.estimate_diameter = bool(estimate_diameter)
        self.foreground = foreground
        self.threshold = threshold
        self.threshold_factor = float(threshold_factor)
        self.min_contrast = float(min_contrast)
        self.smooth_sigma = float(smooth_sigma)
        self.closing_radius = int(closing_radius)
        self.max_hole_area = int(max_hole_area)
        self.peak_separation = float(peak_separation)
        self.distance_sigma = float(distance_sigma)
        self.min_area = int(min_area)
        self.max_area = int(max_area)
        self.border_min_area = int(border_min_area)
        self.selection_note: str | None = None

    def describe(self) -> dict[str, Any]:
        """Name and parameters, for the preparation report."""
        params = {k: v for k, v in vars(self).items() if k != "selection_note"}
        return {"backend": self.name, **params, "selection_note": self.selection_note}

    def stained(self, image: np.ndarray) -> np.ndarray:
        """The thresholded stain mask (no hole filling or size filters); empty for a blank image."""
        fmap = foreground_map(image, self.foreground)
        if self.smooth_sigma > 0:
            fmap = cv2.GaussianBlur(fmap, (0, 0), self.smooth_sigma)
        t = _threshold_value(fmap, self.threshold, self.threshold_factor)
        mask = fmap > t
        if not mask.any() or mask.all() or fmap[mask].mean() - fmap[~mask].mean() < self.min_contrast:
            return np.zeros(mask.shape, bool)
        return mask

    def scale_for(self, image: np.ndarray) -> float:
        """Estimated cell diameter / ``cell_diameter`` (1 when not estimating or when it cannot tell)."""
        if not self.estimate_diameter:
            return 1.0
        estimate = estimate_cell_diameter(self.stained(image))
        if estimate is None:
            return 1.0
        scale = float(np.clip(estimate / self.cell_diameter, MIN_SCALE, MAX_SCALE))
        return 1.0 if 1 / SCALE_TOLERANCE < scale < SCALE_TOLERANCE else scale

    def at_scale(self, scale: float) -> ClassicalSegmenter:
        """The same segmenter with every px parameter written for cells ``scale`` times as large."""
        if scale == 1.0:
            return self
        area = scale * scale
        return ClassicalSegmenter(
            cell_diameter=self.cell_diameter * scale,
            estimate_diameter=False,
            foreground=self.foreground,
            threshold=self.threshold,
            threshold_factor=self.threshold_factor,
            min_contrast=self.min_contrast,
            smooth_sigma=self.smooth_sigma * scale,
            closing_radius=round(self.closing_radius * scale),
            max_hole_area=round(self.max_hole_area * area),
            peak_separation=self.peak_separation,
            distance_sigma=self.distance_sigma * scale,
            min_area=round(self.min_area * area),
            max_area=round(self.max_area * area),
            border_min_area=round(self.border_min_area * area),
        )

    def foreground_mask(self, image: np.ndarray) -> np.ndarray:
        """Boolean cell mask before splitting: threshold, close rims, fill pallor, drop specks."""
        mask = self.stained(image)
        if not mask.any():
            return mask
        if self.closing_radius > 0:
            size = 2 * self.closing_radius + 1
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
            mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
        mask = _fill_small_holes(mask, self.max_hole_area)
        components, _ = ndi.label(mask)
        return _remove_small(components, self.min_area) > 0

    def segment(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) int32 labels, 0 = background, cells numbered 1..n."""
        _check_rgb(image)
        return self.at_scale(self.scale_for(image)).segment_as_written(image)

    def segment_as_written(self, image: np.ndarray) -> np.ndarray:
        """``segment`` with the px parameters as they are (no diameter estimate)."""
        mask = self.foreground_mask(image)
        if not mask.any():
            return np.zeros(mask.shape, np.int32)
        labels = _split_touching(mask, self.cell_diameter, self.peak_separation, self.distance_sigma)
        return _relabel_filtered(labels, self.min_area, self.max_area, self.border_min_area)


MIN_SCALE, MAX_SCALE = 0.25, 6.0  # estimates outside are clipped: 10-240 px cells for a 40 px reference
# Estimates within this factor of cell_diameter keep the parameters as written: the estimate varies by
# about +-20 % between smears of one source (Chula, benchmarks/segment_scales.md), which is not a
# magnification change, and the written parameters were tuned on exactly that spread.
SCALE_TOLERANCE = 1.3
# Calibration of the two views on the labelled cells (benchmarks/segment_scales.md): twice the upper-
# quartile inscribed radius is 0.95 of the cell diameter on Chula; the 90th percentile of the shorter
# box sides is about 1.1 diameters on Chula, TXL-PBC and BCCD (clumps sit above one diameter).
INSCRIBED_PERCENTILE = 75
INSCRIBED_TO_DIAMETER = 1.0 / 0.95
SIDE_PERCENTILE = 90
SIDE_TO_DIAMETER = 1.1
MIN_RADIUS_PX = 2.0  # components thinner than this are specks, not cells
MIN_COMPONENTS = 3  # fewer interior objects: no estimate


def estimate_cell_diameter(stained: np.ndarray) -> float | None:
    """Typical cell diameter (px) in a stain mask, from two views of its objects (pale centres filled).

    - The inscribed diameter (twice the largest distance to the background) of a single cell or of a
      clump of touching cells is about one cell, but only the width of the ring where a pale centre
      leaves a broken ring of stain (TXL-PBC, BCCD).
    - The shorter side of the bounding box is about one cell for a ring too, but more for clumps.
    High percentiles skip fragments and platelets; the geometric mean of the two calibrated views is
    within about 25 % of the labelled cell size on Chula at 0.5x-2x and on TXL-PBC and BCCD
    (benchmarks/segment_scales.md). Specks thinner than ``MIN_RADIUS_PX`` are left out; None when
    fewer than ``MIN_COMPONENTS`` objects remain.
    """
    labels, n = ndi.label(ndi.binary_fill_holes(stained))
    if n == 0:
        return None
    dist = cv2.distanceTransform((labels > 0).astype(np.uint8), cv2.DIST_L2, 5)
    radii = np.asarray(ndi.maximum(dist, labels, index=np.arange(1, n + 1)), dtype=np.float64)
    boxes = ndi.find_objects(labels)
    sides = np.array([min(b[0].stop - b[0].start, b[1].stop - b[1].start) for b in boxes], np.float64)
    solid = radii >= MIN_RADIUS_PX
    if np.count_nonzero(solid) < MIN_COMPONENTS:
        return None
    inscribed = 2.0 * np.percentile(radii[solid], INSCRIBED_PERCENTILE) * INSCRIBED_TO_DIAMETER
    side = np.percentile(sides[solid], SIDE_PERCENTILE) / SIDE_TO_DIAMETER
    return float(np.sqrt(inscribed * side))


# --------------------------------------------------------------------------------------------------
# Cellpose backend
# --------------------------------------------------------------------------------------------------


def _cellpose_models() -> Any:
    """Import ``cellpose.models`` lazily: it pulls in torchvision and segment_anything (seconds)."""
    from cellpose import models

    return models


def cellpose_default_model() -> str:
    """The model name cellpose itself uses by default (``CellposeModel``'s ``pretrained_model`` default)."""
    default = (
        inspect.signature(_cellpose_models().CellposeModel.__init__).parameters["pretrained_model"].default
    )
    return str(default)


def cellpose_model_dirs() -> list[Path]:
    """Where cellpose looks for named models: ``$CELLPOSE_LOCAL_MODELS_PATH`` (read now), then ``MODEL_DIR``.

    cellpose reads the environment variable once, at import; reading it again here lets a variable set
    later (a test, a launcher) still count.
    """
    dirs: list[Path] = []
    env = os.environ.get(CELLPOSE_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    model_dir = Path(_cellpose_models().MODEL_DIR).expanduser()
    if model_dir not in dirs:
        dirs.append(model_dir)
    return dirs


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or Path(weights).suffix != ""


def _missing_message(weights: str, candidates: list[Path]) -> str:
    """Name the paths tried, the official download URL (for cellpose's own model names) and the fix."""
    models = _cellpose_models()
    name = Path(weights).name
    url_base = getattr(models, "_MODEL_URL", None)
    known = list(getattr(models, "MODEL_NAMES", []))
    tried = "\n".join(f"  - {p}" for p in candidates)
    lines = [f"Cellpose weights {weights!r} not found locally; looked for:", tried]
    if url_base and name in known:
        lines.append(f"Official download: {url_base}{name}")
    else:
        lines.append(
            f"{name!r} is not one of cellpose's built-in models {known}; "
            f"built-in weights are published at {url_base}<name>"
        )
    lines.append(
        f"To use it offline, download the file on a connected machine and copy it to {candidates[-1]} "
        f"(or to any folder named by the environment variable {CELLPOSE_ENV}), "
        "or set the segmenter's `weights` to the file's full path. Nothing is downloaded automatically."
    )
    return "\n".join(lines)


def resolve_cellpose_weights(weights: str | os.PathLike[str] | None) -> Path:
    """The local file for ``weights`` (a path, or a model name looked up in the local model dirs only).

    ``None`` means cellpose's default model. Raises ``SegmenterWeightsMissing`` if no such file exists;
    never downloads.
    """
    spec = cellpose_default_model() if weights is None else os.fspath(weights)
    if _looks_like_path(spec) or Path(spec).is_absolute():
        path = Path(spec).expanduser()
        if path.is_file():
            return path.resolve()
        raise SegmenterWeightsMissing(_missing_message(spec, [path]))
    candidates = [d / spec for d in cellpose_model_dirs()]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise SegmenterWeightsMissing(_missing_message(spec, candidates))


@contextlib.contextmanager
def _downloads_forbidden() -> Iterator[None]:
    """Make cellpose's download hook raise while a model is built (belt and braces: we pass a local file)."""
    models = _cellpose_models()
    original = models.cache_model_path

    def refuse(name: str) -> str:
        raise SegmenterWeightsMissing(
            f"cellpose tried to fetch model {name!r}; downloads are disabled in reddino.data.segment"
        )

    models.cache_model_path = refuse
    try:
        yield
    finally:
        models.cache_model_path = original


class CellposeSegmenter:
    """Cellpose (4.x, Cellpose-SAM) from a local weights file; never downloads.

    * ``weights``: a file path, or a model name (e.g. cellpose's default ``cpsam_v2``) looked up only
      in the local model dirs (``cellpose_model_dirs``); ``None`` = cellpose's default name.
    * ``diameter``: expected cell diameter in px (cellpose rescales cells to ~30 px); ``None`` = no rescale.
    * ``gpu``: use CUDA/MPS when available; ``batch_size``: 256x256 tiles per forward pass.
    * ``flow_threshold`` / ``cellprob_threshold`` / ``min_size``: cellpose's mask post-processing.
    * ``use_bfloat16``: run the network in bfloat16 (cellpose's default; also about 2x faster on CPU).
    """

    name = "cellpose"

    def __init__(
        self,
        *,
        weights: str | os.PathLike[str] | None,
        diameter: float | None,
        gpu: bool,
        batch_size: int,
        flow_threshold: float,
        cellprob_threshold: float,
        min_size: int,
        use_bfloat16: bool,
    ) -> None:
        self.weights = resolve_cellpose_weights(weights)
        self.diameter = None if diameter is None else float(diameter)
        self.gpu = bool(gpu)
        self.batch_size = int(batch_size)
        self.flow_threshold = float(flow_threshold)
        self.cellprob_threshold = float(cellprob_threshold)
        self.min_size = int(min_size)
        self.use_bfloat16 = bool(use_bfloat16)
        self.selection_note: str | None = None
        models = _cellpose_models()
        with _downloads_forbidden():
            self.model = models.CellposeModel(
                gpu=self.gpu, pretrained_model=str(self.weights), use_bfloat16=self.use_bfloat16
            )

    def describe(self) -> dict[str, Any]:
        """Name, weights file and parameters, for the preparation report."""
        keys = (
            "diameter",
            "gpu",
            "batch_size",
            "flow_threshold",
            "cellprob_threshold",
            "min_size",
            "use_bfloat16",
        )
        return {
            "backend": self.name,
            "weights": str(self.weights),
            "device": str(self.model.device),
            **{k: getattr(self, k) for k in keys},
            "selection_note": self.selection_note,
        }

    def segment(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) int32 labels from ``CellposeModel.eval``."""
        _check_rgb(image)
        masks, _flows, _styles = self.model.eval(
            image,
            channel_axis=-1,
            diameter=self.diameter,
            batch_size=self.batch_size,
            flow_threshold=self.flow_threshold,
            cellprob_threshold=self.cellprob_threshold,
            min_size=self.min_size,
        )
        masks = np.asarray(masks)
        if masks.shape != image.shape[:2]:  # cellpose squeezes; a 1-pixel-high image would lose an axis
            masks = masks.reshape(image.shape[:2])
        return masks.astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------


def _construct(cls: type, options: Mapping[str, Any]) -> Any:
    """``cls(**options)`` with a message that names the backend and the unknown / missing keys."""
    params = {k for k in inspect.signature(cls.__init__).parameters if k != "self"}
    given = set(options)
    unknown, missing = sorted(given - params), sorted(params - given)
    if unknown or missing:
        raise ValueError(f"{cls.name} segmenter options: unknown {unknown}, missing {missing}")
    return cls(**dict(options))


def build_segmenter(backend: str, cellpose: Mapping[str, Any], classical: Mapping[str, Any]) -> Segmenter:
    """Build the backend named by ``backend`` (one of ``BACKENDS``) from its option mapping.

    ``auto`` picks Cellpose when its weights file is already on disk (and cellpose imports), otherwise
    the classical backend, logging a WARNING that names the missing file. The chosen backend is
    ``result.name``; for ``auto`` the reason is also in ``result.selection_note``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"segmentation backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "classical":
        return _construct(ClassicalSegmenter, classical)
    if backend == "cellpose":
        return _construct(CellposeSegmenter, cellpose)
    try:
        weights = resolve_cellpose_weights(cellpose.get("weights"))
    except (SegmenterWeightsMissing, ImportError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning(
            "segmentation backend 'auto': cellpose unavailable (%s); using the classical backend", exc
        )
        chosen = _construct(ClassicalSegmenter, classical)
        chosen.selection_note = f"auto: cellpose unavailable ({first_line}), fell back to classical"
        return chosen
    chosen = _construct(CellposeSegmenter, cellpose)
    chosen.selection_note = f"auto: cellpose weights found at {weights}"
    return chosen


# --------------------------------------------------------------------------------------------------
# Measurements on a label mask
# --------------------------------------------------------------------------------------------------

BOX_COLUMNS = ("x0", "y0", "x1", "y1", "cx", "cy", "area")


def label_boxes(mask: np.ndarray) -> pd.DataFrame:
    """One row per cell (index = label): bounding box (x1, y1 exclusive), centroid (x, y) and area in px."""
    if mask.ndim != 2:
        raise ValueError(f"label mask must be 2-D, got shape {mask.shape}")
    props = measure.regionprops_table(mask.astype(np.int32), properties=("label", "bbox", "centroid", "area"))
    frame = pd.DataFrame(
        {
            "x0": props["bbox-1"],
            "y0": props["bbox-0"],
            "x1": props["bbox-3"],
            "y1": props["bbox-2"],
            "cx": props["centroid-1"],
            "cy": props["centroid-0"],
            "area": props["area"],
        },
        index=pd.Index(props["label"], name="label"),
    )
    int_cols = ["x0", "y0", "x1", "y1", "area"]
    frame[int_cols] = frame[int_cols].astype(np.int64)
    return frame[list(BOX_COLUMNS)]


def match_centres(mask: np.ndarray, points: np.ndarray) -> dict[str, float | int]:
    """Score a label mask against labelled cell centres (N, 2) as (x, y) pixel coordinates.

    Each point is rounded to the nearest pixel. Points outside the image are counted in
    ``points_outside`` and left out of everything else. For the remaining ``points``:

    * a point is *recovered* when the label at its pixel is non-zero AND that cell contains no other
      labelled point -- i.e. it is covered by exactly one detected cell that holds only this point;
    * ``recall`` = recovered / points (NaN when there are no points);
    * ``precision`` = detected cells containing at least one point / detected cells (NaN when no cells);
    * ``merged_cells`` = detected cells containing more than one point (two cells segmented as one);
    * ``points_in_background`` = points on label 0 (missed cells).

    With partially labelled images (Chula labels only some cells of a smear) precision is a lower
    bound: a correct cell around an unlabelled point counts as a false detection.
    """
    if mask.ndim != 2:
        raise ValueError(f"label mask must be 2-D, got shape {mask.shape}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    xy = np.rint(pts).astype(np.int64)
    h, w = mask.shape
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    xy = xy[inside]
    hit = mask[xy[:, 1], xy[:, 0]].astype(np.int64)
    cell_ids = np.unique(mask)
    cell_ids = cell_ids[cell_ids != 0]
    per_cell = np.bincount(hit, minlength=int(mask.max()) + 1)
    per_cell[0] = 0
    recovered = int(np.count_nonzero((hit > 0) & (per_cell[hit] == 1)))
    n_points, n_cells = len(xy), len(cell_ids)
    with_point = int(np.count_nonzero(per_cell >= 1))
    return {
        "recall": recovered / n_points if n_points else float("nan"),
        "precision": with_point / n_cells if n_cells else float("nan"),
        "points": n_points,
        "points_outside": int(np.count_nonzero(~inside)),
        "points_in_background": int(np.count_nonzero(hit == 0)),
        "recovered": recovered,
        "cells": n_cells,
        "cells_with_point": with_point,
        "merged_cells": int(np.count_nonzero(per_cell >= 2)),
    }


SEGMENTATION_STATS = (
    "segmented_cells",
    "cell_diameter_px",
    "cell_area_p10",
    "cell_area_median",
    "cell_area_p90",
    "foreground_covered",
)
LOW_COVERAGE = 0.5  # accepted cells covering less of the stained foreground than this: warn


def segmentation_stats(labels: np.ndarray, stained: np.ndarray) -> dict[str, float]:
    """What one image's segmentation found, for the report: cell count, estimated diameter, the size
    distribution, and the fraction of stained pixels inside accepted cells (low when cells were split,
    dropped as too small or too large, or merged into rejected clumps)."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0].astype(np.float64)
    stain = int(np.count_nonzero(stained))
    diameter = estimate_cell_diameter(stained)
    return {
        "segmented_cells": float(len(areas)),
        "cell_diameter_px": float("nan") if diameter is None else diameter,
        "cell_area_p10": float(np.percentile(areas, 10)) if len(areas) else float("nan"),
        "cell_area_median": float(np.median(areas)) if len(areas) else float("nan"),
        "cell_area_p90": float(np.percentile(areas, 90)) if len(areas) else float("nan"),
        "foreground_covered": float(np.count_nonzero(stained & (labels > 0)) / stain)
        if stain
        else float("nan"),
    }


class LazySegmenter:
    """``image -> label_boxes`` with the segmenter built on first use: sources with annotations never
    pay for (or need) it. Counts the seconds spent and the cells found (cells/s in reports). The boxes
    carry ``attrs["segmentation"]`` (``segmentation_stats``), measured against the classical stain mask
    whatever the backend.

    ``settings``: ``backend``, ``cellpose`` and ``classical`` as in the
    ``segmentation`` section of ``conf/unit_cutting/``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = settings
        self.segmenter: Segmenter | None = None
        self.stain: ClassicalSegmenter | None = None
        self.seconds = 0.0
        self.cells = 0

    @property
    def name(self) -> str | None:
        return None if self.segmenter is None else self.segmenter.name

    def __call__(self, rgb: np.ndarray) -> pd.DataFrame:
        if self.segmenter is None:
            s = self.settings
            self.segmenter = build_segmenter(s["backend"], s["cellpose"], s["classical"])
            self.stain = _construct(ClassicalSegmenter, s["classical"])
            log.info("cell segmentation backend: %s", self.segmenter.name)
        t0 = time.perf_counter()
        labels = self.segmenter.segment(rgb)
        boxes = label_boxes(labels)
        self.seconds += time.perf_counter() - t0
        self.cells += len(boxes)
        assert self.stain is not None
        boxes.attrs["segmentation"] = segmentation_stats(labels, self.stain.stained(rgb))
        return boxes
