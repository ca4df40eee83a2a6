"""The chunked head equals the dense one: teacher targets, losses and gradients to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from reddino.ssl.centering import MovingAverageCentering, SinkhornKnoppCentering, sinkhorn_knopp
from reddino.ssl.chunked_head import (
    chunked_cross_entropy,
    chunked_dino_loss_terms,
    chunked_ibot_loss,
    chunked_targets,
)
from reddino.ssl.heads import DINOHead
from reddino.ssl.losses import dino_cross_entropy, dino_loss_terms, ibot_patch_loss
from reddino.ssl.monitors import target_summary

TEMP, STUDENT_TEMP = 0.04, 0.1


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def close_grad(a: torch.Tensor, b: torch.Tensor) -> None:
    """Gradients: float32 rounding relative to the gradient's own scale (sums taken in another order)."""
    torch.testing.assert_close(a, b, atol=2e-5 * float(b.abs().max()), rtol=1e-4)


def features(n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised bottleneck features and prototypes with logits spread like a trained head's."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)
    w = torch.randn(k, d, generator=gen) * 0.5
    return z, w


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("n_iterations", [1, 3])
def test_sinkhorn_knopp_targets_equal_the_dense_path(chunk, n_iterations):
    z, w = features(23, 40, 8, seed=0)
    dense = sinkhorn_knopp(z @ w.T, TEMP, n_iterations)
    chunked = chunked_targets(SinkhornKnoppCentering(n_iterations), z, w, TEMP, chunk)
    close(chunked.dense(), dense)
    close(chunked.rows(torch.tensor([5, 0, 22])), dense[[5, 0, 22]])
    entropy = -(dense * dense.clamp_min(1e-12).log()).sum(-1).mean()
    close(target_summary(chunked)[0], entropy)


def test_131072_prototypes_with_few_tokens():
    z, w = features(12, 131_072, 16, seed=1)
    dense = sinkhorn_knopp(z @ w.T, TEMP, 3, n_samples_total=12)
    chunked = chunked_targets(SinkhornKnoppCentering(3), z, w, TEMP, 5, n_samples_total=12)
    close(chunked.dense(), dense, atol=1e-9, rtol=1e-4)
    zs = z.flip(0).clone().requires_grad_(True)
    ws = w.clone().requires_grad_(True)
    weights = torch.rand(12)
    loss_dense = ibot_patch_loss(zs @ ws.T, dense, weights, 4, STUDENT_TEMP)
    gz, gw = torch.autograd.grad(loss_dense, (zs, ws))
    loss = chunked_ibot_loss(zs, ws, chunked, weights, 4, STUDENT_TEMP, 5)
    cz, cw = torch.autograd.grad(loss, (zs, ws))
    close(loss, loss_dense, atol=1e-6, rtol=1e-4)  # sums over 131,072 terms in another order
    close_grad(cz, gz)
    close_grad(cw, gw)


def test_moving_average_centering_targets_and_updates_equal_the_dense_path():
    dense_module = MovingAverageCentering(30, 0.9, patch=True)
    chunked_module = MovingAverageCentering(30, 0.9, patch=True)
    for step in range(3):
        z, w = features(17, 30, 6, seed=10 + step)
        dense = dense_module.targets(z @ w.T, TEMP)
        chunked = chunked_targets(chunked_module, z, w, TEMP, 4)
        close(chunked.dense(), dense)
    dense_module.apply_pending_update()
    chunked_module.apply_pending_update()
    close(chunked_module.center, dense_module.center)


def test_an_empty_token_set_gives_no_rows():
    z, w = features(0, 10, 4, seed=2)
    targets = chunked_targets(SinkhornKnoppCentering(3), z, w, TEMP, 4, n_samples_total=0)
    assert targets.dense().shape == (0, 10)


def head_pair(k: int, seed: int) -> tuple[DINOHead, DINOHead]:
    torch.manual_seed(seed)
    head = DINOHead(in_dim=12, out_dim=k, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    twin = DINOHead(in_dim=12, out_dim=k, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    twin.load_state_dict(head.state_dict())
    return head, twin


@pytest.mark.parametrize("n_local", [0, 2])
def test_dino_and_ibot_losses_and_head_gradients_equal_the_dense_path(n_local):
    batch, k = 5, 50
    student, twin = head_pair(k, seed=3)
    teacher, _ = head_pair(k, seed=4)
    gen = torch.Generator().manual_seed(5)
    cls, patches = torch.randn(2 * batch, 12, generator=gen), torch.randn(19, 12, generator=gen)
    local = torch.randn(n_local * batch, 12, generator=gen) if n_local else None
    masks_weight = torch.rand(19, generator=gen)
    with torch.no_grad():
        t_cls, t_patch = teacher.bottleneck(cls * 0.9), teacher.bottleneck(patches * 0.9)
        w_t = teacher.prototypes()
    dense_cls = sinkhorn_knopp(t_cls @ w_t.T, TEMP, 3)
    dense_patch = sinkhorn_knopp(t_patch @ w_t.T, TEMP, 3)

    terms = dino_loss_terms(
        student(cls), dense_cls, student(local) if n_local else None, n_local, STUDENT_TEMP
    )
    terms["ibot"] = ibot_patch_loss(student(patches), dense_patch, masks_weight, 2 * batch, STUDENT_TEMP)
    sum(terms.values()).backward()

    sk = SinkhornKnoppCentering(3)
    c_cls, c_patch = chunked_targets(sk, t_cls, w_t, TEMP, 3), chunked_targets(sk, t_patch, w_t, TEMP, 4)
    chunked = chunked_dino_loss_terms(
        twin.bottleneck(cls),
        twin.prototypes(),
        c_cls,
        twin.bottleneck(local) if n_local else None,
        n_local,
        STUDENT_TEMP,
        3,
    )
    chunked["ibot"] = chunked_ibot_loss(
        twin.bottleneck(patches), twin.prototypes(), c_patch, masks_weight, 2 * batch, STUDENT_TEMP, 4
    )
    sum(chunked.values()).backward()
    assert set(chunked) == set(terms)
    for key in terms:
        close(chunked[key], terms[key])
    for (name, p), q in zip(student.named_parameters(), twin.parameters(), strict=True):
        close_grad(q.grad, p.grad), name


def test_cross_entropy_without_gradients_and_with_an_index():
    z, w = features(9, 20, 5, seed=6)
    targets = chunked_targets(SinkhornKnoppCentering(2), z, w, TEMP, 4)
    index = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 0])
    weights = torch.full((9,), 1 / 9)
    expected = dino_cross_entropy(z @ w.T, targets.dense()[index], STUDENT_TEMP)
    close(chunked_cross_entropy(z, w, targets, weights, STUDENT_TEMP, 2, index), expected)
    with pytest.raises(ValueError, match="shape"):
        chunked_cross_entropy(z, w, targets, weights[:3], STUDENT_TEMP, 2)


def test_bf16_autocast_is_as_close_to_float32_as_the_dense_path():
    """Under bf16 both paths round the logits to bf16 (one ulp moves exp(l / 0.04) by several %), and a
    different matmul blocking rounds a few logits the other way: so each is compared with float32."""
    z, w = features(33, 64, 16, seed=7)
    zs = z.flip(0).clone().requires_grad_(True)
    weights = torch.rand(33)
    exact_t = sinkhorn_knopp(z @ w.T, TEMP, 3)
    exact = ibot_patch_loss(zs @ w.T, exact_t, weights, 3, STUDENT_TEMP)
    (g_exact,) = torch.autograd.grad(exact, zs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_t = sinkhorn_knopp(torch.nn.functional.linear(z, w), TEMP, 3)
        chunked_t = chunked_targets(SinkhornKnoppCentering(3), z, w, TEMP, 8)
        dense = ibot_patch_loss(torch.nn.functional.linear(zs, w), dense_t, weights, 3, STUDENT_TEMP)
        chunked = chunked_ibot_loss(zs, w, chunked_t, weights, 3, STUDENT_TEMP, 8)
    (g_dense,) = torch.autograd.grad(dense, zs)
    (g_chunked,) = torch.autograd.grad(chunked, zs)
    assert chunked.dtype == dense.dtype == torch.float32
    for ours, theirs, reference in (
        (chunked_t.dense(), dense_t, exact_t),
        (chunked, dense, exact),
        (g_chunked, g_dense, g_exact),
    ):
        error, dense_error = (ours - reference).abs().mean(), (theirs - reference).abs().mean()
        assert error <= 2 * dense_error + 1e-6


@pytest.mark.parametrize("ssl", ["reddino", "dinov2"])  # dinov2: local crops and moving-average centring
def test_a_training_step_of_the_module_is_the_same_with_the_chunked_head(make_cfg, ssl):
    import copy

    import numpy as np
    from hydra.utils import instantiate

    from reddino.workflows.pretraining import build_collator, build_module

    overrides = [f"ssl={ssl}", "ssl.head.n_prototypes=96", "ssl.head.ibot_n_prototypes=80"]
    if ssl == "dinov2":
        overrides += ["crops.n_local=2", "ssl.centering.method=centering"]
    cfg = make_cfg("debug=fast", *overrides)
    torch.manual_seed(0)
    dense = build_module(cfg, instantiate(cfg.model))
    cfg.ssl.head.chunked, cfg.ssl.head.chunk_size = True, 7
    chunked = build_module(cfg, copy.deepcopy(dense.student["backbone"]))
    chunked.load_state_dict(dense.state_dict())
    assert chunked.chunk_size == 7 and dense.chunk_size is None
    transform, rng = instantiate(cfg.augment), np.random.default_rng(0)
    batch = build_collator(cfg)(
        [transform(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(6)]
    )
    results = []
    for module in (dense, chunked):
        for _ in range(2):  # the second step uses the centre the first one queued
            cls_t, patch_t = module.teacher_targets(batch, 0.04)
            module.zero_grad()
            terms, total, _ = module.student_losses(batch, cls_t, patch_t)
            total.backward()
        results.append((terms, {n: p.grad.clone() for n, p in module.student.named_parameters()}))
    (dense_terms, dense_grads), (chunked_terms, chunked_grads) = results
    assert set(dense_terms) == set(chunked_terms)
    for key in dense_terms:
        close(chunked_terms[key], dense_terms[key], atol=1e-6, rtol=1e-4)
    for name in dense_grads:
        close_grad(chunked_grads[name], dense_grads[name]), name
