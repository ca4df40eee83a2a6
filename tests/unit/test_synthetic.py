"""The procedural smear generator: determinism, caching, ground truth, class shapes, batch effects."""

from __future__ import annotations

import io
import json
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.measure import regionprops

from reddino.data import synthetic
from reddino.data.synthetic import (
    DISTRACTOR_CLASSES,
    GENERATOR_VERSION,
    RBC_CLASSES,
    SmearSample,
    default_sources,
    ensure_synthetic_dataset,
    read_instances,
    render_smear,
    subject_class_probs,
)

TINY = {
    "seed": 7,
    "n_sources": 2,
    "subjects_per_source": 2,
    "smears_per_subject": 2,
    "smear_size": (128, 128),
    "cells_per_smear": (12, 20),
    "class_concentration": 1.0,
    "distractors": True,
}
UNIFORM = np.full(len(RBC_CLASSES), 1.0 / len(RBC_CLASSES))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("cache"), **TINY)


def _render(
    source: int, seed: int, n_cells: int, size: int = 256, probs: np.ndarray = UNIFORM, sparse: bool = False
) -> SmearSample:
    """One smear of a default source; ``sparse`` forbids clumps and overlaps (clean shapes to measure)."""
    style = default_sources()[source]
    if sparse:
        style = replace(style, clump_prob=0.0, max_overlap=0.0)
    return render_smear(np.random.default_rng([seed, source]), style, probs, (size, size), n_cells, True)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.suffix in {".jpg", ".png"}
    }


# ---- public constants ---------------------------------------------------------------------------


def test_classes_and_sources_are_as_documented():
    assert len(RBC_CLASSES) >= 8 and len(set(RBC_CLASSES)) == len(RBC_CLASSES)
    assert DISTRACTOR_CLASSES == ("wbc", "platelet")
    assert not set(RBC_CLASSES) & set(DISTRACTOR_CLASSES)
    sources = default_sources()
    assert [s.name for s in sources] == [f"src{i}" for i in range(5)]
    assert len({s.hb_absorbance for s in sources}) == 5
    diameters = [s.cell_diameter_px for s in sources]
    assert min(diameters) >= 24 and max(diameters) <= 40 and max(diameters) - min(diameters) >= 8
    assert isinstance(GENERATOR_VERSION, int)


# ---- render_smear contract -------------------------------------------------------------------------


def test_render_smear_contract():
    sample = _render(0, seed=1, n_cells=30, size=160)
    assert sample.image.shape == (160, 160, 3) and sample.image.dtype == np.uint8
    assert sample.instances.shape == (160, 160) and sample.instances.dtype == np.uint16
    with Image.open(io.BytesIO(sample.jpeg)) as im:
        assert im.format == "JPEG"
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), sample.image)
    keys = {"id", "label", "x0", "y0", "x1", "y1", "cx", "cy", "touches_border", "overlap_fraction"}
    assert sample.cells and all(set(c) == keys for c in sample.cells)
    assert [c["id"] for c in sample.cells] == list(range(1, len(sample.cells) + 1))
    assert sum(c["label"] in RBC_CLASSES for c in sample.cells) <= 30


def test_render_smear_rejects_bad_class_probs():
    with pytest.raises(ValueError, match="class_probs"):
        render_smear(np.random.default_rng(0), default_sources()[0], np.ones(3), (64, 64), 5, False)


def test_without_distractors_only_rbcs():
    sample = render_smear(np.random.default_rng(3), default_sources()[1], UNIFORM, (384, 384), 40, False)
    assert {c["label"] for c in sample.cells} <= set(RBC_CLASSES)


# ---- dataset on disk ------------------------------------------------------------------------------


