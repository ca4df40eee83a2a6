"""The batched torch RedDino pixel-op pool (augment=reddino_gpu): per-op contracts, agreement with
albumentations where the op is exact, the with-replacement slot draw, and the DataModule / config wiring."""

from __future__ import annotations

import math
from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from reddino.data import gpu_augment as G
from reddino.data.augment import REDDINO_PIXEL_TRANSFORMS, RedDinoAugmentation
from reddino.data.datamodules import PretrainDataModule

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
REDDINO_POOL = list(REDDINO_PIXEL_TRANSFORMS)


def make_image(size: int = 96, seed: int = 0) -> np.ndarray:
    """A non-constant HxWx3 uint8 RGB image: colour gradients, a few discs and a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.stack([200 * xx + 30, 180 * yy + 40, 120 * (1 - xx * yy) + 60], -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] *= rng.uniform(0.4, 0.8, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def batch(n: int = 8, size: int = 96) -> torch.Tensor:
    """n different views in [0, 1], (n, 3, size, size) float32."""
    return torch.stack([to_tensor(make_image(size, seed)) for seed in range(n)])


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255


def to_levels(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> HxWx3 float grey levels."""
    return x[0].permute(1, 2, 0).numpy().astype(np.float64) * 255


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_pool_covers_the_reference_pool():
    assert set(G.PIXEL_OPS) == set(REDDINO_PIXEL_TRANSFORMS)
    assert len(G.PIXEL_OPS) == 33


@pytest.mark.parametrize("name", REDDINO_POOL)
def test_op_keeps_shape_dtype_range_and_changes_the_image(name):
    x = batch()
    out = G.PIXEL_OPS[name](x, gen())
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 1e-4, f"{name} left the image unchanged"


@pytest.mark.parametrize("name", REDDINO_POOL)
def test_op_is_deterministic_for_a_seed_and_runs_on_tiny_crops(name):
    x = batch(4)
    assert torch.equal(G.PIXEL_OPS[name](x, gen(3)), G.PIXEL_OPS[name](x, gen(3)))
    tiny = batch(3, size=16)  # debug=fast local crops
    out = G.PIXEL_OPS[name](tiny, gen())
    assert out.shape == tiny.shape and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_random_ops_draw_per_view_parameters():
    """One view repeated: a per-view draw makes the copies differ (a per-batch draw would not)."""
    x = batch(1).repeat(6, 1, 1, 1)
    for name in ("RandomBrightnessContrast", "RGBShift", "RandomGamma", "HueSaturationValue", "Blur"):
        out = G.PIXEL_OPS[name](x, gen())
        assert not torch.equal(out[0], out[1]) or not torch.equal(out[0], out[2]), name


def _u(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=g))


def _pick(g: torch.Generator, values: tuple[int, ...]) -> int:
    return values[int(torch.randint(0, len(values), (1,), generator=g))]


