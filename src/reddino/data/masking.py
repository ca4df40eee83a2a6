"""iBOT block masking and the SSL batch collator (DINOv2 `data/masking.py` + `data/collate.py` semantics).

Randomness always comes from an explicit `random.Random`, so batches are reproducible from a seed and
each DataLoader worker can own an independent stream (see `SSLCollator.reseed`).
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

_ATTEMPTS_PER_BLOCK = 10  # fixed in the reference `_mask`


class MaskingGenerator:
    """Draws rectangular blocks of patches until a requested number of patches is masked."""

    def __init__(
        self,
        input_size: tuple[int, int],
        max_num_patches: int,
        min_num_patches: int,
        min_aspect: float,
        max_aspect: float | None,
    ) -> None:
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.max_num_patches = int(max_num_patches)
        self.min_num_patches = int(min_num_patches)
        # `max_aspect or 1/min_aspect` mirrors the reference (None or 0 -> symmetric range).
        upper = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(upper))

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def _add_block(self, mask: np.ndarray, budget: int, rng: random.Random) -> int:
        """Try up to 10 times to place one block that adds between 1 and `budget` new patches."""
        for _ in range(_ATTEMPTS_PER_BLOCK):
            target_area = rng.uniform(self.min_num_patches, budget)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if not (w < self.width and h < self.height):
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            window = mask[top : top + h, left : left + w]
            new_patches = h * w - int(window.sum())
            if 0 < new_patches <= budget:
                window[...] = True
                return new_patches
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> np.ndarray:
        """Return a (H, W) bool mask with at most `num_masking_patches` True entries."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


def _stack_crop_major(samples: list[dict[str, Any]], key: str) -> torch.Tensor | None:
    """Stack crop j of every sample before crop j+1, the order the loss code expects.

    uint8 crops (pixel ops on the device, ``augment=reddino_gpu``) stay uint8: a quarter of the bytes
    through pinned memory and the host-to-device copy. Everything else is float32."""
    n_crops = len(samples[0][key])
    if n_crops == 0:
        return None
    for s in samples:
        if len(s[key]) != n_crops:
            raise ValueError(f"every sample needs {n_crops} {key}, got {len(s[key])}")
    crops = torch.stack([s[key][j] for j in range(n_crops) for s in samples])
    return crops if crops.dtype == torch.uint8 else crops.float()


class SSLCollator:
    """Collates multi-crop samples and draws the iBOT masks for the global crops."""

    def __init__(
        self,
        patch_grid: tuple[int, int],
        mask_ratio_min_max: tuple[float, float],
        mask_sample_probability: float,
        min_num_patches: int,
        min_aspect: float,
        seed: int | None,
    ) -> None:
        ratio_min, ratio_max = float(mask_ratio_min_max[0]), float(mask_ratio_min_max[1])
        if not 0.0 <= ratio_min <= ratio_max <= 1.0:
            raise ValueError(
                f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_min_max}"
            )
        if not 0.0 <= mask_sample_probability <= 1.0:
            raise ValueError(f"mask_sample_probability must be in [0, 1], got {mask_sample_probability}")
        self.patch_grid = (int(patch_grid[0]), int(patch_grid[1]))
        self.n_tokens = self.patch_grid[0] * self.patch_grid[1]
        self.mask_ratio_min_max = (ratio_min, ratio_max)
        self.mask_sample_probability = float(mask_sample_probability)
        # The reference caps one block at half the grid (0.5*H*W).
        self.mask_generator = MaskingGenerator(
            input_size=self.patch_grid,
            max_num_patches=int(0.5 * self.n_tokens),
            min_num_patches=min_num_patches,
            min_aspect=min_aspect,
            max_aspect=None,
        )
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        """Give this copy its own stream (call from a DataLoader worker_init_fn)."""
        self.rng.seed(seed)

    def _draw_masks(self, n_images: int) -> tuple[torch.Tensor, int]:
        """Masks for `n_images` crops: ratios spread over linspace bins, then shuffled."""
        n_masked = int(n_images * self.mask_sample_probability)
        probs = np.linspace(*self.mask_ratio_min_max, n_masked + 1)
        masks: list[np.ndarray] = []
        upperbound = 0
        for i in range(n_masked):
            prob_min, prob_max = float(probs[i]), float(probs[i + 1])
            target = int(self.n_tokens * self.rng.uniform(prob_min, prob_max))
            masks.append(self.mask_generator(target, self.rng))
            upperbound += int(self.n_tokens * prob_max)
        masks.extend(self.mask_generator(0, self.rng) for _ in range(n_masked, n_images))
        self.rng.shuffle(masks)
        return torch.from_numpy(np.stack(masks)).flatten(1), upperbound

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        global_crops = _stack_crop_major(samples, "global_crops")
        if global_crops is None:
            raise ValueError("samples must contain global crops")
        local_crops = _stack_crop_major(samples, "local_crops")
        n_images = global_crops.shape[0]  # crops, as in the reference (each is one masked "image")

        masks, upperbound = self._draw_masks(n_images)
        unit_indices = torch.tensor([s.get("unit_index", -1) for s in samples], dtype=torch.long)
        return assemble_batch(global_crops, local_crops, masks, upperbound, unit_indices)


def assemble_batch(
    global_crops: torch.Tensor,
    local_crops: torch.Tensor | None,
    masks: torch.Tensor,
    upperbound: int,
    unit_indices: torch.Tensor,
) -> dict[str, Any]:
    """The training batch from crop-major global crops and their (n_crops, n_tokens) bool masks.

    Separate from the collator so that a batch can be cut from given masks (the DDP equivalence test
    splits one global batch over ranks).
    """
    mask_indices = masks.flatten().nonzero().flatten()
    per_image_weight = 1.0 / masks.sum(-1).clamp(min=1).float()
    masks_weight = per_image_weight.unsqueeze(-1).expand_as(masks)[masks]
    return {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor(mask_indices.numel(), dtype=torch.long),
        "upperbound": upperbound,
        "n_images": global_crops.shape[0],
        "unit_indices": unit_indices,
    }
