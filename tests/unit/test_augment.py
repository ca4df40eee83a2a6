"""Tests for reddino.data.augment: 1.3.1 SomeOf semantics, restored defaults, multi-crop contracts."""

from __future__ import annotations

import inspect
import math
import pickle
from collections import Counter
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from reddino.data.augment import (
    REDDINO_PIXEL_TRANSFORMS,
    DinoV2Augmentation,
    GaussianBlur131,
    QuarterTurn,
    RandomFog131,
    RandomRainFitted,
    RedDinoAugmentation,
    SomeOfWithReplacement,
    reddino_pixel_transforms,
    seed_independently,
)
from reddino.runtime.paths import config_dir

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
GLOBAL, LOCAL = 32, 16


class Recorder(A.ImageOnlyTransform):
    """Leaves the image alone and appends its name to a shared log when applied."""

    def __init__(self, name: str, log: list[str], p: float):
        super().__init__(p=p)
        self.name = name
        self.log = log

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        self.log.append(self.name)
        return img


def recorders(ps: list[float], log: list[str]) -> list[Recorder]:
    return [Recorder(f"t{i}", log, p) for i, p in enumerate(ps)]


def image(size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def draws_per_call(ps: list[float], n: int, calls: int, seed: int = 0) -> list[list[str]]:
    log: list[str] = []
    pipeline = A.Compose([SomeOfWithReplacement(recorders(ps, log), n=n)], seed=seed)
    img = image(8)
    per_call = []
    for _ in range(calls):
        start = len(log)
        pipeline(image=img)
        per_call.append(log[start:])
    return per_call


def reddino(
    seed: int | None = 0, n_global: int = 2, n_local: int = 3, **overrides: Any
) -> RedDinoAugmentation:
    kwargs: dict[str, Any] = dict(
        global_size=GLOBAL,
        local_size=LOCAL,
        global_scale=(0.32, 1.0),
        local_scale=(0.05, 0.32),
        n_global=n_global,
        n_local=n_local,
        crop_ratio=(3 / 4, 4 / 3),
        n_pixel_ops=4,
        flip_p=0.85,
        pixel_transforms=REDDINO_PIXEL_TRANSFORMS,
        mean=MEAN,
        std=STD,
        seed=seed,
        pixel_ops_device="cpu",
    )
    kwargs.update(overrides)
    return RedDinoAugmentation(**kwargs)


def dinov2(seed: int | None = 0, n_local: int = 3, **overrides: Any) -> DinoV2Augmentation:
    kwargs: dict[str, Any] = dict(
        global_size=GLOBAL,
        local_size=LOCAL,
        global_scale=(0.32, 1.0),
        local_scale=(0.05, 0.32),
        n_global=2,
        n_local=n_local,
        crop_ratio=(3 / 4, 4 / 3),
        color_jitter=(0.4, 0.4, 0.2, 0.1),
        color_jitter_p=0.8,
        grayscale_p=0.2,
        global_blur_p=(1.0, 0.1),
        global_solarize_p=(0.0, 0.2),
        local_blur_p=0.5,
        blur_kernel_size=9,
        blur_sigma=(0.1, 2.0),
        hflip_p=0.5,
        vflip_p=0.5,
        rot90_p=0.5,
        mean=MEAN,
        std=STD,
        seed=seed,
    )
    kwargs.update(overrides)
    return DinoV2Augmentation(**kwargs)


def all_crops(out: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    return out["global_crops"] + out["local_crops"]


# ---------------------------------------------------------------- SomeOfWithReplacement (1.3.1 semantics)


def test_someof_applies_exactly_n_even_when_p_is_tiny() -> None:
    per_call = draws_per_call([0.01, 0.01, 0.01], n=4, calls=200)
    assert all(len(applied) == 4 for applied in per_call)


def test_someof_draws_with_replacement() -> None:
    # n > number of transforms is only possible with replacement; 33-way pool still repeats sometimes.
    assert all(len(applied) == 5 for applied in draws_per_call([0.85, 0.85], n=5, calls=20))
    per_call = draws_per_call([0.85] * 33, n=4, calls=300)
    with_repeat = sum(len(set(applied)) < 4 for applied in per_call)
    assert 0.08 < with_repeat / len(per_call) < 0.30  # 1 - (33*32*31*30)/33^4 = 0.17


def test_someof_draw_frequencies_follow_normalised_p() -> None:
    ps = [0.1, 0.3, 0.6]
    per_call = draws_per_call(ps, n=4, calls=500)
    counts = Counter(name for applied in per_call for name in applied)
    total = sum(counts.values())
    expected = [total * p / sum(ps) for p in ps]
    chi2 = sum((counts[f"t{i}"] - e) ** 2 / e for i, e in enumerate(expected))
    assert total == 2000
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, 0.999 quantile


def test_someof_applies_in_draw_order_not_list_order() -> None:
    per_call = draws_per_call([0.85] * 5, n=4, calls=100)
    indices = [[int(name[1:]) for name in applied] for applied in per_call]
    assert any(seq != sorted(seq) for seq in indices)


def test_someof_is_deterministic_under_outer_compose_seed() -> None:
    assert draws_per_call([0.85] * 6, 4, 30, seed=5) == draws_per_call([0.85] * 6, 4, 30, seed=5)
    assert draws_per_call([0.85] * 6, 4, 30, seed=5) != draws_per_call([0.85] * 6, 4, 30, seed=6)


def test_someof_edge_cases() -> None:
    assert draws_per_call([0.85, 0.85], n=0, calls=5) == [[]] * 5
    with pytest.raises(ValueError, match="n must be"):
        SomeOfWithReplacement(recorders([0.5], []), n=-1)
    with pytest.raises(ValueError, match="positive sum"):
        SomeOfWithReplacement(recorders([0.0, 0.0], []), n=1)


def test_someof_round_trips_through_albumentations_serialisation() -> None:
    pipeline = A.Compose([SomeOfWithReplacement([A.InvertImg(p=0.85), A.Blur(p=0.85)], n=3)])
    rebuilt = A.from_dict(A.to_dict(pipeline))
    assert isinstance(rebuilt.transforms[0], SomeOfWithReplacement)
    assert rebuilt.transforms[0].n == 3


def test_seed_independently_decorrelates_siblings() -> None:
    # A 2.x Compose(seed=s) copies s into every child: equal-p flips then fire together every call.
    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    seed_independently(pipeline, np.random.SeedSequence(0))
    img = image(4)
    decisions = []
    for _ in range(100):
        pipeline(image=img)
        decisions.append((bool(pipeline.transforms[0].params), bool(pipeline.transforms[1].params)))
    assert sum(h != v for h, v in decisions) > 20


# ---------------------------------------------------------------- the 33 pixel transforms


def test_pixel_transform_names_are_the_33_albumentations_classes() -> None:
    assert len(REDDINO_PIXEL_TRANSFORMS) == 33 == len(set(REDDINO_PIXEL_TRANSFORMS))
    assert REDDINO_PIXEL_TRANSFORMS[0] == "Blur" and REDDINO_PIXEL_TRANSFORMS[-1] == "Solarize"
    built = reddino_pixel_transforms(REDDINO_PIXEL_TRANSFORMS)
    for name, transform in zip(REDDINO_PIXEL_TRANSFORMS, built, strict=True):
        assert isinstance(transform, getattr(A, name))
        assert transform.p == 0.85


def test_unknown_pixel_transform_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"GaussianBlurr.*valid names: Blur, CLAHE"):
        reddino_pixel_transforms(["Blur", "GaussianBlurr"])
    with pytest.raises(ValueError, match="ElasticTransform"):
        reddino(pixel_transforms=["ElasticTransform"])


@pytest.mark.parametrize("name", REDDINO_PIXEL_TRANSFORMS)
def test_each_pixel_transform_runs_on_uint8_rgb(name: str) -> None:
    (transform,) = reddino_pixel_transforms([name])
    seed_independently(transform, np.random.SeedSequence(1))
    img = image(64)
    outputs = [transform(image=img, force_apply=True)["image"] for _ in range(5)]
    for out in outputs:
        assert out.shape == img.shape and out.dtype == np.uint8
    assert any(not np.array_equal(out, img) for out in outputs)


def test_restored_albumentations_131_defaults() -> None:
    t = dict(zip(REDDINO_PIXEL_TRANSFORMS, reddino_pixel_transforms(REDDINO_PIXEL_TRANSFORMS), strict=True))
    # GaussNoise var_limit (10, 50) px^2 on 0-255 -> std in units of 255
    assert np.allclose(np.array(t["GaussNoise"].std_range) * 255, [math.sqrt(10), math.sqrt(50)])
    assert t["GaussNoise"].mean_range == (0.0, 0.0)
    assert t["ColorJitter"].hue == (-0.2, 0.2)
    assert t["ColorJitter"].brightness == (0.8, 1.2)
    assert t["RandomRain"].drop_length == 20
    assert t["ImageCompression"].quality_range == (99, 100)
    assert t["Downscale"].scale_range == (0.25, 0.25)
    assert t["RandomSunFlare"].src_radius == 400
    assert isinstance(t["RandomFog"], RandomFog131) and t["RandomFog"].fog_coef_range == (0.3, 1.0)
    assert t["RandomFog"].alpha_coef == 0.08
    assert t["RandomSnow"].snow_point_range == (0.1, 0.3)
    assert t["RandomSnow"].brightness_coeff == 2.5
    assert t["HueSaturationValue"].hue_shift_limit == (-20, 20)
    assert t["MedianBlur"].blur_limit == (3, 7)


def test_solarize_inverts_exactly_the_pixels_from_128() -> None:
    (solarize,) = reddino_pixel_transforms(["Solarize"])
    img = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 1, 3)).copy()
    out = solarize(image=img, force_apply=True)["image"][:, 0, 0].astype(int)
    values = np.arange(256)
    assert np.array_equal(out, np.where(values >= 128, 255 - values, values))