# (name, albumentations reference at the parameters the op draws from gen(); max |diff| in grey levels).
# The reference re-draws the op's parameters from an identically seeded generator in the op's order.
AGREEMENT: list[tuple[str, Callable[[np.ndarray], np.ndarray], float]] = [
    ("InvertImg", lambda img: A.InvertImg(p=1).apply(img), 1e-3),
    ("Solarize", lambda img: A.Solarize(threshold_range=(0.5, 0.5), p=1).apply(img, threshold=0.5), 1e-3),
    ("Posterize", lambda img: A.Posterize(num_bits=4, p=1).apply(img, num_bits=4), 1e-3),
    ("Equalize", lambda img: A.Equalize(mode="cv", by_channels=True, p=1).apply(img, mask=None), 1e-3),
    (
        "Downscale",
        lambda img: A.Downscale(
            scale_range=(0.25, 0.25),
            interpolation_pair={"downscale": cv2.INTER_NEAREST, "upscale": cv2.INTER_NEAREST},
            p=1,
        ).apply(img, scale=0.25),
        1e-3,
    ),
    (
        "ChannelShuffle",
        lambda img: A.ChannelShuffle(p=1).apply(
            img, channels_shuffled=torch.argsort(torch.rand(1, 3, generator=gen()), 1)[0].tolist()
        ),
        1e-3,
    ),
    (
        "ChannelDropout",
        lambda img: A.ChannelDropout(channel_drop_range=(1, 1), fill=0, p=1).apply(
            img, channels_to_drop=[int(torch.randint(0, 3, (1,), generator=gen()))]
        ),
        1e-3,
    ),
    (
        "RGBShift",
        lambda img: A.RGBShift(p=1).apply(
            img, noise_map=(-20 + 40 * torch.rand(3, generator=gen())).numpy().astype(np.float32)
        ),
        1.0,
    ),
    (
        "RandomBrightnessContrast",
        lambda img: (
            lambda g: A.RandomBrightnessContrast(p=1).apply(
                img, alpha=1 + _u(g, -0.2, 0.2), beta=255 * _u(g, -0.2, 0.2)
            )
        )(gen()),
        1.0,
    ),
    ("RandomGamma", lambda img: A.RandomGamma(p=1).apply(img, gamma=_u(gen(), 80, 120) / 100), 1.0),
    (
        "MultiplicativeNoise",
        lambda img: A.MultiplicativeNoise(p=1).apply(
            img, multiplier=np.array([_u(gen(), 0.9, 1.1)], np.float32)
        ),
        1.0,
    ),
    ("Blur", lambda img: A.Blur(p=1).apply(img, kernel=_pick(gen(), (3, 5, 7))), 1.0),
    ("MedianBlur", lambda img: A.MedianBlur(p=1).apply(img, kernel=_pick(gen(), (3, 5, 7))), 1e-3),
    (
        "GaussianBlur",
        lambda img: A.GaussianBlur(p=1).apply(
            img, kernel=cv2.getGaussianKernel(_pick(gen(), (3, 5, 5, 7, 7)), 0).ravel()
        ),
        1.0,
    ),
    (
        "Sharpen",
        lambda img: (
            lambda g: (
                lambda a, lightness: A.Sharpen(p=1).apply(
                    img,
                    alpha=a,
                    sharpening_matrix=(1 - a) * np.pad([[1.0]], 1)
                    + a * np.array([[-1, -1, -1], [-1, 8 + lightness, -1], [-1, -1, -1]]),
                )
            )(_u(g, 0.2, 0.5), _u(g, 0.5, 1.0))
        )(gen()),
        1.0,
    ),
    (
        "Emboss",
        lambda img: (
            lambda g: (
                lambda a, s: A.Emboss(p=1).apply(
                    img,
                    emboss_matrix=(
                        (1 - a) * np.pad([[1.0]], 1)
                        + a * np.array([[-1 - s, -s, 0], [-s, 1, s], [0, s, 1 + s]])
                    ).astype(np.float32),
                )
            )(_u(g, 0.2, 0.5), _u(g, 0.2, 0.7))
        )(gen()),
        1.0,
    ),
]


@pytest.mark.parametrize(("name", "reference", "tolerance"), AGREEMENT, ids=[a[0] for a in AGREEMENT])
def test_op_agrees_with_albumentations_at_the_drawn_parameters(name, reference, tolerance):
    img = make_image(64, seed=1)
    ours = to_levels(G.PIXEL_OPS[name](to_tensor(img)[None], gen()))
    expected = reference(img).astype(np.float64)
    diff = np.abs(ours - expected)
    assert diff.max() <= tolerance + 1e-3, (
        f"{name}: max diff {diff.max():.3f} levels (mean {diff.mean():.4f})"
    )


def test_close_ops_stay_near_albumentations():
    """Ops following 1.3.1 with simplifications stay close in mean to the albumentations op (~2 levels)."""
    img = make_image(64, seed=2)
    x = to_tensor(img)[None]
    tone = G.random_tone_curve(x, gen())
    g = gen()
    low = float((0.25 + 0.1 * torch.randn(1, generator=g)).clamp(0, 1))
    high = float((0.75 + 0.1 * torch.randn(1, generator=g)).clamp(0, 1))
    ref = A.RandomToneCurve(p=1).apply(img, low_y=low, high_y=high)
    assert np.abs(to_levels(tone) - ref).max() <= 1.0 + 1e-3
    jpeg = to_levels(G.image_compression(x, gen()))
    ref = A.ImageCompression(quality_range=(99, 99), p=1).apply(img, quality=99, image_type=".jpg")
    assert np.abs(jpeg - ref).mean() < 1.5


