"""Procedural blood-smear generator: the embedded default dataset (no download needed).

Why it exists: ``make pretrain`` must run with nothing on disk, and its closing k-NN report must
mean something. So the smears carry the two signals the real task has:

* morphology (the label): nine RBC classes that differ only by SHAPE and internal density profile
  (pallor, target ring, slit, spicules, fragments, tail, crescent);
* batch effects (the nuisance): "sources" that differ like labs do (stain absorbance, background
  tint, illumination, defocus, noise, JPEG quality, magnification, smear thickness), with slides
  ("subjects") that have their own class mix and a small stain jitter.

Rendering is physical enough to look right: each object is an optical-density map on its own local
grid (a polar radius function r(theta) for the outline, a radial thickness profile inside), densities
add (Beer-Lambert, so overlaps darken), and the transmitted image is
``background * illumination * exp(-OD @ absorbance)``, then blurred, noised, quantised and JPEG-encoded.

Every smear is drawn from ``np.random.default_rng([seed, 2, source, subject, smear])``: the output
does not depend on generation order. ``ensure_synthetic_dataset`` caches the result under a key that
hashes every parameter plus ``GENERATOR_VERSION`` and publishes it with one atomic rename.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image

log = logging.getLogger(__name__)

# Bump whenever a change alters any output byte: it is part of the cache key.
GENERATOR_VERSION = 1

RBC_CLASSES: tuple[str, ...] = (
    "discocyte",
    "spherocyte",
    "elliptocyte",
    "target",
    "stomatocyte",
    "echinocyte",
    "schistocyte",
    "dacrocyte",
    "sickle",
)
DISTRACTOR_CLASSES: tuple[str, ...] = ("wbc", "platelet")

# Generator design constants (part of the generator definition, so covered by GENERATOR_VERSION and
# written to meta.json). Distractor counts are Poisson means per 384 x 384 field, scaled by area.
WBC_PER_FIELD = 0.6
PLATELETS_PER_FIELD = 5.0
_FIELD_AREA = 384 * 384
_PLACEMENT_CANDIDATES = 48  # candidate positions tried at once per object
_PLACEMENT_ROUNDS = 3  # batches of candidates before an object is dropped (field is full)


@dataclass(frozen=True)
class SourceStyle:
    """One lab: stain chemistry, microscope optics, camera and smear technique.

    Absorbances are RGB optical densities per unit of stained material, so their ratio sets the hue
    and their magnitude the saturation. Cell sizes are in pixels (magnification x camera pitch).
    """

    name: str
    hb_absorbance: tuple[float, float, float]  # haemoglobin (RBC body), OD per unit thickness
    nucleus_absorbance: tuple[float, float, float]  # nuclear stain: WBC nuclei and platelets
    cytoplasm_absorbance: tuple[float, float, float]  # WBC cytoplasm
    background_rgb: tuple[float, float, float]  # transmitted light through empty glass, 0..1
    vignetting: float  # fractional brightness loss in the image corners
    illumination_gradient: float  # peak fractional brightness change of a linear tilt across the field
    background_mottle: float  # OD amplitude of low-frequency plasma/background unevenness
    blur_sigma: float  # defocus, Gaussian sigma in px
    noise_sigma: float  # sensor noise std at full brightness (scales with sqrt of the signal)
    jpeg_quality: int  # JPEG quality the camera software saves with
    cell_diameter_px: float  # mean normal RBC diameter in px (magnification)
    diameter_cv: float  # cell-to-cell diameter variation (coefficient of variation)
    max_overlap: float  # max pairwise penetration, fraction of the smaller radius (smear thickness)
    clump_prob: float  # probability that a cell is placed against an already placed one
    subject_stain_jitter: float  # log-sd of per-slide stain/background variation


@dataclass(frozen=True)
class SmearSample:
    """One rendered field of view.

    ``image`` is exactly what ``jpeg`` decodes to with PIL (what a data loader will see);
    ``instances`` is 0 for background and ``cells[i]["id"]`` for the visible (topmost) pixels of object i.
    Cell dict keys: id, label, x0, y0, x1, y1 (amodal box clipped to the image, x1/y1 exclusive),
    cx, cy (centroid of the amodal in-image mask, continuous pixel coordinates), touches_border (the
    object is cut by the image edge), overlap_fraction (share of its in-image area also covered by others).
    """

    image: np.ndarray
    instances: np.ndarray
    cells: list[dict[str, Any]]
    jpeg: bytes


def default_sources() -> tuple[SourceStyle, ...]:
    """Five labs spanning stain hue/strength, optics and magnification (24-40 px cells)."""
    return (
        SourceStyle(  # classic Wright-Giemsa, salmon-pink cells, neutral background
            name="src0",
            hb_absorbance=(0.16, 0.70, 0.62),
            nucleus_absorbance=(0.95, 1.35, 0.50),
            cytoplasm_absorbance=(0.16, 0.16, 0.05),
            background_rgb=(0.93, 0.92, 0.90),
            vignetting=0.10,
            illumination_gradient=0.04,
            background_mottle=0.03,
            blur_sigma=0.7,
            noise_sigma=0.012,
            jpeg_quality=92,
            cell_diameter_px=32.0,
            diameter_cv=0.07,
            max_overlap=0.22,
            clump_prob=0.35,
            subject_stain_jitter=0.06,
        ),
        SourceStyle(  # May-Gruenwald-like: orange-red cells, warm yellowish lamp, low magnification
            name="src1",
            hb_absorbance=(0.09, 0.56, 0.88),
            nucleus_absorbance=(1.05, 1.20, 0.42),
            cytoplasm_absorbance=(0.20, 0.14, 0.04),
            background_rgb=(0.96, 0.92, 0.80),
            vignetting=0.18,
            illumination_gradient=0.06,
            background_mottle=0.04,
            blur_sigma=1.0,
            noise_sigma=0.02,
            jpeg_quality=75,
            cell_diameter_px=26.0,
            diameter_cv=0.08,
            max_overlap=0.30,
            clump_prob=0.45,
            subject_stain_jitter=0.07,
        ),
        SourceStyle(  # purple-magenta cells, cool bluish background, high magnification, sharp
            name="src2",
            hb_absorbance=(0.34, 0.86, 0.40),
            nucleus_absorbance=(1.15, 1.40, 0.30),
            cytoplasm_absorbance=(0.18, 0.20, 0.04),
            background_rgb=(0.85, 0.88, 0.94),
            vignetting=0.25,
            illumination_gradient=0.03,
            background_mottle=0.02,
            blur_sigma=0.5,
            noise_sigma=0.008,
            jpeg_quality=95,
            cell_diameter_px=38.0,
            diameter_cv=0.06,
            max_overlap=0.15,
            clump_prob=0.25,
            subject_stain_jitter=0.05,
        ),
        SourceStyle(  # faded stain on a dim grey field, defocused, noisy, heavily compressed
            name="src3",
            hb_absorbance=(0.11, 0.42, 0.40),
            nucleus_absorbance=(0.70, 0.95, 0.40),
            cytoplasm_absorbance=(0.12, 0.12, 0.05),
            background_rgb=(0.78, 0.79, 0.80),
            vignetting=0.08,
            illumination_gradient=0.14,
            background_mottle=0.05,
            blur_sigma=1.5,
            noise_sigma=0.03,
            jpeg_quality=60,
            cell_diameter_px=29.0,
            diameter_cv=0.08,
            max_overlap=0.25,
            clump_prob=0.40,
            subject_stain_jitter=0.08,
        ),
        SourceStyle(  # saturated deep-red stain on a bright white field, thick smear
            name="src4",
            hb_absorbance=(0.14, 0.90, 0.72),
            nucleus_absorbance=(1.00, 1.50, 0.55),
            cytoplasm_absorbance=(0.15, 0.18, 0.06),
            background_rgb=(0.98, 0.97, 0.97),
            vignetting=0.05,
            illumination_gradient=0.08,
            background_mottle=0.03,
            blur_sigma=0.9,
            noise_sigma=0.015,
            jpeg_quality=85,
            cell_diameter_px=35.0,
            diameter_cv=0.07,
            max_overlap=0.35,
            clump_prob=0.55,
            subject_stain_jitter=0.06,
        ),
    )


def subject_style(style: SourceStyle, rng: np.random.Generator) -> SourceStyle:
    """A slide's own stain batch: absorbances and lamp tint jittered log-normally around the lab's."""
    j = style.subject_stain_jitter

    def jitter(values: tuple[float, float, float], scale: float) -> tuple[float, float, float]:
        factor = np.exp(rng.normal(0.0, scale) + rng.normal(0.0, scale / 2.0, size=3))
        return tuple(float(x) for x in np.asarray(values) * factor)

    background = np.clip(np.asarray(jitter(style.background_rgb, j / 3.0)), 0.05, 1.0)
    return replace(
        style,
        hb_absorbance=jitter(style.hb_absorbance, j),
        nucleus_absorbance=jitter(style.nucleus_absorbance, j),
        cytoplasm_absorbance=jitter(style.cytoplasm_absorbance, j),
        background_rgb=tuple(float(x) for x in background),
    )


def subject_class_probs(rng: np.random.Generator, dominant: int, concentration: float) -> np.ndarray:
    """A slide's class mix: Dirichlet with every class at ``concentration`` and the dominant one at
    ``concentration * (K - 1)``, so the dominant class holds half of the cells on average and
    ``concentration`` sets how much slides scatter around that mean (small = spiky mixes)."""
    k = len(RBC_CLASSES)
    alpha = np.full(k, concentration, dtype=np.float64)
    alpha[dominant] = concentration * (k - 1)
    return rng.dirichlet(alpha)


# --------------------------------------------------------------------------------------------------
# Object shapes. A sampler draws the parameters of one object and returns its footprint (``extent``
# bounds the local grid, ``pack_radius`` is used by the placement) and a renderer mapping local
# rotated coordinates (u, v) to (coverage, hb, nucleus, cytoplasm) densities.
# --------------------------------------------------------------------------------------------------

_Density = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]
_Renderer = Callable[[np.ndarray, np.ndarray], _Density]


@dataclass(frozen=True)
class _Object:
    label: str
    extent: float
    pack_radius: float
    render: _Renderer


def _coverage(e: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from the inside depth ``e`` (px): a one-pixel ramp across the outline."""
    return np.clip(e + 0.5, 0.0, 1.0)


