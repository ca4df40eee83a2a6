"""Geometry of training units: non-overlapping tiles of a smear and square crops around cells."""

from __future__ import annotations

import numpy as np


def tile_boxes(width: int, height: int, size: int) -> np.ndarray:
    """Non-overlapping ``size`` x ``size`` tiles covering the image from its top-left corner.

    Returns (n, 4) int boxes (x0, y0, x1, y1), x1/y1 exclusive. Partial tiles at the right and bottom
    edges are dropped (a smear smaller than one tile yields none).
    """
    if size <= 0:
        raise ValueError(f"tile size must be positive, got {size}")
    xs = np.arange(0, width - size + 1, size)
    ys = np.arange(0, height - size + 1, size)
    gx, gy = np.meshgrid(xs, ys)
    x0, y0 = gx.ravel(), gy.ravel()
    return np.stack([x0, y0, x0 + size, y0 + size], axis=1).astype(np.int64)


def square_boxes(cx: np.ndarray, cy: np.ndarray, side: np.ndarray | float) -> np.ndarray:
    """Square boxes of ``side`` pixels centred on (cx, cy); they may extend past the image (crop pads).

    Every box contains the pixel its centre falls in, so a centre inside the image gives a box that
    overlaps it however small the side: a 1-px sliver of a cell cut by the smear's edge (centre 0.5)
    with a 1.2x context would otherwise round to a box wholly outside the image.
    """
    side = np.broadcast_to(np.asarray(side, dtype=np.float64), np.shape(cx))
    s = np.maximum(np.round(side).astype(np.int64), 1)
    corners = []
    for c in (np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)):
        centre_pixel = np.floor(c).astype(np.int64)
        corners.append(np.clip(np.floor(c - side / 2.0).astype(np.int64), centre_pixel - s + 1, centre_pixel))
    x0, y0 = corners
    return np.stack([x0, y0, x0 + s, y0 + s], axis=1)


def crop_padded(image: np.ndarray, box: tuple[int, int, int, int] | np.ndarray) -> np.ndarray:
    """Crop (x0, y0, x1, y1) from an (H, W, C) image, replicating edge pixels where the box leaves it."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {box}")
    h, w = image.shape[:2]
    inside = image[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)]
    if inside.size == 0:
        raise ValueError(f"box {box} lies outside the image of size {w}x{h}")
    pad = ((max(-y0, 0), max(y1 - h, 0)), (max(-x0, 0), max(x1 - w, 0))) + ((0, 0),) * (image.ndim - 2)
    return np.pad(inside, pad, mode="edge") if any(p for pair in pad for p in pair) else inside


def foreground_fraction(
    image: np.ndarray, boxes: np.ndarray, background_percentile: float, contrast: float
) -> np.ndarray:
    """Fraction of each box's pixels darker than the smear's background by more than ``contrast``.

    Brightfield smears are bright where there is no cell; the background level is the
    ``background_percentile`` of the whole image's grey values (robust to how full the smear is), so
    an empty or out-of-smear tile scores near 0 whatever the lamp brightness.
    """
    grey = image.astype(np.float32).mean(axis=2)
    background = float(np.percentile(grey, background_percentile))
    dark = grey < background - contrast
    # integral image: every box's count in O(1)
    integral = np.pad(dark.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0, y0, x1, y1 = (boxes[:, k] for k in range(4))
    counts = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return counts / np.maximum((x1 - x0) * (y1 - y0), 1)