def test_invert_image_pool_applies_exactly_the_drawn_count():
    """Four slots of an InvertImg-only pool invert four times (identity); three slots invert once."""
    x = batch(3) * 255
    four = G.RedDinoGpuPixelOps(["InvertImg"], 4, (0, 0, 0), (1, 1, 1), seed=0)
    three = G.RedDinoGpuPixelOps(["InvertImg"], 3, (0, 0, 0), (1, 1, 1), seed=0)
    assert torch.allclose(four(x), x / 255, atol=1e-6)
    assert torch.allclose(three(x), 1 - x / 255, atol=1e-6)


def test_slots_apply_the_drawn_ops_in_draw_order():
    pool = G.RedDinoGpuPixelOps(["Solarize", "InvertImg", "Posterize"], 4, MEAN, STD, seed=5)
    x = batch(6)
    g = gen(11)
    draws = pool.draw(6, gen(11), x.device)
    out = pool.apply_pixel_ops(x, g)
    for view in range(6):
        expected = x[view : view + 1]
        for op in draws[view].tolist():
            expected = pool.ops[op](expected, gen())
        assert torch.allclose(out[view : view + 1], expected, atol=1e-6), draws[view]


def test_slot_draw_is_uniform_with_replacement():
    pool = G.RedDinoGpuPixelOps(REDDINO_POOL, 4, MEAN, STD, seed=0)
    n = 33 * 400
    draws = pool.draw(n, gen(0), torch.device("cpu"))
    assert draws.shape == (n, 4) and draws.min() >= 0 and draws.max() <= 32
    counts = torch.bincount(draws.flatten(), minlength=33).double()
    expected = n * 4 / 33
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70, f"draw histogram far from uniform: chi2 {chi2:.1f} (32 dof)"
    repeated = float((torch.tensor([len(set(row)) < 4 for row in draws.tolist()])).double().mean())
    no_repeat = 33 * 32 * 31 * 30 / 33**4  # with replacement some views draw an op twice
    assert abs(repeated - (1 - no_repeat)) < 0.02, repeated


def test_unknown_op_names_it_and_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"Unknown RedDino pixel op\(s\) \['Blurr'\].*known ops: Blur, CLAHE"
    ):
        G.RedDinoGpuPixelOps(["Blur", "Blurr"], 4, MEAN, STD, seed=0)