def test_dataset_layout_and_tables(tiny: Path):
    cells = pd.read_parquet(tiny / "cells.parquet")
    smears = pd.read_parquet(tiny / "smears.parquet")
    meta = json.loads((tiny / "meta.json").read_text())
    assert list(cells.columns)[:15] == [
        "file", "mask_file", "instance_id", "x0", "y0", "x1", "y1", "cx", "cy",
        "label", "is_rbc", "source", "subject", "touches_border", "overlap_fraction",
    ]  # fmt: skip
    assert {"file", "mask_file", "source", "subject", "width", "height", "n_cells"} <= set(smears.columns)
    assert len(smears) == 2 * 2 * 2
    assert set(smears["subject"]) == {"src0/s00", "src0/s01", "src1/s00", "src1/s01"}
    assert (smears.groupby("file")["n_cells"].first() == cells.groupby("file").size()).all()
    assert (cells["is_rbc"] == cells["label"].isin(RBC_CLASSES)).all()
    assert set(cells["label"]) <= set(RBC_CLASSES) | set(DISTRACTOR_CLASSES)
    assert all(s.startswith(src + "/") for s, src in zip(cells["subject"], cells["source"], strict=True))
    assert meta["generator_version"] == GENERATOR_VERSION
    assert meta["params"]["smear_size"] == [128, 128] and meta["rbc_classes"] == list(RBC_CLASSES)
    assert [s["name"] for s in meta["sources"]] == ["src0", "src1"]
    assert meta["generation_seconds"] >= 0
    for f in list(smears["file"]) + list(smears["mask_file"]):
        assert (tiny / f).is_file() and not Path(f).is_absolute()


