"""DINO / iBOT / KoLeo losses against independent float64 numpy computations."""

import numpy as np
import pytest
import torch

from reddino.ssl.losses import (
    dino_cross_entropy,
    dino_loss_terms,
    ibot_patch_loss,
    koleo_loss,
    n_local_loss_terms,
)

T_STUDENT = 0.1


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_ce_rows(s: torch.Tensor, t: torch.Tensor, temp: float) -> np.ndarray:
    s64, t64 = s.detach().double().numpy(), t.detach().double().numpy()
    return -(t64 * _np_log_softmax(s64 / temp)).sum(axis=-1)


def _probs(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(n, k, generator=gen) * 3, dim=-1)


def test_dino_cross_entropy_matches_numpy_float64():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 30, generator=gen) * 4, _probs(7, 30, gen)
    expected = _np_ce_rows(s, t, T_STUDENT).mean()
    assert dino_cross_entropy(s, t, T_STUDENT).item() == pytest.approx(expected, rel=1e-5)


def test_dino_cross_entropy_computes_in_float32_for_half_inputs():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 50, generator=gen) * 4, _probs(4, 50, gen)
    out = dino_cross_entropy(s.bfloat16(), t.bfloat16(), T_STUDENT)
    assert out.dtype == torch.float32
    expected = _np_ce_rows(s.bfloat16().float(), t.bfloat16().float(), T_STUDENT).mean()
    assert out.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("n_local", "terms"), [(0, 2), (1, 2), (2, 4), (8, 16)])
def test_n_local_loss_terms(n_local, terms):
    assert n_local_loss_terms(n_local) == terms


def _hand_loop(s_global, t_global, s_local, n_local, batch):
    """Straight transcription of the reference loop with explicit (student crop, teacher crop) pairs."""
    denom = 2 + max(2 * n_local, 2)
    s_crops = [s_global[i * batch : (i + 1) * batch] for i in range(2)]
    t_crops = [t_global[i * batch : (i + 1) * batch] for i in range(2)]
    # student crop 0 <-> teacher crop 1 and vice versa; mean over the 2B rows, times 2 / denom
    global_rows = np.concatenate(
        [_np_ce_rows(s_crops[0], t_crops[1], T_STUDENT), _np_ce_rows(s_crops[1], t_crops[0], T_STUDENT)]
    )
    out = {"dino_global": global_rows.mean() * 2 / denom}
    if n_local:
        total = 0.0
        for c in range(n_local):
            chunk = s_local[c * batch : (c + 1) * batch]
            for t in t_crops:
                total += _np_ce_rows(chunk, t, T_STUDENT).mean()
        out["dino_local"] = total / denom
    return out


@pytest.mark.parametrize("n_local", [0, 1, 3, 8])
def test_dino_loss_terms_match_hand_loop(n_local):
    gen = torch.Generator().manual_seed(n_local)
    batch, k = 3, 16
    s_global = torch.randn(2 * batch, k, generator=gen) * 3
    t_global = _probs(2 * batch, k, gen)
    s_local = torch.randn(n_local * batch, k, generator=gen) * 3 if n_local else None
    got = dino_loss_terms(s_global, t_global, s_local, n_local, T_STUDENT)
    expected = _hand_loop(s_global, t_global, s_local, n_local, batch)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value, rel=1e-5), key


def test_dino_global_pairs_crop_a_student_with_crop_b_teacher():
    # Student crop A predicts exactly crop B's teacher target and vice versa: the swapped pairing
    # gives the minimum (entropy of the targets); an unswapped pairing would be much larger.
    batch, k = 2, 8
    t_a = torch.eye(k)[:batch] * 0.9 + 0.1 / k
    t_b = torch.eye(k)[batch : 2 * batch] * 0.9 + 0.1 / k
    teacher = torch.cat((t_a, t_b))
    student = torch.cat((torch.log(t_b), torch.log(t_a))) * T_STUDENT  # log_softmax(s/T) = log t
    got = dino_loss_terms(student, teacher, None, 0, T_STUDENT)["dino_global"]
    entropy = -(teacher * teacher.log()).sum(-1).mean()
    torch.testing.assert_close(got, entropy * 2 / 4)
    unswapped = dino_cross_entropy(student, teacher, T_STUDENT) * 2 / 4
    assert unswapped > got + 1.0


def test_reddino_weighting_global_is_half_ce_without_locals():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 10, generator=gen), _probs(4, 10, gen)
    swapped = torch.cat((t[2:], t[:2]))
    got = dino_loss_terms(s, t, None, 0, T_STUDENT)["dino_global"]
    torch.testing.assert_close(got, 0.5 * dino_cross_entropy(s, swapped, T_STUDENT))
    # upstream with 8 locals: 2 / 18
    s_local = torch.randn(16, 10, generator=gen)
    got8 = dino_loss_terms(s, t, s_local, 8, T_STUDENT)["dino_global"]
    torch.testing.assert_close(got8, 2 / 18 * dino_cross_entropy(s, swapped, T_STUDENT))