def test_normalisation_of_uint8_and_float_crops_without_ops():
    pool = G.RedDinoGpuPixelOps(REDDINO_POOL, 0, MEAN, STD, seed=0)
    raw = torch.from_numpy(make_image(32)).permute(2, 0, 1)[None]
    expected = (raw.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(pool(raw), expected, atol=1e-6)
    assert torch.allclose(pool(raw.float()), expected, atol=1e-6)  # the collator's .float() copy


def test_pool_is_reproducible_from_its_seed_and_differs_between_calls():
    x = (batch(8, size=48) * 255).round()
    first = G.RedDinoGpuPixelOps(REDDINO_POOL, 4, MEAN, STD, seed=3)
    second = G.RedDinoGpuPixelOps(REDDINO_POOL, 4, MEAN, STD, seed=3)
    a, b = first(x), second(x)
    assert torch.equal(a, b)
    assert not torch.equal(first(x), a)  # the stream moves on
    assert not torch.equal(G.RedDinoGpuPixelOps(REDDINO_POOL, 4, MEAN, STD, seed=4)(x), a)


def reddino(pixel_ops_device: str) -> RedDinoAugmentation:
    return RedDinoAugmentation(
        global_size=32,
        local_size=16,
        global_scale=(0.32, 1.0),
        local_scale=(0.05, 0.32),
        n_global=2,
        n_local=1,
        crop_ratio=(3 / 4, 4 / 3),
        n_pixel_ops=4,
        flip_p=0.85,
        pixel_transforms=REDDINO_POOL,
        mean=MEAN,
        std=STD,
        seed=0,
        pixel_ops_device=pixel_ops_device,
    )


def test_gpu_mode_loader_only_crops_and_returns_uint8():
    image = make_image(64)
    cpu, gpu = reddino("cpu"), reddino("gpu")
    assert cpu.device_transform() is None
    device_part = gpu.device_transform()
    assert isinstance(device_part, G.RedDinoGpuPixelOps)
    assert device_part.names == tuple(REDDINO_POOL) and device_part.n_pixel_ops == 4
    assert device_part.mean == MEAN and device_part.std == STD and device_part.seed == 0
    sample = gpu(image)
    assert [t.shape for t in sample["global_crops"]] == [(3, 32, 32)] * 2
    assert [t.shape for t in sample["local_crops"]] == [(3, 16, 16)]
    assert all(t.dtype == torch.uint8 for t in sample["global_crops"] + sample["local_crops"])
    assert cpu(image)["global_crops"][0].dtype == torch.float32
    with pytest.raises(ValueError, match="pixel_ops_device"):
        reddino("tpu")


def datamodule(gpu_transform: G.RedDinoGpuPixelOps | None) -> PretrainDataModule:
    return PretrainDataModule(
        units=pd.DataFrame({"source": ["a", "b"]}),
        transform=lambda image: image,
        collate_fn=lambda samples: {},
        batch_size=1,
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
        image_cache_size=0,
        source_weighting="natural",
        seed=0,
        gpu_transform=gpu_transform,
    )


def crops_batch(with_local: bool) -> dict[str, object]:
    global_crops = torch.from_numpy(np.stack([make_image(32, s) for s in range(4)])).permute(0, 3, 1, 2)
    local = torch.from_numpy(np.stack([make_image(16, s) for s in range(2)])).permute(0, 3, 1, 2)
    return {
        "global_crops": global_crops.float(),  # as SSLCollator hands them over
        "local_crops": local.float() if with_local else None,
        "masks": torch.zeros(4, 4, dtype=torch.bool),
        "n_images": 4,
    }


def test_datamodule_hook_is_a_no_op_without_gpu_transform():
    batch_in = crops_batch(True)
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch_in.items()}
    out = datamodule(None).on_after_batch_transfer(batch_in, 0)
    for key, value in expected.items():
        assert torch.equal(out[key], value) if isinstance(value, torch.Tensor) else out[key] == value


@pytest.mark.parametrize("with_local", [True, False])
def test_datamodule_hook_normalises_every_crop_without_a_trainer(with_local):
    no_ops = G.RedDinoGpuPixelOps(REDDINO_POOL, 0, MEAN, STD, seed=0)
    batch_in = crops_batch(with_local)
    raw_global, raw_local = batch_in["global_crops"].clone(), batch_in["local_crops"]
    out = datamodule(no_ops).on_after_batch_transfer(batch_in, 0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(out["global_crops"], (raw_global / 255 - mean) / std, atol=1e-6)
    if with_local:
        assert torch.allclose(out["local_crops"], (raw_local / 255 - mean) / std, atol=1e-6)
    else:
        assert out["local_crops"] is None
    assert out["n_images"] == 4 and not out["masks"].any()
    full = datamodule(G.RedDinoGpuPixelOps(REDDINO_POOL, 4, MEAN, STD, seed=0))
    augmented = full.on_after_batch_transfer(crops_batch(with_local), 0)["global_crops"]
    assert augmented.dtype == torch.float32 and not torch.allclose(augmented, out["global_crops"])


def test_reddino_gpu_config_composes_and_a_tiny_pretraining_step_runs(make_cfg):
    from reddino.workflows.pretraining import build_training, run

    cfg = make_cfg("debug=fast", "augment=reddino_gpu", "report.enabled=false", "ssl.optim.epochs=1")
    assert cfg.augment.pixel_ops_device == "gpu"
    assert list(cfg.augment.pixel_transforms) == REDDINO_POOL
    assert make_cfg("debug=fast", "augment=reddino").augment.pixel_ops_device == "cpu"
    datamodule, _, _ = build_training(cfg)
    assert isinstance(datamodule.gpu_transform, G.RedDinoGpuPixelOps)
    assert isinstance(instantiate(cfg.augment), RedDinoAugmentation)
    summary = run(cfg)
    assert summary["steps"] == cfg.ssl.optim.total_steps
    losses = pd.read_csv(cfg.paths.output_dir + "/csv/metrics.csv")["train/loss"].dropna()
    assert len(losses) > 0 and np.isfinite(losses.to_numpy()).all()
    assert math.isfinite(float(losses.iloc[-1]))