def test_gaussian_blur_samples_ksize_and_sigma_like_131() -> None:
    (blur,) = reddino_pixel_transforms(["GaussianBlur"])
    assert isinstance(blur, GaussianBlur131)
    assert blur.blur_limit == (3, 7) and blur.sigma_limit == (0, 0)
    blur.set_random_seed(0)
    kernels = [blur.get_params_dependent_on_data({}, {})["kernel"] for _ in range(2000)]
    sizes = Counter(len(k) for k in kernels)
    assert set(sizes) == {3, 5, 7}
    assert abs(sizes[3] / 2000 - 0.2) < 0.04  # randrange(3, 8) with 4 -> 5 and 6 -> 7
    for k in kernels[:20]:
        assert np.allclose(k, cv2.getGaussianKernel(len(k), 0).ravel())  # sigma derived from ksize


def test_random_rain_fits_images_shorter_than_its_drops() -> None:
    rain = RandomRainFitted(drop_length=20, p=1.0)
    out = rain(image=image(12))["image"]
    assert out.shape == (12, 12, 3)
    assert rain.drop_length == 20


def test_random_fog_blends_white_discs_like_131() -> None:
    fog = RandomFog131(fog_coef_range=(1.0, 1.0), alpha_coef=0.08, p=1.0)
    flat = np.full((60, 60, 3), 100, np.uint8)
    out = fog.apply(flat, fog_coef=1.0, haze_list=[(5, 5)])
    # disc of diameter hw = (60 // 3) * 1.0 = 20 centred at (15, 15): 0.08 * 255 + 0.92 * 100 = 112.4
    assert (out[15, 15] == 112).all() and (out[50, 50] == 100).all()
    assert fog.apply(flat, fog_coef=1.0, haze_list=[]).tolist() == flat.tolist()


