"""Sinkhorn-Knopp and moving-average centering against independent float64 implementations."""

import numpy as np
import pytest
import torch

from reddino.ssl.centering import (
    MovingAverageCentering,
    SinkhornKnoppCentering,
    build_centering,
    sinkhorn_knopp,
)


def _np_sinkhorn(logits: np.ndarray, temp: float, n_iter: int, b_total: float | None = None) -> np.ndarray:
    """docs/reference_recipe.md §9.4 step by step, float64, single process, no max-subtraction."""
    q = np.exp(logits.astype(np.float64) / temp).T
    k = q.shape[0]
    b = q.shape[1] if b_total is None else b_total
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


def _logits(n: int, k: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("n_iter", [1, 3])
def test_sinkhorn_matches_numpy_reference(n_iter):
    logits = _logits(12, 20, 0)
    got = sinkhorn_knopp(logits, 0.07, n_iter)
    expected = _np_sinkhorn(logits.numpy(), 0.07, n_iter)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-7)


def test_sinkhorn_with_explicit_total_matches_numpy():
    logits = _logits(9, 15, 1)
    for total in (9, torch.tensor(9)):
        got = sinkhorn_knopp(logits, 0.05, 3, n_samples_total=total)
        np.testing.assert_allclose(
            got.numpy(), _np_sinkhorn(logits.numpy(), 0.05, 3, 9), rtol=1e-4, atol=1e-7
        )


def test_sinkhorn_rows_sum_to_one_and_prototypes_become_uniform():
    n, k = 64, 16
    logits = _logits(n, k, 2, scale=0.5)
    q = sinkhorn_knopp(logits, 0.1, 3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n))
    assert (q >= 0).all()
    uniform = torch.full((k,), n / k)

    def imbalance(p: torch.Tensor) -> float:
        return (p.sum(dim=0) - uniform).abs().max().item()

    # 3 iterations do not fully balance, but far better than the plain tempered softmax
    assert imbalance(q) < 0.5 * imbalance(torch.softmax(logits / 0.1, dim=-1))
    assert imbalance(sinkhorn_knopp(logits, 0.1, 10)) < imbalance(q)
    q_long = sinkhorn_knopp(logits, 0.1, 200)
    torch.testing.assert_close(q_long.sum(dim=0), torch.full((k,), n / k), rtol=1e-4, atol=1e-4)


def test_sinkhorn_balances_a_collapsed_teacher():
    # every sample prefers prototype 0; plain softmax collapses, Sinkhorn spreads mass over prototypes
    logits = _logits(32, 8, 3, scale=0.1)
    logits[:, 0] += 1.0
    assert torch.softmax(logits / 0.1, -1)[:, 0].mean() > 0.9
    q = sinkhorn_knopp(logits, 0.1, 50)
    assert q[:, 0].mean() < 0.2


def test_sinkhorn_is_invariant_to_a_constant_shift():
    logits = _logits(10, 12, 4)
    torch.testing.assert_close(sinkhorn_knopp(logits + 3.7, 0.07, 3), sinkhorn_knopp(logits, 0.07, 3))


def test_sinkhorn_large_logits_low_temperature_stay_finite():
    logits = 50.0 + _logits(16, 32, 5)
    q = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))
    # agrees with the float64 reference computed on the shifted logits (a mathematical no-op)
    np.testing.assert_allclose(
        q.numpy(), _np_sinkhorn((logits - 50.0).numpy(), 0.04, 3), rtol=1e-3, atol=1e-6
    )


def test_sinkhorn_prototype_far_below_the_rest_gives_no_nan():
    logits = _logits(8, 6, 6)
    logits[:, 2] -= 10.0  # exp((l - 10) / 0.04) underflows: the reference would divide 0 by 0
    assert torch.isfinite(sinkhorn_knopp(logits, 0.04, 3)).all()


def test_sinkhorn_half_input_returns_float32_and_handles_empty():
    q = sinkhorn_knopp(_logits(4, 6, 7).bfloat16(), 0.07, 3)
    assert q.dtype == torch.float32
    empty = sinkhorn_knopp(torch.empty(0, 6), 0.07, 3)
    assert empty.shape == (0, 6)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(_logits(4, 6, 7), 0.07, 0)


def test_sinkhorn_module_interface():
    logits = _logits(6, 5, 8)
    module = SinkhornKnoppCentering(3)
    torch.testing.assert_close(module.targets(logits, 0.07), sinkhorn_knopp(logits, 0.07, 3))
    assert not list(module.buffers())


# ------------------------------------------------------------------------------ moving average


def _softmax64(x: np.ndarray, temp: float) -> np.ndarray:
    z = x / temp
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("patch", [False, True])
def test_centering_is_lagged_by_one_step(patch):
    k, temp = 7, 0.07
    batches = [_logits(5, k, 10 + i) for i in range(3)]
    module = MovingAverageCentering(k, momentum=0.9, patch=patch)
    assert module.center.shape == ((1, 1, k) if patch else (1, k))
    c1 = 0.1 * batches[0].double().numpy().mean(axis=0)
    c2 = 0.9 * c1 + 0.1 * batches[1].double().numpy().mean(axis=0)
    expected_centers = [np.zeros(k), c1, c2]
    for batch, center in zip(batches, expected_centers, strict=True):
        probs = module.targets(batch, temp)
        np.testing.assert_allclose(module.center.reshape(-1).numpy(), center, atol=1e-6)
        np.testing.assert_allclose(
            probs.numpy(), _softmax64(batch.double().numpy() - center, temp), atol=1e-5
        )
    assert probs.shape == (5, k)


def test_centering_update_then_softmax_center_api():
    k = 4
    module = MovingAverageCentering(k, momentum=0.5, patch=False)
    x = torch.ones(3, k) * 2.0
    module.update(x)
    torch.testing.assert_close(module.center, torch.zeros(1, k))  # not applied yet
    module.softmax_center(x, 0.1)
    torch.testing.assert_close(module.center, torch.ones(1, k))
    assert set(module.state_dict()) == {"center"}


def test_patch_centering_ignores_an_empty_batch():
    module = MovingAverageCentering(3, momentum=0.9, patch=True)
    module.update(torch.empty(0, 3))
    module.apply_pending_update()
    assert torch.isfinite(module.center).all()
    torch.testing.assert_close(module.center, torch.zeros(1, 1, 3))


def test_build_centering():
    assert isinstance(build_centering("sinkhorn_knopp", 8, 3, 0.9, patch=False), SinkhornKnoppCentering)
    ma = build_centering("centering", 8, 3, 0.9, patch=True)
    assert isinstance(ma, MovingAverageCentering) and ma.center.shape == (1, 1, 8)
    with pytest.raises(ValueError, match="unknown centering"):
        build_centering("softmax", 8, 3, 0.9, patch=False)


def test_sinkhorn_stays_float32_under_bf16_autocast():
    """The scaling-vector products are matmuls: a caller's autocast must not run them in bf16."""
    logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(3)) * 3
    expected = sinkhorn_knopp(logits, 0.04, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sinkhorn_knopp(logits, 0.04, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
