"""Centering with 2 gloo processes must equal one process on the full batch.

Each rank holds a slice of a fixed global batch; the collectives inside Sinkhorn-Knopp and the
moving-average centre must make every rank's result identical to the single-process computation.
"""

from __future__ import annotations

import pytest
import torch
from gloo import run_on_ranks

from reddino.runtime.distributed import all_reduce_sum_, is_dist, world_size
from reddino.ssl.centering import MovingAverageCentering, SinkhornKnoppCentering, sinkhorn_knopp
from reddino.ssl.chunked_head import chunked_targets

pytestmark = pytest.mark.distributed

WORLD = 2
K = 12
N_CLS_PER_RANK = 4
PATCHES_PER_RANK = (3, 7)  # unequal masked-patch counts, as happens with iBOT masking
EMPTY_FIRST_RANK = (0, 10)  # a rank without masked patches must still join the collectives
EQUAL_PATCHES_PER_RANK = 5
N_STEPS = 3
TEMP = 0.05
MOMENTUM = 0.9
N_ITER = 3
D = 6  # bottleneck width of the chunked-head inputs
CHUNK = 2  # rows per chunk: several chunks per rank, one of them partial


def _global_data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {
        "cls": torch.randn(WORLD * N_CLS_PER_RANK, K, generator=gen) * 2,
        "patch": torch.randn(sum(PATCHES_PER_RANK), K, generator=gen) * 2,
        "cls_steps": torch.randn(N_STEPS, WORLD * N_CLS_PER_RANK, K, generator=gen),
        "patch_steps": torch.randn(N_STEPS, WORLD * EQUAL_PATCHES_PER_RANK, K, generator=gen),
        "uneq_patch_steps": torch.randn(N_STEPS, sum(PATCHES_PER_RANK), K, generator=gen),
        "z_patch": torch.nn.functional.normalize(
            torch.randn(sum(PATCHES_PER_RANK), D, generator=gen), dim=-1
        ),
        "z_steps": torch.nn.functional.normalize(
            torch.randn(N_STEPS, sum(PATCHES_PER_RANK), D, generator=gen), dim=-1
        ),
        "w": torch.randn(K, D, generator=gen) * 2,
    }


def _run_chunked_centering(
    module: MovingAverageCentering, steps: list[torch.Tensor], w: torch.Tensor
) -> dict:
    probs = [chunked_targets(module, z, w, TEMP, CHUNK).dense() for z in steps]
    module.apply_pending_update()
    return {"probs": probs, "center": module.center.clone()}


def _rank_slice(n_per_rank: tuple[int, ...], rank: int) -> slice:
    start = sum(n_per_rank[:rank])
    return slice(start, start + n_per_rank[rank])


