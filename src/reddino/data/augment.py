"""Multi-crop augmentations for DINOv2-style pretraining: RedDino's albumentations recipe and DINOv2's.

Both pipelines run on albumentations 2.x but reproduce the behaviour of the originals:

* RedDino (docs/reference_augmentation.md §1-§3) was written against albumentations 1.3.1. Under 2.x
  its ``A.SomeOf(n=4)`` silently changed meaning (no replacement, uniform pick sorted into list order,
  each pick then applied with its own p) and several pixel transforms changed defaults or argument
  names (docs/measured_costs.md §5). :class:`SomeOfWithReplacement` and
  :func:`reddino_pixel_transforms` restore the 1.3.1 behaviour.
* DINOv2 (docs/reference_augmentation.md §5) was written with torchvision; :class:`DinoV2Augmentation`
  maps every step to an albumentations equivalent so both recipes share one RNG and seeding story.

Seeding. A 2.x ``A.Compose(seed=s)`` hands the SAME seed to every child, so sibling transforms draw
identical random streams (HorizontalFlip and VerticalFlip with equal p then fire together on every
call). The augmentation classes here therefore seed every node of every pipeline from its own
``numpy.random.SeedSequence`` child (:func:`seed_independently`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.blur import functional as fblur
from albumentations.core.composition import BaseCompose
from albumentations.pytorch import ToTensorV2

from reddino.data.gpu_augment import RedDinoGpuPixelOps

# Weight of each pixel transform inside SomeOfWithReplacement. RedDino built every transform with
# p=0.85; under 1.3.1 SomeOf semantics p only weights the draw (equal for all -> uniform draw) and the
# drawn transform is force-applied, so the value itself never acts as a probability.
PIXEL_TRANSFORM_P = 0.85


class SomeOfWithReplacement(BaseCompose):
    """albumentations 1.3.1 ``SomeOf(transforms, n, replace=True)`` for albumentations 2.x.

    Per call (when the block itself fires, probability ``p``): draw ``n`` indices WITH replacement,
    weighted by the transforms' ``p`` normalised to sum 1, then apply the drawn transforms in draw
    order with ``force_apply=True`` (their own ``p`` is only a weight). Duplicates are possible.
    The draw uses this composition's ``random_generator`` / ``py_random``, so ``seed=`` on an
    enclosing ``A.Compose`` (or :func:`seed_independently`) makes it deterministic.
    """

    def __init__(self, transforms: Sequence[A.BasicTransform | BaseCompose], n: int, p: float = 1.0):
        super().__init__(transforms=list(transforms), p=p)
        if n < 0:
            raise ValueError(f"SomeOfWithReplacement: n must be >= 0, got {n}")
        self.n = n
        self.transforms_ps = _normalised_weights([t.p for t in self.transforms])

    def __call__(self, *args: Any, force_apply: bool = False, **data: Any) -> dict[str, Any]:
        """Apply ``n`` weighted draws (with replacement) of the transforms, each force-applied."""
        if args:
            raise KeyError("You have to pass data to augmentations as named arguments, e.g. aug(image=image)")
        if self.replay_mode:
            for t in self.transforms:
                data = t(**data)
                data = self.check_data_post_transform(data)
            return data
        if not self.transforms or self.n == 0:
            return data
        if not (force_apply or self.py_random.random() < self.p):
            return data
        for i in self.draw_indices():
            t = self.transforms[i]
            data = t(force_apply=True, **data)
            self._track_transform_params(t, data)
            data = self.check_data_post_transform(data)
        return data

    def draw_indices(self) -> np.ndarray:
        """The ``n`` transform indices for one call, in application order (unsorted, repeats allowed)."""
        return self.random_generator.choice(
            len(self.transforms), size=self.n, replace=True, p=self.transforms_ps
        )

    def to_dict_private(self) -> dict[str, Any]:
        """Serialise like the other compositions, adding ``n`` so ``A.from_dict`` can rebuild it."""
        dictionary = super().to_dict_private()
        dictionary["n"] = self.n
        return dictionary


def _normalised_weights(ps: Sequence[float]) -> np.ndarray:
    weights = np.asarray(ps, dtype=np.float64)
    if weights.size == 0:
        return weights
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"SomeOfWithReplacement: transform p values must be >= 0 with a positive sum, got {ps}"
        )
    return weights / weights.sum()


def seed_independently(node: A.BasicTransform | BaseCompose, seed: np.random.SeedSequence) -> None:
    """Give ``node`` and, recursively, every transform under it its own random streams from ``seed``.

    Unlike ``BaseCompose.set_random_seed`` (one seed copied to every child, hence correlated draws),
    each node gets a distinct child of the SeedSequence, so the result is deterministic AND the
    transforms' decisions are independent of each other.
    """
    node.set_random_seed(int(seed.generate_state(1, dtype=np.uint64)[0]))
    if isinstance(node, BaseCompose):
        for child, child_seed in zip(node.transforms, seed.spawn(len(node.transforms)), strict=True):
            seed_independently(child, child_seed)


class GaussianBlur131(A.GaussianBlur):
    """``GaussianBlur`` with albumentations 1.3.1 sampling: odd ksize, sigma 0 meaning 'from ksize'.

    1.3.1 drew ``ksize = randrange(lo, hi + 1)`` and bumped an even draw to ``(ksize + 1) % (hi + 1)``
    (so for (3, 7): P(3)=0.2, P(5)=0.4, P(7)=0.4), and with its default ``sigma_limit=0`` let OpenCV
    derive the kernel from ksize (``cv2.getGaussianKernel(ksize, 0)``: the fixed binomial kernels
    for ksize <= 7). 2.x samples ksize uniformly with ``randint`` (an even draw is widened by one)
    and divides by sigma, so a zero sigma yields NaN: its arguments cannot express the 1.3.1 default.
    """

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Draw ksize and sigma as 1.3.1 did and build the separable 1-D kernel."""
        low, high = self.blur_limit
        ksize = self.py_random.randrange(low, high + 1)
        if ksize != 0 and ksize % 2 != 1:
            ksize = (ksize + 1) % (high + 1)
        sigma = self.py_random.uniform(*self.sigma_limit)
        if sigma <= 0:
            kernel = cv2.getGaussianKernel(ksize, 0).ravel()
        else:
            kernel = fblur.create_gaussian_kernel_1d(sigma, ksize)
        return {"kernel": kernel}