def test_dino_loss_terms_validates_inputs():
    s, t = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), -1)
    with pytest.raises(ValueError, match="n_local"):
        dino_loss_terms(s, t, None, 2, T_STUDENT)
    with pytest.raises(ValueError, match="n_local"):
        dino_loss_terms(s, t, torch.randn(2, 5), 0, T_STUDENT)
    with pytest.raises(ValueError, match="local logits"):
        dino_loss_terms(s, t, torch.randn(3, 5), 2, T_STUDENT)
    with pytest.raises(ValueError, match="2B rows"):
        dino_loss_terms(torch.randn(3, 5), torch.randn(3, 5), None, 0, T_STUDENT)


def test_dino_loss_gradient_flows_to_student_only():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.softmax(torch.randn(4, 6), -1)
    dino_loss_terms(s, t, None, 0, T_STUDENT)["dino_global"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------------------- iBOT


def _np_ibot(s, t, w, n_images):
    return float((_np_ce_rows(s, t, T_STUDENT) * w.double().numpy()).sum() / n_images)


def test_ibot_matches_numpy_and_counts_unmasked_images():
    gen = torch.Generator().manual_seed(4)
    m, k = 11, 9
    s, t = torch.randn(m, k, generator=gen) * 2, _probs(m, k, gen)
    # image 0 has 1 masked patch, image 1 has 10; two more images are unmasked
    w = torch.tensor([1.0] + [0.1] * 10)
    got = ibot_patch_loss(s, t, w, n_images=4, student_temp=T_STUDENT)
    assert got.item() == pytest.approx(_np_ibot(s, t, w, 4), rel=1e-5)
    # unmasked images dilute the loss: same patches with only the 2 masked images counted
    got_2 = ibot_patch_loss(s, t, w, n_images=2, student_temp=T_STUDENT)
    torch.testing.assert_close(got, got_2 / 2)


def test_ibot_images_weigh_equally_whatever_their_mask_size():
    k = 6
    s_row, t_row = torch.randn(1, k), torch.softmax(torch.randn(1, k), -1)
    # image A: 1 masked patch; image B: 10 identical patches. Each contributes the same CE.
    s = s_row.repeat(11, 1)
    t = t_row.repeat(11, 1)
    w = torch.tensor([1.0] + [0.1] * 10)
    per_image = dino_cross_entropy(s_row, t_row, T_STUDENT)
    only_a = ibot_patch_loss(s[:1], t[:1], w[:1], 2, T_STUDENT)
    only_b = ibot_patch_loss(s[1:], t[1:], w[1:], 2, T_STUDENT)
    torch.testing.assert_close(only_a, only_b)
    torch.testing.assert_close(ibot_patch_loss(s, t, w, 2, T_STUDENT), per_image)


def test_ibot_without_masked_patches_is_zero_and_backward_runs():
    s = torch.randn(0, 5, requires_grad=True)
    out = ibot_patch_loss(s, torch.empty(0, 5), torch.empty(0), 4, T_STUDENT)
    assert out.item() == 0.0 and out.requires_grad
    (out + 0.0).backward()
    assert s.grad is not None and s.grad.shape == (0, 5)


def test_ibot_validates_inputs():
    s = torch.randn(3, 4)
    t = torch.softmax(s, -1)
    with pytest.raises(ValueError, match="n_images"):
        ibot_patch_loss(s, t, torch.ones(3), 0, T_STUDENT)
    with pytest.raises(ValueError, match="masks_weight"):
        ibot_patch_loss(s, t, torch.ones(2), 2, T_STUDENT)


# ---------------------------------------------------------------------------------------- KoLeo


def _np_koleo(x: torch.Tensor, eps: float) -> float:
    x64 = x.double().numpy()
    x64 = x64 / np.maximum(np.linalg.norm(x64, axis=1, keepdims=True), 1e-8)
    n = len(x64)
    dists = []
    for i in range(n):
        sims = [x64[i] @ x64[j] if j != i else -np.inf for j in range(n)]
        j = int(np.argmax(sims))
        dists.append(np.linalg.norm(x64[i] - x64[j] + eps))  # PairwiseDistance adds eps to the difference
    return float(-np.mean(np.log(np.array(dists) + 1e-8)))


@pytest.mark.parametrize("eps", [1e-8, 1e-4])
def test_koleo_matches_numpy_bruteforce(eps):
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(5))
    assert koleo_loss(x, eps).item() == pytest.approx(_np_koleo(x, eps), rel=1e-5)


def test_koleo_is_finite_for_duplicates_and_has_gradients():
    base = torch.randn(3, 4)
    x = torch.cat((base, base)).requires_grad_(True)
    out = koleo_loss(x, 1e-4)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(x.grad).all()


def test_koleo_runs_in_float32_under_autocast():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = koleo_loss(x.bfloat16(), 1e-4)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(_np_koleo(x.bfloat16().float(), 1e-4), rel=1e-5)


def test_koleo_needs_two_samples():
    with pytest.raises(ValueError, match=">= 2 samples"):
        koleo_loss(torch.randn(1, 4), 1e-4)