def _rbc_density(e: np.ndarray, body: np.ndarray, rim: float) -> tuple[np.ndarray, np.ndarray, None, None]:
    """Haemoglobin density: the interior ``body`` profile rounded off at the edge plus a darker rim."""
    cov = _coverage(e)
    edge = np.clip(e / 2.5, 0.0, 1.0)
    hb = cov * (body * (0.45 + 0.55 * edge) + rim * np.exp(-(((e - 1.6) / 1.6) ** 2)))
    return cov, hb.astype(np.float32), None, None


def _pallor(sb: np.ndarray, radius: float, depth: float) -> np.ndarray:
    """Flat-topped central pallor of a biconcave disc (sb = radius normalised by the outline)."""
    return depth * np.exp(-((sb / radius) ** 4))


def _wobble(rng: np.random.Generator, amplitude: float) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth low-order outline irregularity, so no two cells are perfect geometric figures."""
    a2, a3 = (float(x) for x in rng.normal(0.0, amplitude, size=2))
    p2, p3 = (float(x) for x in rng.uniform(0.0, 2 * np.pi, size=2))
    return lambda th: 1.0 + a2 * np.cos(2 * th + p2) + a3 * np.cos(3 * th + p3)


def _discocyte(rng: np.random.Generator, r: float) -> _Object:
    """Normal biconcave disc: round, central pallor about a third of the diameter."""
    wob = _wobble(rng, 0.02)
    radius, depth = rng.uniform(0.36, 0.46), rng.uniform(0.5, 0.68)
    base, rim = rng.uniform(0.9, 1.05), rng.uniform(0.15, 0.3)

    def render(u, v):
        rho, th = np.hypot(u, v), np.arctan2(v, u)
        rr = r * wob(th)
        sb = rho / rr
        return _rbc_density(rr - rho, base * (1.0 - _pallor(sb, radius, depth)), rim)

    return _Object("discocyte", r * 1.08 + 2, r, render)


def _spherocyte(rng: np.random.Generator, r: float) -> _Object:
    """Small dense sphere: no pallor, slightly domed, sharp dark outline."""
    rs = r * rng.uniform(0.7, 0.8)
    wob = _wobble(rng, 0.015)
    base = rng.uniform(1.35, 1.55)

    def render(u, v):
        rho, th = np.hypot(u, v), np.arctan2(v, u)
        rr = rs * wob(th)
        sb = np.minimum(rho / rr, 1.0)
        return _rbc_density(rr - rho, base * (1.0 - 0.12 * sb**2), 0.1)

    return _Object("spherocyte", rs * 1.06 + 2, rs, render)


def _elliptocyte(rng: np.random.Generator, r: float) -> _Object:
    """Elliptocyte/ovalocyte: elongated outline (aspect 1.45-2.5), faint elongated pallor."""
    aspect = rng.uniform(1.45, 2.5)
    a, b = r * math.sqrt(aspect) * 0.98, r / math.sqrt(aspect) * 0.98
    depth, base = rng.uniform(0.2, 0.45), rng.uniform(0.95, 1.1)

    def render(u, v):
        rho, th = np.hypot(u, v), np.arctan2(v, u)
        rr = a * b / np.sqrt((b * np.cos(th)) ** 2 + (a * np.sin(th)) ** 2)
        sb = rho / rr
        return _rbc_density(rr - rho, base * (1.0 - _pallor(sb, 0.5, depth)), 0.2)

    return _Object("elliptocyte", a + 2, math.sqrt(a * b), render)


def _target(rng: np.random.Generator, r: float) -> _Object:
    """Target cell (codocyte): dense central spot inside a pale ring inside a dense rim."""
    rt = r * rng.uniform(1.0, 1.08)
    wob = _wobble(rng, 0.02)
    ring_at, ring_w = rng.uniform(0.45, 0.52), rng.uniform(0.11, 0.14)
    depth, base = rng.uniform(0.6, 0.75), rng.uniform(0.95, 1.1)

    def render(u, v):
        rho, th = np.hypot(u, v), np.arctan2(v, u)
        rr = rt * wob(th)
        sb = rho / rr
        ring = depth * np.exp(-(((sb - ring_at) / ring_w) ** 2))
        spot = 0.25 * np.exp(-((sb / 0.2) ** 2))
        return _rbc_density(rr - rho, base * (1.0 - ring + spot), 0.25)

    return _Object("target", rt * 1.08 + 2, rt, render)


def _stomatocyte(rng: np.random.Generator, r: float) -> _Object:
    """Stomatocyte: round cup with a mouth-like slit of pallor instead of a round one."""
    rs = r * rng.uniform(0.92, 1.0)
    wob = _wobble(rng, 0.02)
    half_len, half_w = rng.uniform(0.38, 0.5) * rs, rng.uniform(0.08, 0.12) * rs
    curve, depth, base = rng.uniform(-0.12, 0.12) * rs, rng.uniform(0.7, 0.85), rng.uniform(1.0, 1.15)

    def render(u, v):
        rho, th = np.hypot(u, v), np.arctan2(v, u)
        rr = rs * wob(th)
        across = (u - curve * (v / half_len) ** 2) / half_w
        slit = depth * np.exp(-(across**2) - (v / half_len) ** 4)
        return _rbc_density(rr - rho, base * (1.0 - slit), 0.2)

    return _Object("stomatocyte", rs * 1.08 + 2, rs, render)


def _echinocyte(rng: np.random.Generator, r: float) -> _Object:
    """Echinocyte/burr cell: 10-16 short regular spicules around a slightly smaller, denser disc."""
    k = int(rng.integers(10, 17))
    amp, sharp = rng.uniform(0.13, 0.2), rng.uniform(2.5, 4.0)
    re, phase = r * rng.uniform(0.88, 0.96), rng.uniform(0, 2 * np.pi)
    depth, base = rng.uniform(0.15, 0.35), rng.uniform(1.0, 1.15)

    def render(u, v):
        rho, th = np.hypot(u, v), np.arctan2(v, u)
        rr = re * (1.0 + amp * ((0.5 + 0.5 * np.cos(k * th + phase)) ** sharp))
        sb = rho / re
        return _rbc_density(rr - rho, base * (1.0 - _pallor(sb, 0.4, depth)), 0.2)

    return _Object("echinocyte", re * (1 + amp) + 2, re * (1 + amp / 2), render)


def _schistocyte(rng: np.random.Generator, r: float) -> _Object:
    """Schistocyte: a dense fragment with straight or concave cut edges and sharp corners.

    Three kinds: helmet (one concave bite that leaves two horns), triangle (three chords) and
    irregular fragment (two chords); all cut from a disc of 0.7-0.85 normal radius.
    """
    rd = r * rng.uniform(0.75, 0.9)
    kind = int(rng.integers(0, 3))
    base = rng.uniform(1.2, 1.4)
    if kind == 0:  # helmet: disc minus a large bite
        rb = rd * rng.uniform(0.9, 1.3)
        cut = rd * rng.uniform(-0.05, 0.25)
        bite = np.array([0.0, cut + rb], dtype=np.float32)
        chords: list[tuple[float, float]] = []
    elif kind == 1:  # triangle: three chords about 120 degrees apart
        start = rng.uniform(0, 2 * np.pi)
        chords = [
            (start + i * 2 * np.pi / 3 + rng.normal(0, 0.12), rd * rng.uniform(0.42, 0.55)) for i in range(3)
        ]
        bite = None
    else:  # irregular fragment: two chords
        start = rng.uniform(0, 2 * np.pi)
        chords = [
            (start, rd * rng.uniform(0.0, 0.3)),
            (start + rng.uniform(1.6, 2.4), rd * rng.uniform(0.1, 0.4)),
        ]
        bite = None

    def render(u, v):
        rho = np.hypot(u, v)
        e = rd - rho
        for angle, dist in chords:
            e = np.minimum(e, dist - (u * math.cos(angle) + v * math.sin(angle)))
        if bite is not None:
            e = np.minimum(e, np.hypot(u - bite[0], v - bite[1]) - rb)
        return _rbc_density(e, np.full_like(e, base), 0.12)

    return _Object("schistocyte", rd + 2, rd * 0.75, render)


def _dacrocyte(rng: np.random.Generator, r: float) -> _Object:
    """Dacrocyte/teardrop: a round body drawn out into one tapering tail."""
    rd = r * rng.uniform(0.85, 0.95)
    tail, power = rng.uniform(0.7, 1.2), rng.uniform(12.0, 28.0)
    depth, base = rng.uniform(0.3, 0.5), rng.uniform(1.0, 1.12)

    def render(u, v):
        rho, th = np.hypot(u, v), np.arctan2(v, u)
        rr = rd * (1.0 + tail * np.maximum(np.cos(th), 0.0) ** power)
        sb = rho / rd
        return _rbc_density(rr - rho, base * (1.0 - _pallor(sb, 0.4, depth)), 0.2)

    return _Object("dacrocyte", rd * (1 + tail) + 2, rd * (1 + tail / 4), render)


def _sickle(rng: np.random.Generator, r: float) -> _Object:
    """Sickle cell (drepanocyte): a dense elongated crescent with pointed ends."""
    stretch = rng.uniform(1.5, 1.85)
    r1 = r * rng.uniform(0.8, 0.9)
    r2, off = r1 * rng.uniform(1.0, 1.15), r1 * rng.uniform(0.75, 0.95)
    base = rng.uniform(1.2, 1.4)

    def render(u, v):
        us = u / stretch
        e = np.minimum(r1 - np.hypot(us, v), np.hypot(us, v - off) - r2)
        return _rbc_density(e, np.full_like(e, base), 0.1)

    return _Object("sickle", r1 * stretch + 2, r1 * 0.8, render)


def _wbc(rng: np.random.Generator, r: float) -> _Object:
    """White cell: pale cytoplasm around a purple nucleus (segmented, or one large round nucleus)."""
    segmented = rng.random() < 0.6
    rw = r * (rng.uniform(1.5, 1.9) if segmented else rng.uniform(1.15, 1.35))
    wob = _wobble(rng, 0.03)
    cyto_density = rng.uniform(0.6, 1.0)
    if segmented:
        n = int(rng.integers(2, 6))
        arc = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(1.8, 3.2), n)
        lobes = [(0.4 * rw * math.cos(a), 0.4 * rw * math.sin(a), rw * rng.uniform(0.22, 0.3)) for a in arc]
    else:
        lobes = [(rng.normal(0, 0.05) * rw, rng.normal(0, 0.05) * rw, rw * rng.uniform(0.72, 0.82))]
    strand = 0.08 * rw  # chromatin bridges between consecutive lobes
    texture_seed = int(rng.integers(0, 2**31))

    def render(u, v):
        rho, th = np.hypot(u, v), np.arctan2(v, u)
        cov = _coverage(rw * wob(th) - rho)
        nuc_cov = np.zeros_like(cov)
        for lx, ly, lr in lobes:
            nuc_cov = np.maximum(nuc_cov, _coverage(lr - np.hypot(u - lx, v - ly)))
        for (ax, ay, _), (bx, by, _) in itertools.pairwise(lobes):
            nuc_cov = np.maximum(nuc_cov, _coverage(strand - _segment_distance(u, v, ax, ay, bx, by)))
        chromatin = np.random.default_rng(texture_seed).normal(0.0, 1.0, size=u.shape).astype(np.float32)
        chromatin = cv2.GaussianBlur(chromatin, (0, 0), 1.2)
        nuc = nuc_cov * (1.1 + 0.6 * chromatin)
        cyto = cov * cyto_density * (1.0 - 0.7 * nuc_cov)
        return np.maximum(cov, nuc_cov), None, np.clip(nuc, 0, None).astype(np.float32), cyto

    return _Object("wbc", rw * 1.1 + 2, rw, render)


def _segment_distance(u: np.ndarray, v: np.ndarray, ax: float, ay: float, bx: float, by: float) -> np.ndarray:
    """Distance from each (u, v) to the segment a-b."""
    dx, dy = bx - ax, by - ay
    t = np.clip(((u - ax) * dx + (v - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return np.hypot(u - ax - t * dx, v - ay - t * dy)


def _platelet(rng: np.random.Generator, r: float) -> _Object:
    """Platelet: a small irregular purple granule cluster."""
    rp = r * rng.uniform(0.13, 0.2)
    wob = _wobble(rng, 0.12)
    density = rng.uniform(0.5, 0.9)

    def render(u, v):
        rho, th = np.hypot(u, v), np.arctan2(v, u)
        cov = _coverage(rp * wob(th) - rho)
        return cov, None, (cov * density).astype(np.float32), None

    return _Object("platelet", rp * 1.4 + 2, rp, render)


_SAMPLERS: dict[str, Callable[[np.random.Generator, float], _Object]] = {
    "discocyte": _discocyte,
    "spherocyte": _spherocyte,
    "elliptocyte": _elliptocyte,
    "target": _target,
    "stomatocyte": _stomatocyte,
    "echinocyte": _echinocyte,
    "schistocyte": _schistocyte,
    "dacrocyte": _dacrocyte,
    "sickle": _sickle,
    "wbc": _wbc,
    "platelet": _platelet,
}
assert set(_SAMPLERS) == set(RBC_CLASSES) | set(DISTRACTOR_CLASSES)


# --------------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------------


class _Packer:
    """Random sequential placement of discs that may touch and overlap up to a penetration limit.

    Penetration of a pair = (r_i + r_j - distance) / min(r_i, r_j); 0 is touching, 1 is one centre on
    the other's outline. A share ``clump_prob`` of candidates is drawn against an already placed
    object, so cells form touching clusters as in a real monolayer.
    """

    def __init__(self, rng: np.random.Generator, size: tuple[int, int], clump_prob: float, capacity: int):
        self.rng, self.h, self.w, self.clump_prob = rng, size[0], size[1], clump_prob
        self.x = np.zeros(capacity)
        self.y = np.zeros(capacity)
        self.r = np.zeros(capacity)
        self.n = 0

    def place(self, radius: float, max_overlap: float, margin: float) -> tuple[float, float] | None:
        """Centre for a new object, or None when the field has no room left for it."""
        n = self.n
        px, py, pr = self.x[:n], self.y[:n], self.r[:n]
        # a candidate is valid when its distance to every placed centre is at least min_dist
        min_dist = radius + pr - max_overlap * np.minimum(radius, pr)
        min_d2 = np.square(np.maximum(min_dist, 0.0))
        for _ in range(_PLACEMENT_ROUNDS):
            cx, cy = self._candidates(radius, max_overlap, margin)
            ok = ((cx[:, None] - px) ** 2 + (cy[:, None] - py) ** 2 >= min_d2).all(axis=1)
            hit = np.flatnonzero(ok)
            if hit.size:
                x, y = float(cx[hit[0]]), float(cy[hit[0]])
                self.x[n], self.y[n], self.r[n] = x, y, radius
                self.n += 1
                return x, y
        return None

    def _candidates(self, radius: float, max_overlap: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
        """Uniform positions (the border margin lets cells be cut by the image edge), a share of them
        replaced by positions just touching/overlapping a random already placed object."""
        k, n = _PLACEMENT_CANDIDATES, self.n
        u = self.rng.random((6, k))
        cx = -margin + u[0] * (self.w + 2 * margin)
        cy = -margin + u[1] * (self.h + 2 * margin)
        if n:
            j = np.minimum((u[2] * n).astype(np.intp), n - 1)
            rj = self.r[j]
            depth = -0.05 + u[3] * (max(max_overlap, 0.0) + 0.05)
            dist = radius + rj - depth * np.minimum(radius, rj)
            ang = u[4] * (2 * np.pi)
            clump = u[5] < self.clump_prob
            cx = np.where(clump, self.x[j] + dist * np.cos(ang), cx)
            cy = np.where(clump, self.y[j] + dist * np.sin(ang), cy)
        return cx, cy


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


@dataclass
class _Canvas:
    """Accumulators for one smear: stain densities, amodal coverage counts and the instance map."""

    hb: np.ndarray
    nuc: np.ndarray
    cyto: np.ndarray
    count: np.ndarray
    instances: np.ndarray

    @classmethod
    def empty(cls, h: int, w: int) -> _Canvas:
        z = np.zeros((h, w), dtype=np.float32)
        return cls(z, z.copy(), z.copy(), np.zeros((h, w), np.uint16), np.zeros((h, w), np.int32))


def _draw(canvas: _Canvas, obj: _Object, cx: float, cy: float, angle: float, oid: int) -> dict[str, Any]:
    """Render one object on its local grid, add its densities, and return its amodal footprint."""
    h, w = canvas.hb.shape
    half = math.ceil(obj.extent)
    gx0, gy0 = math.floor(cx) - half, math.floor(cy) - half
    gx1, gy1 = math.floor(cx) + half + 1, math.floor(cy) + half + 1
    xs = np.arange(gx0, gx1, dtype=np.float32) + 0.5 - cx
    ys = np.arange(gy0, gy1, dtype=np.float32) + 0.5 - cy
    c, s = math.cos(angle), math.sin(angle)
    u = xs[None, :] * c + ys[:, None] * s
    v = ys[:, None] * c - xs[None, :] * s
    cov, hb, nuc, cyto = obj.render(u, v)
    mask = cov > 0.5
    # clip the local grid to the image
    x0, y0, x1, y1 = max(gx0, 0), max(gy0, 0), min(gx1, w), min(gy1, h)
    local = (slice(y0 - gy0, y1 - gy0), slice(x0 - gx0, x1 - gx0))
    field = (slice(y0, y1), slice(x0, x1))
    inside = mask[local] if x1 > x0 and y1 > y0 else np.zeros((0, 0), bool)
    for acc, dens in ((canvas.hb, hb), (canvas.nuc, nuc), (canvas.cyto, cyto)):
        if dens is not None and inside.size:
            acc[field] += dens[local]
    if inside.size:
        canvas.count[field] += inside
        canvas.instances[field][inside] = oid
    return {
        "label": obj.label,
        "origin": (x0, y0),
        "mask": inside,
        "touches_border": bool(mask.sum() > inside.sum()),
    }


def _footprint_row(fp: dict[str, Any], count: np.ndarray) -> dict[str, Any] | None:
    """Box, centroid and overlap share of one object's in-image amodal mask (None if not visible)."""
    mask = fp["mask"]
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    ox, oy = fp["origin"]
    shared = count[oy : oy + mask.shape[0], ox : ox + mask.shape[1]][mask] > 1
    return {
        "label": fp["label"],
        "x0": int(ox + xs.min()),
        "y0": int(oy + ys.min()),
        "x1": int(ox + xs.max() + 1),
        "y1": int(oy + ys.max() + 1),
        "cx": float(ox + xs.mean() + 0.5),
        "cy": float(oy + ys.mean() + 0.5),
        "touches_border": fp["touches_border"],
        "overlap_fraction": float(shared.mean()),
    }