def test_ground_truth_matches_masks(tiny: Path):
    cells = pd.read_parquet(tiny / "cells.parquet")
    for (file, mask_file), rows in cells.groupby(["file", "mask_file"]):
        inst = read_instances(tiny / mask_file)
        with Image.open(tiny / file) as im:
            assert im.size == (inst.shape[1], inst.shape[0])
        assert set(np.unique(inst)) - {0} == set(rows["instance_id"])
        h, w = inst.shape
        for r in rows.itertuples():
            assert 0 <= r.x0 < r.x1 <= w and 0 <= r.y0 < r.y1 <= h
            ys, xs = np.nonzero(inst == r.instance_id)
            assert xs.min() >= r.x0 and xs.max() < r.x1 and ys.min() >= r.y0 and ys.max() < r.y1
            assert r.x0 <= r.cx <= r.x1 and r.y0 <= r.cy <= r.y1
            assert 0.0 <= r.overlap_fraction <= 1.0
            cut = r.x0 == 0 or r.y0 == 0 or r.x1 == w or r.y1 == h
            assert cut or not r.touches_border


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny: Path, tmp_path: Path):
    again = ensure_synthetic_dataset(tmp_path / "a", **TINY)
    assert again.name == tiny.name
    assert _files(again) == _files(tiny)
    for table in ("cells.parquet", "smears.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(again / table), pd.read_parquet(tiny / table))
    other = ensure_synthetic_dataset(tmp_path / "b", **{**TINY, "seed": 8})
    assert other.name != tiny.name
    first = "smears/src0/s00/000.jpg"
    assert (other / first).read_bytes() != (tiny / first).read_bytes()


def test_smears_do_not_depend_on_generation_order(tiny: Path, tmp_path: Path):
    # more sources and subjects are generated, but the shared smears are the same bytes
    bigger = ensure_synthetic_dataset(tmp_path, **{**TINY, "n_sources": 3, "subjects_per_source": 3})
    assert bigger.name != tiny.name
    for f in ("smears/src1/s01/001.jpg", "masks/src0/s01/000.png"):
        assert (bigger / f).read_bytes() == (tiny / f).read_bytes()


def test_second_call_is_a_cache_hit(tiny: Path, monkeypatch: pytest.MonkeyPatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(synthetic, "_write_smears", must_not_run)
    assert ensure_synthetic_dataset(tiny.parent, **TINY) == tiny
    with pytest.raises(AssertionError, match="regenerated"):  # a new key does regenerate
        ensure_synthetic_dataset(tiny.parent, **{**TINY, "class_concentration": 2.0})


def test_failed_generation_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = {"n": 0}
    real = synthetic.render_smear

    def dies_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_smear", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path, **TINY)
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_dir_of_a_dead_process_is_removed(tmp_path: Path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = synthetic._dataset_name(synthetic._definition(synthetic._params(**TINY)))
    host = synthetic.socket.gethostname()
    stale = tmp_path / f".tmp-{name}-{host}-{dead.pid}-abc123"
    (stale / "smears").mkdir(parents=True)
    root = ensure_synthetic_dataset(tmp_path, **TINY)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]


def test_invalid_parameters_are_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="n_sources"):
        ensure_synthetic_dataset(tmp_path, **{**TINY, "n_sources": 6})
    with pytest.raises(ValueError, match="cells_per_smear"):
        ensure_synthetic_dataset(tmp_path, **{**TINY, "cells_per_smear": (5, 2)})
    with pytest.raises(ValueError, match="class_concentration"):
        ensure_synthetic_dataset(tmp_path, **{**TINY, "class_concentration": 0.0})
    assert list(tmp_path.iterdir()) == []


# ---- content: classes, subjects, sources --------------------------------------------------------


def test_all_classes_appear_over_a_moderate_sample():
    labels = Counter(c["label"] for i in range(6) for c in _render(i % 5, seed=i, n_cells=60, size=384).cells)
    assert set(labels) == set(RBC_CLASSES) | set(DISTRACTOR_CLASSES)


def test_subjects_have_their_own_class_mix(tmp_path: Path):
    params = {**TINY, "n_sources": 1, "subjects_per_source": 3, "smear_size": (256, 256)}
    root = ensure_synthetic_dataset(
        tmp_path, **{**params, "cells_per_smear": (40, 50), "class_concentration": 5.0}
    )
    meta = json.loads((root / "meta.json").read_text())
    cells = pd.read_parquet(root / "cells.parquet")
    dominant = {s: v["dominant"] for s, v in meta["subjects"].items()}
    assert len(set(dominant.values())) == 3
    observed = cells[cells["is_rbc"]].groupby("subject")["label"].agg(lambda x: x.value_counts().index[0])
    assert observed.to_dict() == dominant
    styles = [v["style"]["hb_absorbance"] for v in meta["subjects"].values()]
    assert len({tuple(s) for s in styles}) == 3  # per-slide stain jitter


def test_subject_class_probs_favour_the_dominant_class():
    rng = np.random.default_rng(0)
    draws = np.stack([subject_class_probs(rng, dominant=4, concentration=3.0) for _ in range(200)])
    assert np.allclose(draws.sum(axis=1), 1.0)
    assert draws.mean(axis=0).argmax() == 4
    assert abs(draws[:, 4].mean() - 0.5) < 0.05


def _background_rgb(sample: SmearSample) -> np.ndarray:
    return sample.image[sample.instances == 0].reshape(-1, 3).mean(axis=0)


def test_sources_differ_in_colour_and_magnification():
    only_discocytes = np.eye(len(RBC_CLASSES))[RBC_CLASSES.index("discocyte")]
    samples = [_render(i, seed=5, n_cells=30, size=320, probs=only_discocytes, sparse=True) for i in range(5)]
    bg = np.stack([_background_rgb(s) for s in samples])
    dist = np.linalg.norm(bg[:, None] - bg[None], axis=2)
    assert dist[np.triu_indices(5, 1)].min() > 5.0  # grey levels out of 255
    rbc = [
        np.stack([s.image[s.instances == c["id"]].mean(axis=0) for c in s.cells if c["label"] == "discocyte"])
        for s in samples
    ]
    hue = np.stack(
        [np.arctan2(np.sqrt(3) * (m[:, 1] - m[:, 2]), 2 * m[:, 0] - m[:, 1] - m[:, 2]).mean() for m in rbc]
    )
    assert np.ptp(hue) > 0.15  # cell colour (stain hue) varies across labs
    areas = [np.median(_props(s, "discocyte", "area")) for s in samples]
    diameters = [st.cell_diameter_px for st in default_sources()]
    assert np.argsort(areas).tolist() == np.argsort(diameters).tolist()


# ---- content: morphology -------------------------------------------------------------------------


def _isolated(sample: SmearSample, label: str) -> list[dict]:
    return [
        c
        for c in sample.cells
        if c["label"] == label and c["overlap_fraction"] == 0 and not c["touches_border"]
    ]


def _props(sample: SmearSample, label: str, prop: str) -> list[float]:
    out = []
    for c in _isolated(sample, label):
        region = regionprops((sample.instances == c["id"]).astype(np.uint8))[0]
        out.append(float(getattr(region, prop)))
    return out


@pytest.fixture(scope="module")
def src0_cells() -> list[SmearSample]:
    return [_render(0, seed=100 + i, n_cells=40, size=320, sparse=True) for i in range(4)]


def _median(samples: list[SmearSample], label: str, fn) -> float:
    values = []
    for s in samples:
        for c in _isolated(s, label):
            region = regionprops((s.instances == c["id"]).astype(np.uint8))[0]
            values.append(fn(region, s))
    assert len(values) >= 3, f"too few isolated {label} cells"
    return float(np.median(values))


def test_spherocytes_and_schistocytes_are_smaller_than_discocytes(src0_cells):
    disco = _median(src0_cells, "discocyte", lambda r, s: r.area)
    assert _median(src0_cells, "spherocyte", lambda r, s: r.area) < 0.75 * disco
    assert _median(src0_cells, "schistocyte", lambda r, s: r.area) < 0.75 * disco


def test_echinocyte_outline_is_crenated(src0_cells):
    def compactness(r, s):
        return r.perimeter**2 / r.area

    assert _median(src0_cells, "echinocyte", compactness) > 1.1 * _median(
        src0_cells, "discocyte", compactness
    )


def test_elongated_classes_have_high_aspect_ratio(src0_cells):
    def aspect(r, s):
        return r.axis_major_length / r.axis_minor_length

    disco = _median(src0_cells, "discocyte", aspect)
    assert disco < 1.15
    assert _median(src0_cells, "elliptocyte", aspect) > 1.35
    assert _median(src0_cells, "sickle", aspect) > 2.0


def _radial_brightness(region, sample: SmearSample, inner: float, outer: float) -> float:
    """Mean grey level of the cell between ``inner`` and ``outer`` fractions of its equivalent radius."""
    grey = sample.image.mean(axis=2)
    cy, cx = region.centroid
    radius = region.equivalent_diameter_area / 2
    ys, xs = region.coords.T
    d = np.hypot(ys - cy, xs - cx) / radius
    sel = (d >= inner) & (d < outer)
    return float(grey[ys[sel], xs[sel]].mean())


def test_discocytes_have_a_pale_centre_and_targets_a_dense_spot(src0_cells):
    def pallor(r, s):
        return _radial_brightness(r, s, 0.0, 0.25) - _radial_brightness(r, s, 0.6, 0.85)

    def spot(r, s):
        return _radial_brightness(r, s, 0.4, 0.55) - _radial_brightness(r, s, 0.0, 0.15)

    assert _median(src0_cells, "discocyte", pallor) > 10
    assert _median(src0_cells, "spherocyte", pallor) < 5
    assert _median(src0_cells, "target", spot) > 5


def test_dense_smear_has_touching_overlapping_and_cut_cells():
    sample = render_smear(np.random.default_rng(11), default_sources()[4], UNIFORM, (256, 256), 120, False)
    overlap = np.array([c["overlap_fraction"] for c in sample.cells])
    assert (overlap > 0.05).sum() >= 10
    assert (overlap == 0).sum() >= 1
    assert sum(c["touches_border"] for c in sample.cells) >= 5
    inst = sample.instances.astype(np.int64)
    horizontal = (inst[:, 1:] != inst[:, :-1]) & (inst[:, 1:] > 0) & (inst[:, :-1] > 0)
    assert horizontal.sum() > 0  # distinct cells share an edge