def test_random_fog_params_cover_the_image_and_terminate_on_narrow_images() -> None:
    fog = RandomFog131(fog_coef_range=(0.3, 1.0), alpha_coef=0.08, p=1.0)
    fog.set_random_seed(0)
    haze = fog.get_params_dependent_on_data({"shape": (224, 224, 3)}, {})["haze_list"]
    assert len(haze) > 10
    thin = RandomFog131(fog_coef_range=(0.3, 0.3), alpha_coef=0.08, p=1.0)
    for shape in [(300, 30, 3), (30, 300, 3), (8, 8, 3)]:  # 1.3.1 loops forever on the first one
        out = thin(image=np.zeros(shape, np.uint8))["image"]
        assert out.shape == shape


def test_quarter_turn_is_a_fixed_counter_clockwise_rotation() -> None:
    img = image(8)
    assert np.array_equal(QuarterTurn(p=1.0)(image=img)["image"], np.rot90(img, k=1))


# ---------------------------------------------------------------- RedDinoAugmentation


def test_reddino_output_contract() -> None:
    out = reddino(n_global=2, n_local=3)(image(64))
    assert set(out) == {"global_crops", "local_crops"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    for crop in out["global_crops"]:
        assert crop.shape == (3, GLOBAL, GLOBAL) and crop.dtype == torch.float32
    for crop in out["local_crops"]:
        assert crop.shape == (3, LOCAL, LOCAL) and crop.dtype == torch.float32
    values = torch.cat([c.flatten() for c in all_crops(out)])
    assert torch.isfinite(values).all()
    assert values.mean().abs() < 1.5 and 0.2 < values.std() < 3.0  # ImageNet-normalised, not 0-255


def test_reddino_accepts_any_input_size() -> None:
    out = reddino()(image(97))
    assert out["global_crops"][0].shape == (3, GLOBAL, GLOBAL)


def test_reddino_without_local_crops_does_no_local_work(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    original = A.RandomResizedCrop.__call__

    def spy(self: A.RandomResizedCrop, *args: Any, **kwargs: Any) -> Any:
        calls.append(self.size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(A.RandomResizedCrop, "__call__", spy)
    out = reddino(n_global=2, n_local=0)(image(64))
    assert out["local_crops"] == []
    assert calls == [(GLOBAL, GLOBAL)] * 2
    calls.clear()
    reddino(n_global=2, n_local=3)(image(64))
    assert sorted(calls) == [(LOCAL, LOCAL)] * 3 + [(GLOBAL, GLOBAL)] * 2


def test_reddino_is_deterministic_per_seed() -> None:
    img = image(64)
    a, b, c = reddino(seed=3), reddino(seed=3), reddino(seed=4)
    for _ in range(3):
        out_a, out_b, out_c = a(img), b(img), c(img)
        for x, y in zip(all_crops(out_a), all_crops(out_b), strict=True):
            assert torch.equal(x, y)
        assert not all(torch.equal(x, y) for x, y in zip(all_crops(out_a), all_crops(out_c), strict=True))


def test_reddino_reseed_reproduces_a_fresh_pipeline() -> None:
    img = image(64)
    aug = reddino(seed=0)
    aug(img)
    aug.reseed(11)
    fresh = reddino(seed=11)
    for _ in range(2):
        for x, y in zip(all_crops(aug(img)), all_crops(fresh(img)), strict=True):
            assert torch.equal(x, y)


def test_reddino_views_of_one_call_differ() -> None:
    out = reddino(seed=0, n_global=2, n_local=2)(image(64))
    assert not torch.equal(out["global_crops"][0], out["global_crops"][1])
    assert not torch.equal(out["local_crops"][0], out["local_crops"][1])


def test_reddino_draws_n_pixel_ops_per_view() -> None:
    aug = reddino(seed=0, n_global=2, n_local=1, n_pixel_ops=4)
    pools = [view.transforms[1] for view in aug._global_views + aug._local_views]
    assert all(isinstance(pool, SomeOfWithReplacement) and pool.n == 4 for pool in pools)
    assert len({id(pool) for pool in pools}) == 3  # every view owns its transforms and random streams


def test_reddino_geometric_decisions_are_independent() -> None:
    # albumentations' own Compose seeding would make equal-p flips fire in lockstep.
    aug = reddino(seed=0, n_local=0)
    view = aug._global_views[0]
    hflip, vflip = (
        next(t for t in view.transforms if type(t) is kind) for kind in (A.HorizontalFlip, A.VerticalFlip)
    )
    disagree = 0
    for _ in range(100):
        aug(image(16))
        disagree += bool(hflip.params) != bool(vflip.params)
    assert disagree > 8  # expected 2 * 0.85 * 0.15 * 100 = 25.5


def test_reddino_pickles_for_dataloader_workers() -> None:
    aug = reddino(seed=2)
    clone = pickle.loads(pickle.dumps(aug))
    img = image(64)
    for x, y in zip(all_crops(aug(img)), all_crops(clone(img)), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64, 3), np.float32)],
)
def test_bad_input_is_rejected_clearly(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8 RGB"):
        reddino()(bad)
    with pytest.raises(ValueError, match="HxWx3 uint8 RGB"):
        dinov2()(bad)


# ---------------------------------------------------------------- DinoV2Augmentation


def test_dinov2_output_contract_and_no_local_work() -> None:
    out = dinov2(n_local=4)(image(64))
    assert [c.shape for c in out["global_crops"]] == [(3, GLOBAL, GLOBAL)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, LOCAL, LOCAL)] * 4
    assert all(c.dtype == torch.float32 for c in all_crops(out))
    values = torch.cat([c.flatten() for c in all_crops(out)])
    assert values.mean().abs() < 1.5 and 0.2 < values.std() < 3.0
    empty = dinov2(n_local=0)
    assert empty(image(64))["local_crops"] == [] and empty._local_views == []


