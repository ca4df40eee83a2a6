"""Image reading that fails with the file's name and the problem, never with a bare decoder error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """An image that cannot be used as RGB microscopy input; the message names the file and why."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array.

    Grayscale is replicated to 3 channels, RGBA drops alpha, 16-bit is rescaled to 8 bits by its range.
    Anything undecodable raises ``BadImageError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb_uint8(np.asarray(im), path)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadImageError(f"{path}: cannot decode image ({exc})") from exc


def to_rgb_uint8(array: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """Normalise bit depth and channel count of a decoded image to (H, W, 3) uint8."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise BadImageError(f"{path}: unexpected image shape {array.shape}")
    if array.dtype != np.uint8:
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        else:
            a = array.astype(np.float64)
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
            array = np.round(a).astype(np.uint8)
    channels = array.shape[2]
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 2:  # grey + alpha
        array = np.repeat(array[..., :1], 3, axis=2)
    elif channels == 4:
        array = array[..., :3]
    elif channels != 3:
        raise BadImageError(f"{path}: {channels} channels; expected 1, 3 or 4")
    return np.ascontiguousarray(array)
