"""Image reading that fails with the file's name and the problem, never with a bare decoder error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadImageError(ValueError):
    """An image that cannot be used as RGB microscopy input; the message names the file and why."""


# Modes whose values are not display colours: converted by Pillow's own colour transforms.
# Integer/float grey (16-bit TIFF, "I", "F") keeps its full range and is rescaled in ``to_rgb_uint8``.
HIGH_DEPTH_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees
EXIF_ORIENTATION = 0x0112


def pil_to_rgb(im: Image.Image) -> Image.Image:
    """``im`` upright (EXIF orientation applied) in RGB, or in a high-depth grey mode.

    Each mode is converted for what its values mean: CMYK and YCbCr/LAB/HSV through Pillow's colour
    conversion (not read as RGB), palette images through their palette (with transparency dropped), 1-bit
    and LA to grey. Reading the raw array instead gives inverted CMYK colours and grey palette indices.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in HIGH_DEPTH_GREY or im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBa", "La", "PA"):
        im = im.convert("RGBA")
    return im.convert("RGB")


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array, upright as its EXIF orientation says.

    Every Pillow mode is converted by what it means (``pil_to_rgb``); 16-bit and float grey are rescaled
    to 8 bits by their range. Anything undecodable raises ``BadImageError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb_uint8(np.asarray(pil_to_rgb(im)), path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, BadImageError):
            raise
        raise BadImageError(f"{path}: cannot decode image ({exc})") from exc


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of ``im`` after its EXIF orientation, read from the header only."""
    width, height = im.size
    orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    return (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)


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