def test_dinov2_is_deterministic_and_reseedable() -> None:
    img = image(64)
    a, b, c = dinov2(seed=1), dinov2(seed=1), dinov2(seed=2)
    out_a, out_b, out_c = a(img), b(img), c(img)
    assert all(torch.equal(x, y) for x, y in zip(all_crops(out_a), all_crops(out_b), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(all_crops(out_a), all_crops(out_c), strict=True))
    c.reseed(1)
    assert all(torch.equal(x, y) for x, y in zip(all_crops(c(img)), all_crops(out_a), strict=True))


def test_dinov2_uses_the_intended_per_view_probabilities() -> None:
    aug = dinov2(n_local=1)

    def p_of(view: A.Compose, kind: type) -> float:
        return next(t.p for t in view.transforms if type(t) is kind)

    g1, g2 = aug._global_views
    (local,) = aug._local_views
    assert [p_of(v, A.GaussianBlur) for v in (g1, g2, local)] == [1.0, 0.1, 0.5]
    assert [p_of(v, A.Solarize) for v in (g1, g2, local)] == [0.0, 0.2, 0.0]
    assert p_of(g1, A.ColorJitter) == 0.8 and p_of(g1, A.ToGray) == 0.2 and p_of(g1, QuarterTurn) == 0.5
    blur = next(t for t in g1.transforms if type(t) is A.GaussianBlur)
    assert blur.blur_limit == (9, 9) and blur.sigma_limit == (0.1, 2.0)


def test_dinov2_needs_one_blur_and_solarize_probability_per_global_view() -> None:
    with pytest.raises(ValueError, match="one probability per global view"):
        dinov2(global_blur_p=(1.0,))


# ---------------------------------------------------------------- Hydra configs


def compose_config(name: str, n_local: int = 2) -> Any:
    """``augment=<name>`` as Hydra composes it (defaults included), with this file's crop sizes."""
    overrides = [
        f"augment={name}",
        f"crops.global_size={GLOBAL}",
        f"crops.local_size={LOCAL}",
        "crops.global_scale=[0.32,1.0]",
        "crops.local_scale=[0.05,0.32]",
        f"crops.n_local={n_local}",
        "seed=5",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("pretrain", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg.augment


@pytest.mark.parametrize(("name", "cls"), [("reddino", RedDinoAugmentation), ("dinov2", DinoV2Augmentation)])
def test_config_lists_every_argument_and_instantiates(name: str, cls: type) -> None:
    cfg = compose_config(name)
    expected = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(cfg) - {"_target_"} == expected
    aug = instantiate(cfg)
    assert isinstance(aug, cls)
    out = aug(image(64))
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 2
    assert out["local_crops"][0].shape == (3, LOCAL, LOCAL)


def test_reddino_config_lists_the_33_transforms_in_reference_order() -> None:
    cfg = compose_config("reddino")
    assert list(cfg.pixel_transforms) == list(REDDINO_PIXEL_TRANSFORMS)
    assert cfg.n_pixel_ops == 4 and cfg.flip_p == 0.85


@pytest.mark.parametrize("make", [reddino, dinov2])
def test_a_square_crop_ratio_keeps_the_cell_aspect(make) -> None:
    """crop_ratio (1, 1) never stretches: a disc stays round in every view (elliptocytes are told from
    normal cells by aspect alone, so a recipe may keep it)."""
    disc = np.zeros((96, 96, 3), dtype=np.uint8)
    cv2.circle(disc, (48, 48), 12, (255, 255, 255), -1)
    kwargs = {
        "color_jitter_p": 0.0,
        "grayscale_p": 0.0,
        "global_blur_p": (0.0, 0.0),
        "global_solarize_p": (0.0, 0.0),
    }
    aug = make(
        seed=3,
        n_local=0,
        crop_ratio=(1.0, 1.0),
        global_scale=(1.0, 1.0),
        **({} if make is reddino else kwargs),
        **({"n_pixel_ops": 0} if make is reddino else {}),
    )
    for view in aug(disc)["global_crops"]:
        mask = view.mean(0) > view.mean()
        rows, cols = mask.any(1).sum().item(), mask.any(0).sum().item()
        assert abs(rows - cols) <= 1
    stretched = make(seed=3, crop_ratio=(0.5, 2.0))
    crops = [
        t
        for view in stretched._global_views + stretched._local_views
        for t in view.transforms
        if isinstance(t, A.RandomResizedCrop)
    ]
    assert len(crops) == 2 + 3 and all(tuple(t.ratio) == (0.5, 2.0) for t in crops)