def _sample_objects(
    rng: np.random.Generator,
    style: SourceStyle,
    class_probs: np.ndarray,
    size: tuple[int, int],
    n_cells: int,
    distractors: bool,
) -> list[_Object]:
    """Draw the objects of one field: white cells first (bottom), then RBCs, then platelets (top)."""
    area_scale = size[0] * size[1] / _FIELD_AREA
    n_wbc = int(rng.poisson(WBC_PER_FIELD * area_scale)) if distractors else 0
    n_plt = int(rng.poisson(PLATELETS_PER_FIELD * area_scale)) if distractors else 0
    labels = (
        ["wbc"] * n_wbc
        + [RBC_CLASSES[i] for i in rng.choice(len(RBC_CLASSES), size=n_cells, p=class_probs)]
        + ["platelet"] * n_plt
    )
    radius = style.cell_diameter_px / 2.0
    sizes = radius * np.exp(rng.normal(0.0, style.diameter_cv, size=len(labels)))
    return [_SAMPLERS[lab](rng, float(r)) for lab, r in zip(labels, sizes, strict=True)]


def _optics(rng: np.random.Generator, style: SourceStyle, canvas: _Canvas) -> np.ndarray:
    """Beer-Lambert transmission, illumination, defocus and sensor noise -> float RGB in 0..1.

    One cv2.transform maps the stain densities (plus log illumination) to RGB optical density, so the
    whole field costs a few milliseconds.
    """
    h, w = canvas.hb.shape
    mottle = cv2.resize(
        rng.normal(0.0, style.background_mottle, size=(6, 6)).astype(np.float32),
        (w, h),
        interpolation=cv2.INTER_CUBIC,
    )
    nx = ((np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1)[None, :]
    ny = ((np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1)[:, None]
    tilt = float(rng.uniform(0, 2 * np.pi))
    illum = (
        1.0
        - float(style.vignetting) * (nx**2 + ny**2) / 2.0
        + float(style.illumination_gradient) * (nx * math.cos(tilt) + ny * math.sin(tilt)) / 2.0
    )
    neg_log_illum = -np.log(np.clip(illum, 1e-3, None)).astype(np.float32)
    stains = cv2.merge([canvas.hb + np.clip(mottle, 0.0, None), canvas.nuc, canvas.cyto, neg_log_illum])
    to_od = np.zeros((3, 5), dtype=np.float32)
    to_od[:, 0] = style.hb_absorbance
    to_od[:, 1] = style.nucleus_absorbance
    to_od[:, 2] = style.cytoplasm_absorbance
    to_od[:, 3] = 1.0
    to_od[:, 4] = -np.log(np.asarray(style.background_rgb))
    img = cv2.exp(-cv2.transform(stains, to_od))
    if style.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), float(style.blur_sigma))
    # triangular noise with unit variance (cheaper than Gaussian, indistinguishable after JPEG)
    u = rng.random((2, h, w, 3), dtype=np.float32)
    noise = (u[0] + u[1] - 1.0) * np.float32(math.sqrt(6.0))
    return img + np.float32(style.noise_sigma) * np.sqrt(img) * noise


