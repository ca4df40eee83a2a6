"""Morphometric baseline on drawn cells: shape, size, pallor and colour come out as geometry says."""

from __future__ import annotations

import numpy as np
import pytest

from reddino.eval.morphometrics import MORPHOMETRIC_NAMES, morphometric_features

CELL, PALE, BACKGROUND = (190, 90, 100), (215, 170, 175), (235, 225, 230)


def draw(a: float, b: float | None = None, pale: float = 0.0, size: int = 80, centre=None) -> np.ndarray:
    """An RGB crop with one ellipse (semi-axes a along x, b along y), optionally a pale centre."""
    b = a if b is None else b
    cy, cx = ((size - 1) / 2, (size - 1) / 2) if centre is None else centre
    yy, xx = np.mgrid[:size, :size]
    rho = np.sqrt(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    img[rho <= 1] = CELL
    if pale:
        img[rho <= pale] = PALE
    return img


def feats(crop: np.ndarray) -> dict[str, float]:
    return dict(zip(MORPHOMETRIC_NAMES, morphometric_features(crop), strict=True))


def test_names_match_vector_length_and_are_unique():
    f = morphometric_features(draw(15))
    assert f.shape == (len(MORPHOMETRIC_NAMES),) == (23,)
    assert len(set(MORPHOMETRIC_NAMES)) == len(MORPHOMETRIC_NAMES)
    assert f.dtype == np.float64


def test_circle_shape():
    f = feats(draw(20))
    assert f["found"] == 1.0
    assert f["eccentricity"] == pytest.approx(0.0, abs=0.02)
    assert f["area"] == pytest.approx(np.pi * 20**2, rel=0.02)
    assert f["major_axis"] == pytest.approx(40, rel=0.02)
    assert f["minor_axis"] == pytest.approx(40, rel=0.02)
    assert f["solidity"] > 0.95
    assert 0.9 < f["circularity"] < 1.05
    assert f["centre_offset"] < 0.5


def test_two_to_one_ellipse_eccentricity():
    f = feats(draw(24, 12))
    assert f["eccentricity"] == pytest.approx(np.sqrt(3) / 2, abs=0.01)  # 0.866
    assert f["major_axis"] / f["minor_axis"] == pytest.approx(2.0, rel=0.03)
    assert f["circularity"] < feats(draw(20))["circularity"] - 0.1


def test_area_scales_with_radius_squared():
    areas = [feats(draw(r))["area"] for r in (8, 16, 32)]
    assert areas[1] / areas[0] == pytest.approx(4.0, rel=0.05)
    assert areas[2] / areas[1] == pytest.approx(4.0, rel=0.03)


def test_pale_centre_raises_pallor_and_keeps_the_outline():
    plain, pale = feats(draw(20)), feats(draw(20, pale=0.4))
    assert plain["pallor_ratio"] == pytest.approx(1.0)
    assert plain["hole_fraction"] == 0.0
    assert pale["pallor_ratio"] > 1.4  # the grey of the pale colour over the cell colour, about 1.6
    assert pale["hole_fraction"] == pytest.approx(0.4**2, abs=0.03)  # the pale disc falls above Otsu
    assert pale["area"] == plain["area"]  # holes are filled before measuring


def test_colour_statistics_inside_and_outside():
    f = feats(draw(20))
    np.testing.assert_allclose([f["cell_mean_r"], f["cell_mean_g"], f["cell_mean_b"]], np.array(CELL) / 255)
    np.testing.assert_allclose([f["bg_mean_r"], f["bg_mean_g"], f["bg_mean_b"]], np.array(BACKGROUND) / 255)
    assert f["cell_std_g"] == 0.0
    assert f["bg_std_r"] == 0.0


def test_picks_the_cell_nearest_the_centre():
    crop = draw(6, centre=(12, 12))  # a small cell in a corner
    crop[np.hypot(*(np.mgrid[:80, :80] - np.array([44, 46])[:, None, None])) <= 12] = CELL  # off-centre
    f = feats(crop)
    assert f["area"] == pytest.approx(np.pi * 12**2, rel=0.05)
    assert f["centre_offset"] == pytest.approx(np.hypot(44 - 39.5, 46 - 39.5), abs=0.3)


def test_bright_cells_on_dark_background_are_found_too():
    f = feats(255 - draw(20))
    assert f["found"] == 1.0
    assert f["area"] == pytest.approx(np.pi * 20**2, rel=0.02)


@pytest.mark.parametrize("crop", [np.full((80, 80, 3), 200, np.uint8), np.zeros((80, 80, 3), np.uint8)])
def test_empty_crop_gives_finite_defaults(crop):
    f = morphometric_features(crop)
    assert np.isfinite(f).all()
    named = dict(zip(MORPHOMETRIC_NAMES, f, strict=True))
    assert named["found"] == 0.0
    assert named["area"] == 0.0
    assert named["pallor_ratio"] == 1.0
    assert named["bg_mean_r"] == pytest.approx(crop[0, 0, 0] / 255)


def test_noise_only_crop_is_finite():
    rng = np.random.default_rng(0)
    assert np.isfinite(morphometric_features(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))).all()


def test_rejects_grey_crops():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        morphometric_features(np.zeros((80, 80), np.uint8))
