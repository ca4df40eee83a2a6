"""Classical morphometric features of a single-cell crop: the baseline a foundation model must beat.

Haematologists grade RBCs by size, shape (elongation, spiculation) and central pallor; a linear probe on
these few numbers is the floor for any learned embedding. The crop is segmented classically: grey
level, Otsu threshold (polarity chosen so the crop border is background), holes filled (the pale centre
of a normal RBC can fall above the threshold), then the connected component containing, or else
nearest to, the crop centre.

Feature order is ``MORPHOMETRIC_NAMES``. Lengths are in pixels, areas in pixels^2, intensities in
[0, 1]. When no cell is found (flat crop, nothing but noise) every feature is a finite default and
``found`` is 0, so the table can go straight into a probe.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.measure import regionprops

_CHANNELS = ("r", "g", "b")
MORPHOMETRIC_NAMES: tuple[str, ...] = (
    "found",  # 1 when a cell was segmented, else 0 (all shape features are then defaults)
    "area",
    "perimeter",
    "eccentricity",  # 0 for a circle, sqrt(1 - (b/a)^2) for an ellipse with axes a >= b
    "solidity",  # area / convex-hull area
    "major_axis",
    "minor_axis",
    "circularity",  # 4 pi area / perimeter^2 (about 1 for a disc, lower for irregular outlines)
    "pallor_ratio",  # mean grey of the inner third of the radius / mean grey of the outer third
    "hole_fraction",  # share of the filled cell that thresholding left out (the pale centre, unfilled mask)
    "centre_offset",  # distance from the cell centroid to the crop centre
    *(f"cell_mean_{c}" for c in _CHANNELS),
    *(f"cell_std_{c}" for c in _CHANNELS),
    *(f"bg_mean_{c}" for c in _CHANNELS),
    *(f"bg_std_{c}" for c in _CHANNELS),
)
_GREY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # ITU-R 709, as skimage.rgb2gray
MIN_CONTRAST = 0.03  # grey range below which a crop is considered empty (flat background)
MIN_AREA_FRACTION = 0.005  # components smaller than this share of the crop are noise


def _segment(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(filled mask of the central cell, its unfilled mask, filled mask of all objects) or None."""
    if float(grey.max() - grey.min()) < MIN_CONTRAST:
        return None
    threshold = threshold_otsu(grey)
    dark = grey < threshold
    border = np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]])
    foreground = ~dark if border.mean() > 0.5 else dark  # the border is mostly background
    filled = ndi.binary_fill_holes(foreground)
    labels, n = ndi.label(filled)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    valid = sizes >= max(1, MIN_AREA_FRACTION * grey.size)
    if not valid.any():
        return None
    cy, cx = (grey.shape[0] - 1) / 2, (grey.shape[1] - 1) / 2
    centre_label = labels[grey.shape[0] // 2, grey.shape[1] // 2]
    if not valid[centre_label]:
        ys, xs = np.nonzero(valid[labels])
        nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
        centre_label = labels[ys[nearest], xs[nearest]]
    cell = labels == centre_label
    return cell, foreground & cell, filled


def _pallor_ratio(grey: np.ndarray, cell: np.ndarray) -> float:
    """Inner-third vs outer-third mean grey, by distance to the cell boundary (works for ellipses too)."""
    depth = ndi.distance_transform_edt(cell)
    deepest = depth.max()
    inner = depth > 2 * deepest / 3
    rim = cell & (depth <= deepest / 3)
    if not inner.any() or not rim.any():
        return 1.0
    rim_mean = float(grey[rim].mean())
    return float(grey[inner].mean()) / rim_mean if rim_mean > 1e-6 else 1.0


def _colour_stats(pixels: np.ndarray) -> np.ndarray:
    """Per-channel mean then std of an (n, 3) array in [0, 1]; zeros when empty."""
    if len(pixels) == 0:
        return np.zeros(6, dtype=np.float64)
    pixels = pixels.astype(np.float64)
    return np.concatenate([pixels.mean(axis=0), pixels.std(axis=0)])


def morphometric_features(crop: np.ndarray) -> np.ndarray:
    """The ``MORPHOMETRIC_NAMES`` features (float64) of the cell nearest the centre of an RGB uint8 crop."""
    if crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB crop, got shape {crop.shape}")
    rgb = crop.astype(np.float32) / 255.0
    grey = rgb @ _GREY_WEIGHTS
    out = np.zeros(len(MORPHOMETRIC_NAMES), dtype=np.float64)
    out[MORPHOMETRIC_NAMES.index("pallor_ratio")] = 1.0
    bg_start = MORPHOMETRIC_NAMES.index("bg_mean_r")
    segmented = _segment(grey)
    if segmented is None:
        out[bg_start:] = _colour_stats(rgb.reshape(-1, 3))
        return out
    cell, raw, objects = segmented
    props = regionprops(cell.astype(np.uint8))[0]
    area, perimeter = float(props.area), float(props.perimeter)
    cy, cx = props.centroid
    out[:11] = (
        1.0,
        area,
        perimeter,
        props.eccentricity,
        props.solidity,
        props.axis_major_length,
        props.axis_minor_length,
        4 * np.pi * area / perimeter**2 if perimeter > 0 else 0.0,
        _pallor_ratio(grey, cell),
        1.0 - raw.sum() / area,
        np.hypot(cy - (crop.shape[0] - 1) / 2, cx - (crop.shape[1] - 1) / 2),
    )
    out[11:bg_start] = _colour_stats(rgb[cell])
    out[bg_start:] = _colour_stats(rgb[~objects])
    return out