def _run_centering(
    module: MovingAverageCentering, steps: list[torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    probs, centers = [], []
    for batch in steps:
        probs.append(module.targets(batch, TEMP))
        centers.append(module.center.clone())
    module.apply_pending_update()
    centers.append(module.center.clone())
    return {"probs": probs, "centers": centers}


def _compute(rank: int, n_ranks: int) -> dict:
    """Everything the test compares, on this rank's slice (n_ranks=1: the full batch)."""
    data = _global_data()
    cls_split = (N_CLS_PER_RANK * WORLD // n_ranks,) * n_ranks
    patch_split = PATCHES_PER_RANK if n_ranks == WORLD else (sum(PATCHES_PER_RANK),)
    eq_split = (EQUAL_PATCHES_PER_RANK * WORLD // n_ranks,) * n_ranks
    cls = data["cls"][_rank_slice(cls_split, rank)]
    patch = data["patch"][_rank_slice(patch_split, rank)]
    n_masked = all_reduce_sum_(torch.tensor(patch.shape[0]))
    empty_split = EMPTY_FIRST_RANK if n_ranks == WORLD else (sum(EMPTY_FIRST_RANK),)
    patch_empty = data["patch"][_rank_slice(empty_split, rank)]
    n_masked_empty = all_reduce_sum_(torch.tensor(patch_empty.shape[0]))
    empty_module = MovingAverageCentering(K, MOMENTUM, patch=True)
    cls_module = MovingAverageCentering(K, MOMENTUM, patch=False)
    patch_module = MovingAverageCentering(K, MOMENTUM, patch=True)
    uneq_module = MovingAverageCentering(K, MOMENTUM, patch=True)
    z_patch, w = data["z_patch"][_rank_slice(patch_split, rank)], data["w"]
    all_rows = len(data["z_patch"])  # rank 0 holds none of them: it must still join every collective
    z_empty = data["z_patch"][_rank_slice((0, all_rows) if n_ranks == WORLD else (all_rows,), rank)]
    sk = SinkhornKnoppCentering(N_ITER)
    chunked = {
        "ck_patch": chunked_targets(sk, z_patch, w, TEMP, CHUNK, n_samples_total=n_masked).dense(),
        "ck_patch_empty_rank": chunked_targets(
            sk, z_empty, w, TEMP, CHUNK, n_samples_total=all_reduce_sum_(torch.tensor(z_empty.shape[0]))
        ).dense(),
        "ck_ma_unequal": _run_chunked_centering(
            MovingAverageCentering(K, MOMENTUM, patch=True),
            [s[_rank_slice(patch_split, rank)] for s in data["z_steps"]],
            w,
        ),
    }
    return {
        **chunked,
        "world": world_size(),
        "sk_cls": sinkhorn_knopp(cls, TEMP, N_ITER),
        "sk_patch": sinkhorn_knopp(patch, TEMP, N_ITER, n_samples_total=n_masked),
        "n_masked": int(n_masked),
        "sk_patch_empty_rank": sinkhorn_knopp(patch_empty, TEMP, N_ITER, n_samples_total=n_masked_empty),
        "ma_patch_empty_rank": _run_centering(empty_module, [patch_empty]),
        "ma_cls": _run_centering(cls_module, [s[_rank_slice(cls_split, rank)] for s in data["cls_steps"]]),
        "ma_patch": _run_centering(
            patch_module, [s[_rank_slice(eq_split, rank)] for s in data["patch_steps"]]
        ),
        "ma_patch_unequal": _run_centering(
            uneq_module, [s[_rank_slice(patch_split, rank)] for s in data["uneq_patch_steps"]]
        ),
    }


def _on_rank(rank: int) -> dict:
    return _compute(rank, WORLD)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_on_rank, WORLD, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def single() -> dict:
    assert not is_dist()
    return _compute(0, 1)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_workers_ran_distributed(results):
    assert [r["world"] for r in results] == [WORLD, WORLD]
    assert [r["n_masked"] for r in results] == [sum(PATCHES_PER_RANK)] * WORLD


def test_sinkhorn_cls_equals_full_batch(results, single):
    _close(torch.cat([r["sk_cls"] for r in results]), single["sk_cls"])


def test_sinkhorn_ibot_with_unequal_patch_counts_equals_full_batch(results, single):
    assert [r["sk_patch"].shape[0] for r in results] == list(PATCHES_PER_RANK)
    _close(torch.cat([r["sk_patch"] for r in results]), single["sk_patch"])


@pytest.mark.parametrize("key", ["ma_cls", "ma_patch"])
def test_moving_average_centers_and_targets_equal_full_batch(results, single, key):
    for step in range(N_STEPS + 1):
        for r in results:
            _close(r[key]["centers"][step], single[key]["centers"][step])
    for step in range(N_STEPS):
        _close(torch.cat([r[key]["probs"][step] for r in results]), single[key]["probs"][step])


def test_patch_centering_with_unequal_counts_equals_full_batch(results, single):
    # The reference averages per-rank means, which depends on the split; here the centre is the mean
    # over all masked tokens, so 2 ranks with 3 and 7 tokens equal 1 process with 10.
    for step in range(N_STEPS + 1):
        for r in results:
            _close(r["ma_patch_unequal"]["centers"][step], single["ma_patch_unequal"]["centers"][step])
    for step in range(N_STEPS):
        merged = torch.cat([r["ma_patch_unequal"]["probs"][step] for r in results])
        _close(merged, single["ma_patch_unequal"]["probs"][step])
    data = _global_data()
    center = torch.zeros(1, 1, K)
    for step in range(N_STEPS):
        center = MOMENTUM * center + (1 - MOMENTUM) * data["uneq_patch_steps"][step].mean(dim=0)
    _close(results[0]["ma_patch_unequal"]["centers"][-1], center)


def test_rank_without_masked_patches(results, single):
    assert [r["sk_patch_empty_rank"].shape[0] for r in results] == list(EMPTY_FIRST_RANK)
    _close(torch.cat([r["sk_patch_empty_rank"] for r in results]), single["sk_patch_empty_rank"])
    # only the rank holding tokens contributes a mean; the empty rank neither adds NaN nor dilutes it
    for r in results:
        _close(r["ma_patch_empty_rank"]["centers"][-1], single["ma_patch_empty_rank"]["centers"][-1])


def test_chunked_sinkhorn_knopp_on_ranks_equals_the_dense_full_batch(results):
    data = _global_data()
    logits = data["z_patch"] @ data["w"].T
    _close(torch.cat([r["ck_patch"] for r in results]), sinkhorn_knopp(logits, TEMP, N_ITER))
    assert [r["ck_patch_empty_rank"].shape[0] for r in results] == [0, len(data["z_patch"])]
    _close(torch.cat([r["ck_patch_empty_rank"] for r in results]), sinkhorn_knopp(logits, TEMP, N_ITER))


def test_chunked_centering_on_ranks_equals_the_dense_full_batch(results):
    data = _global_data()
    dense = MovingAverageCentering(K, MOMENTUM, patch=True)
    expected = [dense.targets(z @ data["w"].T, TEMP) for z in data["z_steps"]]
    dense.apply_pending_update()
    for step, probs in enumerate(expected):
        _close(torch.cat([r["ck_ma_unequal"]["probs"][step] for r in results]), probs)
    for r in results:
        _close(r["ck_ma_unequal"]["center"], dense.center)
