"""iBOT block masking and SSL collation (docs/reference_recipe.md §9.7)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from reddino.data.masking import MaskingGenerator, SSLCollator

GRID = (16, 16)
N = GRID[0] * GRID[1]


def make_generator(min_aspect: float = 0.3, max_num_patches: int = 128) -> MaskingGenerator:
    return MaskingGenerator(
        GRID, max_num_patches=max_num_patches, min_num_patches=4, min_aspect=min_aspect, max_aspect=None
    )


def make_collator(seed: int | None = 0, probability: float = 0.5) -> SSLCollator:
    return SSLCollator(
        patch_grid=GRID,
        mask_ratio_min_max=(0.1, 0.5),
        mask_sample_probability=probability,
        min_num_patches=4,
        min_aspect=0.3,
        seed=seed,
    )


def make_samples(batch: int, n_local: int, global_size: int = 8, local_size: int = 4) -> list[dict]:
    """Crop j of sample b is filled with the constant 100*b + j, so the collated order is readable."""
    return [
        {
            "global_crops": [torch.full((3, global_size, global_size), 100.0 * b + j) for j in range(2)],
            "local_crops": [
                torch.full((3, local_size, local_size), 100.0 * b + 10 + j) for j in range(n_local)
            ],
        }
        for b in range(batch)
    ]


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def test_generator_never_exceeds_target():
    gen, rng = make_generator(), random.Random(1)
    for _ in range(2000):
        target = rng.randint(0, N)
        mask = gen(target, rng)
        assert mask.shape == GRID and mask.dtype == np.bool_
        assert mask.sum() <= target


def test_zero_target_gives_empty_mask():
    assert not make_generator()(0, random.Random(0)).any()


def test_single_block_is_a_filled_rectangle_within_budget():
    gen, rng = make_generator(), random.Random(2)
    heights, widths = set(), set()
    for _ in range(500):
        budget = rng.randint(4, 128)
        mask = np.zeros(GRID, dtype=bool)
        added = gen._add_block(mask, budget, rng)
        assert 0 < added <= budget
        assert mask.sum() == added
        r0, r1, c0, c1 = bounding_box(mask)
        h, w = r1 - r0, c1 - c0
        assert mask[r0:r1, c0:c1].all(), "a block on an empty grid must be a full rectangle"
        assert h < GRID[0] and w < GRID[1]
        heights.add(h)
        widths.add(w)
    # log-uniform aspect in [0.3, 1/0.3]: both tall and wide blocks occur
    assert max(heights) >= 8 and max(widths) >= 8


def test_unit_aspect_range_gives_square_blocks():
    gen, rng = make_generator(min_aspect=1.0), random.Random(3)
    for _ in range(300):
        mask = np.zeros(GRID, dtype=bool)
        gen._add_block(mask, rng.randint(4, 128), rng)
        r0, r1, c0, c1 = bounding_box(mask)
        assert r1 - r0 == c1 - c0


def test_aspect_ratio_log_uniform_range():
    gen = MaskingGenerator(GRID, 128, 4, min_aspect=0.5, max_aspect=4.0)
    assert gen.log_aspect_ratio == pytest.approx((np.log(0.5), np.log(4.0)))
    assert make_generator().log_aspect_ratio == pytest.approx((np.log(0.3), np.log(1 / 0.3)))


def test_blocks_cover_the_whole_grid_over_many_draws():
    """Random top-left corners: every patch, including the borders, gets masked sometime."""
    gen, rng = make_generator(), random.Random(4)
    hits = np.zeros(GRID, dtype=int)
    for _ in range(500):
        hits += gen(20, rng)
    assert (hits > 0).all()


def test_block_budget_caps_each_block():
    """With max_num_patches 4, no single block may add more than 4 patches."""
    gen, rng = make_generator(max_num_patches=4), random.Random(5)
    for _ in range(300):
        mask = np.zeros(GRID, dtype=bool)
        assert gen._add_block(mask, 4, rng) <= 4


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_generator_reaches_target_in_most_calls(ratio):
    gen, rng = make_generator(), random.Random(6)
    target = int(N * ratio)
    counts = np.array([gen(target, rng).sum() for _ in range(300)])
    assert (counts == target).mean() >= 0.8
    assert (counts >= target - 4).all()


def test_generator_is_deterministic_given_rng():
    gen = make_generator()
    assert np.array_equal(gen(60, random.Random(7)), gen(60, random.Random(7)))
    assert not np.array_equal(gen(60, random.Random(7)), gen(60, random.Random(8)))


def test_collator_shapes_dtypes_and_crop_major_order():
    batch, n_local = 3, 2
    out = make_collator()(make_samples(batch, n_local))
    g, loc = out["global_crops"], out["local_crops"]
    assert g.shape == (2 * batch, 3, 8, 8) and g.dtype == torch.float32
    assert loc.shape == (n_local * batch, 3, 4, 4) and loc.dtype == torch.float32
    for j in range(2):
        for b in range(batch):
            assert torch.all(g[j * batch + b] == 100 * b + j)
    for j in range(n_local):
        for b in range(batch):
            assert torch.all(loc[j * batch + b] == 100 * b + 10 + j)
    assert out["masks"].shape == (2 * batch, N) and out["masks"].dtype == torch.bool
    assert out["n_images"] == 2 * batch
    assert out["mask_indices"].dtype == torch.long
    assert out["masks_weight"].dtype == torch.float32
    assert out["n_masked_patches"].dtype == torch.long and out["n_masked_patches"].ndim == 0


def test_collator_without_local_crops_returns_none():
    out = make_collator()(make_samples(2, 0))
    assert out["local_crops"] is None
    assert out["global_crops"].shape[0] == 4


@pytest.mark.parametrize(("batch", "probability"), [(8, 0.5), (5, 0.3), (4, 1.0), (3, 0.0)])
def test_collator_masks_exactly_int_2b_p_images(batch, probability):
    collator = make_collator(seed=11, probability=probability)
    for _ in range(5):
        out = collator(make_samples(batch, 0))
        assert int((out["masks"].sum(1) > 0).sum()) == int(2 * batch * probability)


def test_collator_indices_weights_and_counts_are_consistent():
    out = make_collator(seed=12)(make_samples(8, 1))
    masks, idx, weight = out["masks"], out["mask_indices"], out["masks_weight"]
    assert torch.equal(idx, masks.flatten().nonzero().flatten())
    assert masks.flatten()[idx].all()
    assert int(out["n_masked_patches"]) == idx.numel() == int(masks.sum()) == weight.numel()
    image_of_patch = idx // N
    per_image = torch.zeros(masks.shape[0]).index_add_(0, image_of_patch, weight)
    masked = masks.sum(1) > 0
    assert torch.allclose(per_image[masked], torch.ones(int(masked.sum())))
    assert torch.all(per_image[~masked] == 0)
    counts = masks.sum(1)
    assert torch.allclose(weight, 1.0 / counts[image_of_patch].float())


def test_collator_upperbound_matches_reference_formula():
    batch = 8
    n_masked = int(2 * batch * 0.5)
    probs = np.linspace(0.1, 0.5, n_masked + 1)
    expected = sum(int(N * p) for p in probs[1:])
    out = make_collator(seed=13)(make_samples(batch, 0))
    assert out["upperbound"] == expected
    assert out["n_masked_patches"] <= out["upperbound"]


def test_collator_ratios_spread_over_linspace_bins():
    batch = 8
    n_masked = int(2 * batch * 0.5)
    probs = np.linspace(0.1, 0.5, n_masked + 1)
    collator = make_collator(seed=14)
    sorted_ratios = []
    for _ in range(50):
        out = collator(make_samples(batch, 0))
        ratios = np.sort(out["masks"].sum(1).numpy() / N)[-n_masked:]
        # the k-th smallest can never exceed the k-th bin's upper edge (the generator never overshoots)
        assert np.all(ratios <= probs[1:] + 1e-9)
        sorted_ratios.append(ratios)
    mean_ratio = np.mean(sorted_ratios, axis=0)
    centres = (probs[:-1] + probs[1:]) / 2
    assert np.all(np.diff(mean_ratio) > 0)
    assert np.allclose(mean_ratio, centres, atol=0.03)


def test_collator_masked_images_are_shuffled():
    """Masked images are not always the first ones of the batch."""
    collator = make_collator(seed=15)
    first_half_only = [bool((collator(make_samples(4, 0))["masks"].sum(1)[4:] == 0).all()) for _ in range(20)]
    assert not all(first_half_only)


def test_collator_seeded_determinism_and_reseed():
    samples = make_samples(4, 1)
    a, b = make_collator(seed=21), make_collator(seed=21)
    out_a, out_b = a(samples), b(samples)
    assert torch.equal(out_a["masks"], out_b["masks"])
    assert not torch.equal(make_collator(seed=22)(samples)["masks"], out_a["masks"])
    a.reseed(99)
    assert torch.equal(a(samples)["masks"], make_collator(seed=99)(samples)["masks"])


def test_collator_rejects_bad_config_and_inputs():
    with pytest.raises(ValueError):
        SSLCollator(GRID, (0.5, 0.1), 0.5, 4, 0.3, 0)
    with pytest.raises(ValueError):
        SSLCollator(GRID, (0.1, 0.5), 1.5, 4, 0.3, 0)
    with pytest.raises(ValueError):
        make_collator()([])
    samples = make_samples(2, 1)
    samples[1]["local_crops"] = []
    with pytest.raises(ValueError):
        make_collator()(samples)


def reference_mask(num_masking_patches: int, rng: random.Random) -> np.ndarray:
    """Independent transcription of the DINOv2 loop (per-cell marking), same `rng` draw order."""
    height, width, max_num, min_num = 16, 16, 128, 4
    log_ar = (np.log(0.3), np.log(1 / 0.3))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masking_patches:
        budget = min(num_masking_patches - count, max_num)
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_num, budget)
            ar = float(np.exp(rng.uniform(*log_ar)))
            h, w = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                already = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - already <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return mask


def test_generator_matches_reference_loop_draw_for_draw():
    gen = make_generator()
    for seed in range(100):
        target = random.Random(seed + 1000).randint(0, 140)
        assert np.array_equal(gen(target, random.Random(seed)), reference_mask(target, random.Random(seed)))


def test_collator_survives_pickling_for_worker_processes():
    import pickle

    collator = make_collator(seed=31)
    clone = pickle.loads(pickle.dumps(collator))
    samples = make_samples(2, 1)
    assert torch.equal(collator(samples)["masks"], clone(samples)["masks"])


def test_collator_generator_setup_follows_reference():
    gen = SSLCollator((16, 12), (0.1, 0.5), 0.5, 4, 0.3, 0).mask_generator
    assert (gen.height, gen.width) == (16, 12)
    assert gen.max_num_patches == 96 and gen.min_num_patches == 4
    assert gen.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))


def test_uint8_crops_stay_uint8_and_float_crops_become_float32():
    """Device-side pixel ops get uint8 batches (a quarter of the bytes); CPU-pipeline crops are float."""
    samples = make_samples(4, 2)
    as_uint8 = [
        {**s, "global_crops": [c.to(torch.uint8) for c in s["global_crops"]], "local_crops": []}
        for s in samples
    ]
    batch = make_collator()(as_uint8)
    assert batch["global_crops"].dtype == torch.uint8 and batch["local_crops"] is None
    assert make_collator()(samples)["global_crops"].dtype == torch.float32
