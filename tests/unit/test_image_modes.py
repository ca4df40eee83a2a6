"""Every image mode decodes to the colours it shows, upright: one test per mode against a reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reddino.data.io import read_rgb, upright_size
from reddino.data.sources.parsers import read_header


def reference(width: int = 48, height: int = 32) -> Image.Image:
    """A colourful RGB image whose channels differ everywhere (a swapped or inverted channel shows)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([40 + 4 * x, 30 + 5 * y, 200 - 2 * x - y], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def save(im: Image.Image, path: Path, **kwargs) -> Path:
    im.save(path, **kwargs)
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_is_converted_not_read_as_rgb(tmp_path, suffix):
    ref = reference()
    path = save(ref.convert("CMYK"), tmp_path / f"cmyk{suffix}", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = read_rgb(path)
    assert out.shape == (32, 48, 3)
    assert mean_error(out, np.asarray(ref)) < 4  # inverted CMY read as RGB would be ~100 away


def test_palette_png_gives_its_palette_colours(tmp_path):
    paletted = reference().quantize(colors=32)
    path = save(paletted, tmp_path / "palette.png")
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_rgb(path), np.asarray(paletted.convert("RGB")))


def test_palette_png_with_transparency(tmp_path):
    paletted = reference().quantize(colors=16)
    path = save(paletted, tmp_path / "palette_t.png", transparency=0)
    assert "transparency" in Image.open(path).info
    np.testing.assert_array_equal(read_rgb(path), np.asarray(paletted.convert("RGBA"))[..., :3])


@pytest.mark.parametrize("mode", ["L", "LA", "1", "RGBA", "I;16", "LAB"])
def test_other_modes_match_pillows_rendering(tmp_path, mode):
    ref = reference()
    if mode == "I;16":
        grey = (np.asarray(ref.convert("L")).astype(np.uint16) * 200).astype(np.uint16)
        im = Image.fromarray(grey)
    elif mode == "LAB":
        im = ref.convert("LAB")
    else:
        im = ref.convert(mode)
    path = save(im, tmp_path / ("x.tif" if mode == "LAB" else "x.png"))
    assert Image.open(path).mode == mode
    out = read_rgb(path)
    if mode == "I;16":  # full range rescaled to 8 bits, the same image as the 8-bit grey
        grey = np.asarray(ref.convert("L")).astype(np.float64)
        expected = np.round((grey - grey.min()) / (grey.max() - grey.min()) * 255).astype(np.uint8)
        np.testing.assert_array_equal(out[..., 0], expected)
    elif mode == "LAB":
        assert mean_error(out, np.asarray(ref)) < 4
    else:
        np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))


def test_exif_orientation_is_applied_and_sizes_agree(tmp_path):
    ref = reference(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    path = save(ref, tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = read_rgb(path)
    assert out.shape == (48, 32, 3)
    assert mean_error(out, np.asarray(ref.transpose(Image.Transpose.ROTATE_270))) < 4
    with Image.open(path) as im:
        assert upright_size(im) == (32, 48)
    assert read_header(path)[:2] == (32, 48)