class RandomRainFitted(A.RandomRain):
    """``RandomRain`` whose drops are shortened to fit images shorter than ``drop_length``.

    With 1.3.1's ``drop_length=20`` both 1.3.1 and 2.x raise on images of height <= 20 (the drop
    start row is drawn from an empty range). Small crops (tiny test/debug configs) would then crash
    whenever RandomRain is drawn; here the drop length is capped at ``height - 1`` instead. Images
    taller than ``drop_length`` are unaffected.
    """

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Cap the drop length for short images, otherwise defer to RandomRain."""
        height = params["shape"][0]
        if self.drop_length is None or height > self.drop_length:
            return super().get_params_dependent_on_data(params, data)
        configured = self.drop_length
        self.drop_length = max(1, height - 1)
        try:
            return super().get_params_dependent_on_data(params, data)
        finally:
            self.drop_length = configured


class RandomFog131(A.RandomFog):
    """``RandomFog`` with the albumentations 1.3.1 algorithm (same parameters, far cheaper than 2.x).

    2.x kept the parameters but redraws fog as hundreds of full-image circle blends, a count that
    does not shrink with the image (docs/measured_costs.md §4: 69 ms at 224 px versus 1.6 ms in 1.3.1,
    the largest single share of the colour-op cost). This restores
    1.3.1: rings of haze points spreading out from the centre, each a white disc of diameter
    ``hw = (width // 3) * fog_coef`` blended with ``alpha_coef * fog_coef``, then a box blur.
    One guard: the ring step is at least one pixel (1.3.1 loops forever when it rounds to zero,
    which needs a very tall, narrow image).
    """

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Draw the fog coefficient and the haze centres exactly as 1.3.1 did."""
        fog_coef = self.py_random.uniform(*self.fog_coef_range)
        height, width = params["shape"][:2]
        hw = max(1, int(width // 3 * fog_coef))
        step_x = max(1, 3 * hw * width // (height + width))
        step_y = max(1, 3 * hw * height // (height + width))
        haze: list[tuple[int, int]] = []
        mid_x, mid_y, ring = width // 2 - 2 * hw, height // 2 - hw, 1
        while mid_x > -hw or mid_y > -hw:
            for _ in range(hw // 10 * ring):
                x = self.py_random.randint(mid_x, width - mid_x - hw)
                y = self.py_random.randint(mid_y, height - mid_y - hw)
                haze.append((x, y))
            mid_x, mid_y, ring = mid_x - step_x, mid_y - step_y, ring + 1
        return {"fog_coef": fog_coef, "haze_list": haze}

    def apply(
        self, img: np.ndarray, fog_coef: float, haze_list: list[tuple[int, int]], **params: Any
    ) -> np.ndarray:
        """Blend one white disc per haze point into the image, then box-blur (1.3.1 ``add_fog``)."""
        hw = max(int(img.shape[1] // 3 * fog_coef), 10)
        alpha = self.alpha_coef * fog_coef
        for x, y in haze_list:
            overlay = img.copy()
            cv2.circle(overlay, (x + hw // 2, y + hw // 2), hw // 2, (255, 255, 255), -1)
            img = cv2.addWeighted(overlay, alpha, img, 1 - alpha, 0)
        return cv2.blur(img, (hw // 10, hw // 10))


class QuarterTurn(A.RandomRotate90):
    """Rotate by exactly 90 degrees counter-clockwise (``np.rot90`` k=1) with probability ``p``.

    torchvision's ``RandomApply([RandomRotation((90, 90))], p)`` used by the DINOv2 / DinoBloom
    recipe; ``A.RandomRotate90`` would instead pick a random multiple of 90 degrees.
    """

    def get_params(self) -> dict[str, int]:
        """Always one quarter turn."""
        return {"factor": 1}


# The 33 colour/pixel transforms of RedDino's colour pool (docs/reference_augmentation.md §2), in the
# reference order, each with the albumentations 1.3.1 default parameters restored under 2.x
# (comments: 1.3.1 -> 2.x).
_PIXEL_FACTORIES: dict[str, Callable[[float], A.BasicTransform]] = {
    "Blur": lambda p: A.Blur(blur_limit=(3, 7), p=p),
    "CLAHE": lambda p: A.CLAHE(clip_limit=4.0, tile_grid_size=(8, 8), p=p),
    "ChannelShuffle": lambda p: A.ChannelShuffle(p=p),
    # fill_value -> fill
    "ChannelDropout": lambda p: A.ChannelDropout(channel_drop_range=(1, 1), fill=0, p=p),
    # 1.3.1 hue default 0.2; 2.x default (-0.5, 0.5)
    "ColorJitter": lambda p: A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2, p=p),
    "Defocus": lambda p: A.Defocus(radius=(3, 10), alias_blur=(0.1, 0.5), p=p),
    # scale_min/scale_max -> scale_range; interpolation None -> nearest both ways in both versions
    "Downscale": lambda p: A.Downscale(
        scale_range=(0.25, 0.25),
        interpolation_pair={"downscale": cv2.INTER_NEAREST, "upscale": cv2.INTER_NEAREST},
        p=p,
    ),
    "Emboss": lambda p: A.Emboss(alpha=(0.2, 0.5), strength=(0.2, 0.7), p=p),
    "Equalize": lambda p: A.Equalize(mode="cv", by_channels=True, p=p),
    "FancyPCA": lambda p: A.FancyPCA(alpha=0.1, p=p),
    # var_limit (10, 50) px^2 -> std_range in [0, 1] units of 255 (2.x default is ~16x stronger)
    "GaussNoise": lambda p: A.GaussNoise(
        std_range=(math.sqrt(10.0) / 255.0, math.sqrt(50.0) / 255.0),
        mean_range=(0.0, 0.0),
        per_channel=True,
        noise_scale_factor=1.0,
        p=p,
    ),
    # blur_limit (3, 7), sigma 0 = derived from ksize: not expressible with 2.x arguments
    "GaussianBlur": lambda p: GaussianBlur131(blur_limit=(3, 7), sigma_limit=0, p=p),
    "GlassBlur": lambda p: A.GlassBlur(sigma=0.7, max_delta=4, iterations=2, mode="fast", p=p),
    "HueSaturationValue": lambda p: A.HueSaturationValue(
        hue_shift_limit=20, sat_shift_limit=30, val_shift_limit=20, p=p
    ),
    "ISONoise": lambda p: A.ISONoise(color_shift=(0.01, 0.05), intensity=(0.1, 0.5), p=p),
    # quality_lower/upper -> quality_range
    "ImageCompression": lambda p: A.ImageCompression(compression_type="jpeg", quality_range=(99, 100), p=p),
    "InvertImg": lambda p: A.InvertImg(p=p),
    "MedianBlur": lambda p: A.MedianBlur(blur_limit=(3, 7), p=p),
    "MotionBlur": lambda p: A.MotionBlur(blur_limit=(3, 7), allow_shifted=True, p=p),
    "MultiplicativeNoise": lambda p: A.MultiplicativeNoise(
        multiplier=(0.9, 1.1), per_channel=False, elementwise=False, p=p
    ),
    "Posterize": lambda p: A.Posterize(num_bits=4, p=p),
    "RandomBrightnessContrast": lambda p: A.RandomBrightnessContrast(
        brightness_limit=0.2, contrast_limit=0.2, brightness_by_max=True, ensure_safe_range=False, p=p
    ),
    "RGBShift": lambda p: A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=p),
    "RandomGamma": lambda p: A.RandomGamma(gamma_limit=(80, 120), p=p),
    # slant_lower/upper -> slant_range; drop_length 20 -> None (auto) in 2.x; rain_type None -> "default"
    "RandomRain": lambda p: RandomRainFitted(
        slant_range=(-10, 10),
        drop_length=20,
        drop_width=1,
        drop_color=(200, 200, 200),
        blur_value=7,
        brightness_coefficient=0.7,
        rain_type="default",
        p=p,
    ),
    # num_shadows_lower/upper -> num_shadows_limit; 1.3.1 halved HLS lightness, 2.x scales RGB by
    # 1 - intensity: 0.5 is the matching strength
    "RandomShadow": lambda p: A.RandomShadow(
        shadow_roi=(0, 0.5, 1, 1),
        num_shadows_limit=(1, 2),
        shadow_dimension=5,
        shadow_intensity_range=(0.5, 0.5),
        p=p,
    ),
    # snow_point_lower/upper -> snow_point_range; 1.3.1 algorithm = method "bleach"
    "RandomSnow": lambda p: A.RandomSnow(
        snow_point_range=(0.1, 0.3), brightness_coeff=2.5, method="bleach", p=p
    ),
    # angle_/num_flare_circles_lower/upper -> *_range; 1.3.1 algorithm = method "overlay"
    "RandomSunFlare": lambda p: A.RandomSunFlare(
        flare_roi=(0, 0, 1, 0.5),
        src_radius=400,
        src_color=(255, 255, 255),
        angle_range=(0, 1),
        num_flare_circles_range=(6, 10),
        method="overlay",
        p=p,
    ),
    "RandomToneCurve": lambda p: A.RandomToneCurve(scale=0.1, per_channel=False, p=p),
    # fog_coef_lower/upper -> fog_coef_range; 1.3.1 fog algorithm (2.x draws it ~30x more slowly)
    "RandomFog": lambda p: RandomFog131(fog_coef_range=(0.3, 1.0), alpha_coef=0.08, p=p),
    "RingingOvershoot": lambda p: A.RingingOvershoot(blur_limit=(7, 15), cutoff=(np.pi / 4, np.pi / 2), p=p),
    "Sharpen": lambda p: A.Sharpen(alpha=(0.2, 0.5), lightness=(0.5, 1.0), method="kernel", p=p),
    # threshold 128 -> threshold_range in [0, 1]: 0.5 * 255 = 127.5 inverts exactly the pixels >= 128
    "Solarize": lambda p: A.Solarize(threshold_range=(0.5, 0.5), p=p),
}

REDDINO_PIXEL_TRANSFORMS: tuple[str, ...] = tuple(_PIXEL_FACTORIES)


def reddino_pixel_transforms(names: Sequence[str]) -> list[A.BasicTransform]:
    """Build RedDino colour/pixel transforms by albumentations class name, with 1.3.1 defaults.

    Each is built with ``p = PIXEL_TRANSFORM_P`` (0.85, as in the reference), which under
    :class:`SomeOfWithReplacement` is only a draw weight. Repeated names are built repeatedly (and so
    weigh more in the draw). Unknown names raise ``ValueError`` listing the valid ones.
    """
    _check_pixel_names(names)
    return [_PIXEL_FACTORIES[name](PIXEL_TRANSFORM_P) for name in names]


def _check_pixel_names(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in _PIXEL_FACTORIES]
    if unknown:
        raise ValueError(
            f"Unknown RedDino pixel transform(s) {unknown}; "
            f"valid names: {', '.join(REDDINO_PIXEL_TRANSFORMS)}"
        )


def _as_pair(values: Sequence[float], what: str) -> tuple[float, float]:
    pair = tuple(float(v) for v in values)
    if len(pair) != 2:
        raise ValueError(f"{what} must have exactly 2 values, got {list(values)}")
    return pair  # type: ignore[return-value]


def _as_triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    triple = tuple(float(v) for v in values)
    if len(triple) != 3:
        raise ValueError(f"{what} must have exactly 3 values (one per RGB channel), got {list(values)}")
    return triple  # type: ignore[return-value]


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(
            f"augmentation expects an HxWx3 uint8 RGB numpy array, got shape {shape} dtype {dtype}"
        )


class _MultiCrop:
    """Shared call/seed logic: an optional whole-image preparation, then one Compose per view."""

    def __init__(
        self,
        prepare: A.Compose | None,
        global_views: list[A.Compose],
        local_views: list[A.Compose],
        seed: int | None,
    ):
        self._prepare = prepare
        self._global_views = global_views
        self._local_views = local_views
        self._seed_all(np.random.SeedSequence(seed))

    def reseed(self, seed: int) -> None:
        """Reseed every view's pipeline from ``seed``: distinct, independent streams per view and per
        transform, reproducible for the same ``seed`` (call it from DataLoader ``worker_init_fn`` with
        a per-worker seed, otherwise forked workers replay identical augmentations)."""
        self._seed_all(np.random.SeedSequence(seed))

    def _seed_all(self, root: np.random.SeedSequence) -> None:
        views = self._global_views + self._local_views
        for view, view_seed in zip(views, root.spawn(len(views)), strict=True):
            seed_independently(view, view_seed)

    def device_transform(self) -> RedDinoGpuPixelOps | None:
        """The part of the augmentation that runs on the training device after the batch is moved there
        (``PretrainDataModule.gpu_transform``); None when everything happens in the loader."""
        return None

    def __call__(self, image: np.ndarray) -> dict[str, list[torch.Tensor]]:
        """HxWx3 uint8 RGB -> {"global_crops": [3xGxG], "local_crops": [3xLxL]}: normalised float32, or
        raw uint8 when the pixel ops run on the device (:meth:`device_transform`)."""
        _check_image(image)
        base = self._prepare(image=image)["image"] if self._prepare is not None else image
        return {
            "global_crops": [view(image=base)["image"] for view in self._global_views],
            "local_crops": [view(image=base)["image"] for view in self._local_views],
        }


class RedDinoAugmentation(_MultiCrop):
    """RedDino's multi-crop albumentations pipeline (docs/reference_augmentation.md §1-§3) with 1.3.1
    semantics.

    Flow: resize the whole unit to ``global_size`` (bilinear); per global view RandomResizedCrop
    (``global_scale``, aspect ``crop_ratio``: 3/4-4/3 in the reference, bilinear) -> ``n_pixel_ops``
    colour/pixel ops drawn with replacement and force-applied (:class:`SomeOfWithReplacement`) ->
    HorizontalFlip, VerticalFlip, RandomRotate90 each independently with ``flip_p`` -> Normalize(mean,
    std, max 255) -> CHW float tensor. Local views: RandomResizedCrop(``local_size``, ``local_scale``) of
    the same resized image, then the same pixel ops, geometry and normalisation. ``n_local = 0`` builds no
    local pipeline; an empty ``pixel_transforms`` (or ``n_pixel_ops = 0``) means no colour/pixel ops.

    Deviation from the reference: we feed RGB. The reference read images with ``cv2.imread`` and never
    converted them, so it applied the ImageNet RGB mean/std (and the channel-aware colour ops) to BGR arrays
    while evaluating on RGB (docs/reference_augmentation.md §4). Here training and evaluation are both RGB.
    Residual differences to 1.3.1 that arguments cannot restore (same parameters, changed algorithm in 2.x):
    MotionBlur kernel shapes, RandomRain drop count, RandomShadow darkening (RGB instead of HLS lightness),
    RandomSunFlare rendering; GaussNoise draws its std uniformly where 1.3.1 drew the variance. RandomFog and
    GaussianBlur do follow 1.3.1 (:class:`RandomFog131`, :class:`GaussianBlur131`).

    ``pixel_ops_device``: "cpu" runs everything above here. "gpu" moves the colour/pixel ops and the
    normalisation to the training device: the views are only cropped, flipped and rotated and come out
    as uint8 CHW tensors, and :meth:`device_transform` builds the batched torch pool
    (:class:`reddino.data.gpu_augment.RedDinoGpuPixelOps`) that ``PretrainDataModule`` applies after the
    host-to-device copy. The pixel ops then see the views after the flips and rotations (only the
    position-dependent ones, RandomSunFlare, RandomShadow and RandomRain, notice).
    """

    PIXEL_OPS_DEVICES = ("cpu", "gpu")

    def __init__(
        self,
        global_size: int,
        local_size: int,
        global_scale: Sequence[float],
        local_scale: Sequence[float],
        n_global: int,
        n_local: int,
        crop_ratio: Sequence[float],
        n_pixel_ops: int,
        flip_p: float,
        pixel_transforms: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        seed: int | None,
        pixel_ops_device: str,
    ):
        if n_global < 1 or n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global} and {n_local}")
        if pixel_ops_device not in self.PIXEL_OPS_DEVICES:
            raise ValueError(
                f"pixel_ops_device must be one of {self.PIXEL_OPS_DEVICES}, got {pixel_ops_device!r}"
            )
        names = [str(name) for name in pixel_transforms]
        _check_pixel_names(names)
        self.n_pixel_ops = n_pixel_ops
        self.pixel_transform_names = tuple(names)
        self.pixel_ops_device = pixel_ops_device
        self._mean = _as_triple(mean, "mean")
        self._std = _as_triple(std, "std")
        self._seed = seed
        g_scale = _as_pair(global_scale, "global_scale")
        l_scale = _as_pair(local_scale, "local_scale")
        self._ratio = _as_pair(crop_ratio, "crop_ratio")
        finish = _reddino_finish(flip_p, None if pixel_ops_device == "gpu" else (self._mean, self._std))
        super().__init__(
            prepare=A.Compose([A.Resize(global_size, global_size, interpolation=cv2.INTER_LINEAR)]),
            global_views=[self._view(global_size, g_scale, finish) for _ in range(n_global)],
            local_views=[self._view(local_size, l_scale, finish) for _ in range(n_local)],
            seed=seed,
        )

    def _view(
        self, size: int, scale: tuple[float, float], finish: Callable[[], list[A.BasicTransform]]
    ) -> A.Compose:
        crop = A.RandomResizedCrop(
            size=(size, size), scale=scale, ratio=self._ratio, interpolation=cv2.INTER_LINEAR, p=1.0
        )
        if self.pixel_ops_device == "gpu":
            return A.Compose([crop, *finish()])
        pixel = SomeOfWithReplacement(
            reddino_pixel_transforms(self.pixel_transform_names), n=self.n_pixel_ops
        )
        return A.Compose([crop, pixel, *finish()])

    def device_transform(self) -> RedDinoGpuPixelOps | None:
        """With ``pixel_ops_device: gpu``, a fresh batched pool with this augmentation's ops, count,
        normalisation and seed; None otherwise."""
        if self.pixel_ops_device != "gpu":
            return None
        return RedDinoGpuPixelOps(
            pixel_transforms=self.pixel_transform_names,
            n_pixel_ops=self.n_pixel_ops,
            mean=self._mean,
            std=self._std,
            seed=self._seed,
        )


def _reddino_finish(
    flip_p: float, normalise: tuple[tuple[float, float, float], tuple[float, float, float]] | None
) -> Callable[[], list[A.BasicTransform]]:
    """Factory of fresh (unshared) geometric transforms for one RedDino view, then the ImageNet
    normalisation (``normalise`` = (mean, std)) or, with None, none: uint8 CHW out, the loader's share
    with ``pixel_ops_device: gpu``."""

    def build() -> list[A.BasicTransform]:
        flips = [A.HorizontalFlip(p=flip_p), A.VerticalFlip(p=flip_p), A.RandomRotate90(p=flip_p)]
        if normalise is None:
            return [*flips, ToTensorV2()]
        mean, std = normalise
        return [*flips, A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]

    return build


class DinoV2Augmentation(_MultiCrop):
    """DINOv2's torchvision multi-crop recipe (docs/reference_augmentation.md §5, RedDino's "default"
    option, as used by DinoBloom) rebuilt with albumentations equivalents.

    Per view: RandomResizedCrop straight from the input (no prior resize; aspect ``crop_ratio``, bicubic)
    -> HorizontalFlip(``hflip_p``) -> VerticalFlip(``vflip_p``) -> rotation by exactly 90 degrees with
    ``rot90_p`` -> ColorJitter(``color_jitter``) with ``color_jitter_p`` -> grayscale with
    ``grayscale_p`` -> Gaussian blur -> [solarize] -> Normalize(mean, std) -> CHW float tensor.
    Blur and solarize probabilities are per global view (``global_blur_p[i]``, ``global_solarize_p[i]``;
    DINOv2: [1.0, 0.1] and [0.0, 0.2]) and ``local_blur_p`` (0.5) for every local view.

    torchvision -> albumentations mapping:
      RandomResizedCrop(bicubic) -> A.RandomResizedCrop(interpolation=cv2.INTER_CUBIC); torchvision on
        PIL antialiases when downscaling, cv2 bicubic does not.
      RandomHorizontalFlip / RandomVerticalFlip -> A.HorizontalFlip / A.VerticalFlip.
      RandomApply([RandomRotation((90, 90))], p) -> QuarterTurn(p) (fixed counter-clockwise quarter turn).
      RandomApply([ColorJitter(b, c, s, h)], p) -> A.ColorJitter(b, c, s, h, p); same factor ranges and
        random op order, albumentations' torchvision-compatible colour functions.
      RandomGrayscale(p) -> A.ToGray(3 channels, "weighted_average" = ITU-R 601 luma, p).
      dinov2 GaussianBlur(p) (kernel 9, sigma 0.1-2) -> A.GaussianBlur(blur_limit 9, sigma_limit, p).
        Upstream wraps it in RandomApply with 1 - p (docs/reference_augmentation.md §5), so it really
        blurs global view 1 never, global view 2 with 0.9 and locals with 0.5. We implement the
        INTENDED probabilities.
      RandomSolarize(128, p) -> A.Solarize(threshold_range (0.5, 0.5), p): inverts pixels >= 128.
      ToTensor + Normalize -> A.Normalize(mean, std, max_pixel_value 255) + ToTensorV2.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        global_scale: Sequence[float],
        local_scale: Sequence[float],
        n_global: int,
        n_local: int,
        crop_ratio: Sequence[float],
        color_jitter: Sequence[float],
        color_jitter_p: float,
        grayscale_p: float,
        global_blur_p: Sequence[float],
        global_solarize_p: Sequence[float],
        local_blur_p: float,
        blur_kernel_size: int,
        blur_sigma: Sequence[float],
        hflip_p: float,
        vflip_p: float,
        rot90_p: float,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int | None,
    ):
        if n_global < 1 or n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global} and {n_local}")
        if len(global_blur_p) != n_global or len(global_solarize_p) != n_global:
            raise ValueError(
                f"global_blur_p and global_solarize_p need one probability per global view (n_global="
                f"{n_global}), got {list(global_blur_p)} and {list(global_solarize_p)}"
            )
        jitter = tuple(float(v) for v in color_jitter)
        if len(jitter) != 4:
            raise ValueError(
                f"color_jitter must be (brightness, contrast, saturation, hue), got {list(color_jitter)}"
            )
        self._jitter = jitter
        self._color_jitter_p = color_jitter_p
        self._grayscale_p = grayscale_p
        self._blur_kernel_size = blur_kernel_size
        self._blur_sigma = _as_pair(blur_sigma, "blur_sigma")
        self._flips = (hflip_p, vflip_p, rot90_p)
        self._mean = _as_triple(mean, "mean")
        self._std = _as_triple(std, "std")
        g_scale = _as_pair(global_scale, "global_scale")
        l_scale = _as_pair(local_scale, "local_scale")
        self._ratio = _as_pair(crop_ratio, "crop_ratio")
        super().__init__(
            prepare=None,
            global_views=[
                self._view(global_size, g_scale, float(blur_p), float(sol_p))
                for blur_p, sol_p in zip(global_blur_p, global_solarize_p, strict=True)
            ],
            local_views=[self._view(local_size, l_scale, float(local_blur_p), 0.0) for _ in range(n_local)],
            seed=seed,
        )

    def _view(self, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> A.Compose:
        brightness, contrast, saturation, hue = self._jitter
        hflip_p, vflip_p, rot90_p = self._flips
        return A.Compose(
            [
                A.RandomResizedCrop(
                    size=(size, size), scale=scale, ratio=self._ratio, interpolation=cv2.INTER_CUBIC, p=1.0
                ),
                A.HorizontalFlip(p=hflip_p),
                A.VerticalFlip(p=vflip_p),
                QuarterTurn(p=rot90_p),
                A.ColorJitter(
                    brightness=brightness,
                    contrast=contrast,
                    saturation=saturation,
                    hue=hue,
                    p=self._color_jitter_p,
                ),
                A.ToGray(num_output_channels=3, method="weighted_average", p=self._grayscale_p),
                A.GaussianBlur(
                    blur_limit=(self._blur_kernel_size, self._blur_kernel_size),
                    sigma_limit=self._blur_sigma,
                    p=blur_p,
                ),
                A.Solarize(threshold_range=(0.5, 0.5), p=solarize_p),
                A.Normalize(mean=self._mean, std=self._std, max_pixel_value=255.0),
                ToTensorV2(),
            ]
        )


__all__ = [
    "PIXEL_TRANSFORM_P",
    "REDDINO_PIXEL_TRANSFORMS",
    "DinoV2Augmentation",
    "GaussianBlur131",
    "QuarterTurn",
    "RandomFog131",
    "RandomRainFitted",
    "RedDinoAugmentation",
    "SomeOfWithReplacement",
    "reddino_pixel_transforms",
    "seed_independently",
]