def _encode_jpeg(rgb: np.ndarray, quality: int) -> tuple[bytes, np.ndarray]:
    """JPEG bytes at the lab's quality and the RGB array they decode to (the artefacts are the data)."""
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=int(quality))
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        decoded = np.asarray(im.convert("RGB")).copy()
    return data, decoded


def render_smear(
    rng: np.random.Generator,
    style: SourceStyle,
    class_probs: np.ndarray,
    size: tuple[int, int],
    n_cells: int,
    distractors: bool,
) -> SmearSample:
    """Render one field of view of ``size`` = (height, width) pixels.

    ``n_cells`` RBCs are drawn from ``class_probs`` (over ``RBC_CLASSES``); cells the field has no
    room for (given the style's overlap limit) are dropped, so dense high-magnification fields hold
    fewer. With ``distractors``, white cells and platelets are added (Poisson, see *_PER_FIELD).
    """
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.shape != (len(RBC_CLASSES),) or (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"class_probs must be {len(RBC_CLASSES)} non-negative weights, got {probs}")
    h, w = int(size[0]), int(size[1])
    objects = _sample_objects(rng, style, probs / probs.sum(), (h, w), int(n_cells), distractors)
    packer = _Packer(rng, (h, w), style.clump_prob, len(objects))
    canvas = _Canvas.empty(h, w)
    footprints = []
    for obj in objects:
        overlap = 0.0 if obj.label == "platelet" else style.max_overlap
        centre = packer.place(obj.pack_radius, overlap, margin=0.6 * obj.pack_radius)
        if centre is not None:
            angle = float(rng.uniform(0, 2 * np.pi))
            footprints.append(_draw(canvas, obj, *centre, angle, len(footprints) + 1))
    if len(footprints) >= np.iinfo(np.uint16).max:
        raise ValueError(f"{len(footprints)} objects do not fit a 16-bit instance map")
    rows = [_footprint_row(fp, canvas.count) for fp in footprints]
    # renumber to the objects that ended up visible; ids follow drawing order
    lut = np.zeros(len(footprints) + 1, dtype=np.uint16)
    cells = []
    visible = np.bincount(canvas.instances.ravel(), minlength=len(footprints) + 1)
    for old, row in enumerate(rows, start=1):
        if row is not None and visible[old] > 0:
            lut[old] = len(cells) + 1
            cells.append({"id": len(cells) + 1, **row})
    instances = lut[canvas.instances]
    linear = _optics(rng, style, canvas)
    rgb = np.clip(np.rint(linear * 255.0), 0, 255).astype(np.uint8)
    jpeg, image = _encode_jpeg(rgb, style.jpeg_quality)
    return SmearSample(image=image, instances=instances, cells=cells, jpeg=jpeg)


# --------------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------------


def _params(
    seed: int,
    n_sources: int,
    subjects_per_source: int,
    smears_per_subject: int,
    smear_size: tuple[int, int],
    cells_per_smear: tuple[int, int],
    class_concentration: float,
    distractors: bool,
) -> dict[str, Any]:
    """Validated, JSON-ready generation parameters (they also form the cache key)."""
    n_avail = len(default_sources())
    if not 1 <= n_sources <= n_avail:
        raise ValueError(f"n_sources must be in 1..{n_avail}, got {n_sources}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if subjects_per_source < 1 or smears_per_subject < 1:
        raise ValueError("subjects_per_source and smears_per_subject must be >= 1")
    if len(smear_size) != 2 or min(smear_size) < 32:
        raise ValueError(f"smear_size must be (height, width) with both >= 32, got {smear_size}")
    lo, hi = cells_per_smear
    if not 0 <= lo <= hi:
        raise ValueError(f"cells_per_smear must be (low, high) with 0 <= low <= high, got {cells_per_smear}")
    if class_concentration <= 0:
        raise ValueError(f"class_concentration must be > 0, got {class_concentration}")
    return {
        "seed": int(seed),
        "n_sources": int(n_sources),
        "subjects_per_source": int(subjects_per_source),
        "smears_per_subject": int(smears_per_subject),
        "smear_size": [int(smear_size[0]), int(smear_size[1])],
        "cells_per_smear": [int(lo), int(hi)],
        "class_concentration": float(class_concentration),
        "distractors": bool(distractors),
    }


def _definition(params: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the output bytes: hashing it gives the cache key."""
    return {
        "generator_version": GENERATOR_VERSION,
        "params": params,
        "rbc_classes": list(RBC_CLASSES),
        "distractor_classes": list(DISTRACTOR_CLASSES),
        "distractor_rates_per_384_field": {"wbc": WBC_PER_FIELD, "platelet": PLATELETS_PER_FIELD},
        "sources": [asdict(s) for s in default_sources()[: params["n_sources"]]],
    }


def _dataset_name(definition: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
    return f"synthetic-v{GENERATOR_VERSION}-{digest}"


def _write_smears(root: Path, params: dict[str, Any]) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Render every smear into ``root``; return cell rows, smear rows and per-subject metadata."""
    seed, k = params["seed"], len(RBC_CLASSES)
    size = tuple(params["smear_size"])
    lo, hi = params["cells_per_smear"]
    cell_rows, smear_rows, subjects = [], [], {}
    for si, style in enumerate(default_sources()[: params["n_sources"]]):
        dominant_order = np.random.default_rng([seed, 0, si]).permutation(k)
        for ji in range(params["subjects_per_source"]):
            subject = f"{style.name}/s{ji:02d}"
            srng = np.random.default_rng([seed, 1, si, ji])
            sstyle = subject_style(style, srng)
            dominant = int(dominant_order[ji % k])
            probs = subject_class_probs(srng, dominant, params["class_concentration"])
            subjects[subject] = {
                "dominant": RBC_CLASSES[dominant],
                "class_probs": dict(zip(RBC_CLASSES, (float(p) for p in probs), strict=True)),
                "style": asdict(sstyle),
            }
            for mi in range(params["smears_per_subject"]):
                rng = np.random.default_rng([seed, 2, si, ji, mi])
                sample = render_smear(
                    rng, sstyle, probs, size, int(rng.integers(lo, hi + 1)), params["distractors"]
                )
                file, mask_file = f"smears/{subject}/{mi:03d}.jpg", f"masks/{subject}/{mi:03d}.png"
                _write_sample(root, file, mask_file, sample)
                smear_rows.append(
                    {
                        "file": file,
                        "mask_file": mask_file,
                        "source": style.name,
                        "subject": subject,
                        "width": size[1],
                        "height": size[0],
                        "n_cells": len(sample.cells),
                        "n_rbc": sum(c["label"] in RBC_CLASSES for c in sample.cells),
                    }
                )
                for c in sample.cells:
                    cell_rows.append(_cell_row(c, file, mask_file, style.name, subject))
    return cell_rows, smear_rows, subjects


def _write_sample(root: Path, file: str, mask_file: str, sample: SmearSample) -> None:
    (root / file).parent.mkdir(parents=True, exist_ok=True)
    (root / mask_file).parent.mkdir(parents=True, exist_ok=True)
    (root / file).write_bytes(sample.jpeg)
    ok, png = cv2.imencode(".png", sample.instances)
    if not ok:
        raise OSError(f"{root / mask_file}: PNG encoding failed")
    (root / mask_file).write_bytes(png.tobytes())


def _cell_row(cell: dict[str, Any], file: str, mask_file: str, source: str, subject: str) -> dict[str, Any]:
    return {
        "file": file,
        "mask_file": mask_file,
        "instance_id": cell["id"],
        "x0": cell["x0"],
        "y0": cell["y0"],
        "x1": cell["x1"],
        "y1": cell["y1"],
        "cx": cell["cx"],
        "cy": cell["cy"],
        "label": cell["label"],
        "is_rbc": cell["label"] in RBC_CLASSES,
        "source": source,
        "subject": subject,
        "touches_border": cell["touches_border"],
        "overlap_fraction": cell["overlap_fraction"],
    }


_CELL_COLUMNS = (
    "file",
    "mask_file",
    "instance_id",
    "x0",
    "y0",
    "x1",
    "y1",
    "cx",
    "cy",
    "label",
    "is_rbc",
    "source",
    "subject",
    "touches_border",
    "overlap_fraction",
)

_CELL_DTYPES = {
    "instance_id": "int32",
    "x0": "int64",
    "y0": "int64",
    "x1": "int64",
    "y1": "int64",
    "cx": "float64",
    "cy": "float64",
    "is_rbc": "bool",
    "touches_border": "bool",
    "overlap_fraction": "float64",
}


def _remove_stale_tmp(cache_dir: Path, name: str) -> None:
    """Delete temp dirs of this dataset left by killed runs on this host (their pid is gone)."""
    host = socket.gethostname()
    for tmp in cache_dir.glob(f".tmp-{name}-{host}-*"):
        try:
            pid = int(tmp.name.split("-")[-2])
        except (ValueError, IndexError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            continue


def _publish(tmp: Path, final: Path) -> None:
    """Atomic rename; if another process published the same dataset first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / "meta.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def ensure_synthetic_dataset(
    cache_dir: str | Path,
    *,
    seed: int,
    n_sources: int,
    subjects_per_source: int,
    smears_per_subject: int,
    smear_size: tuple[int, int],
    cells_per_smear: tuple[int, int],
    class_concentration: float,
    distractors: bool,
) -> Path:
    """Generate (once) and return the synthetic smear dataset directory under ``cache_dir``.

    ``smear_size`` is (height, width); ``cells_per_smear`` is the inclusive (low, high) range of RBCs
    requested per smear; ``n_sources`` takes the first n of ``default_sources()``. The directory name
    hashes every parameter and ``GENERATOR_VERSION``; it appears only when complete (atomic rename).
    """
    params = _params(
        seed,
        n_sources,
        subjects_per_source,
        smears_per_subject,
        smear_size,
        cells_per_smear,
        class_concentration,
        distractors,
    )
    definition = _definition(params)
    cache_dir = Path(cache_dir)
    final = cache_dir / _dataset_name(definition)
    if (final / "meta.json").is_file():
        return final
    if final.exists():
        raise FileExistsError(
            f"{final}: exists but has no meta.json (not written by this generator); remove it"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(cache_dir, final.name)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}-", dir=cache_dir)
    )
    log.info("generating synthetic smears into %s", final)
    try:
        start = time.perf_counter()
        cell_rows, smear_rows, subjects = _write_smears(tmp, params)
        cells = pd.DataFrame(cell_rows, columns=list(_CELL_COLUMNS))
        cells = cells.astype(_CELL_DTYPES)
        cells.to_parquet(tmp / "cells.parquet", index=False)
        pd.DataFrame(smear_rows).to_parquet(tmp / "smears.parquet", index=False)
        meta = {
            **definition,
            "subjects": subjects,
            "n_smears": len(smear_rows),
            "n_objects": len(cell_rows),
            "generation_seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("synthetic smears ready (%d objects, %.1f s)", len(cell_rows), meta["generation_seconds"])
    return final


def read_instances(path: str | Path) -> np.ndarray:
    """Read a 16-bit instance mask written by this module (0 = background)."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise ValueError(f"{path}: not a single-channel instance mask")
    return mask.astype(np.uint16)
