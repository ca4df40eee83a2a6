"""The torch linear probe solves the reference's sklearn objective (same minimiser, same predictions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from reddino.eval.linear import (
    TorchLinearProbe,
    reference_C,
    sklearn_linear_probe,
    torch_linear_probe,
)

N, D, K = 2000, 64, 6


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def mixture() -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes: the probe lands around 80% accuracy, far from separable."""
    rng = np.random.default_rng(0)
    means = rng.normal(scale=0.35, size=(K, D))
    y = rng.integers(0, K, N)
    return means[y] + rng.normal(size=(N, D)), y


def test_reference_C_formula():
    assert reference_C(384, 9) == pytest.approx(34.56)
    assert reference_C(768, 13) == pytest.approx(99.84)


def test_torch_and_sklearn_agree_on_predictions(mixture):
    x, y = mixture
    tr, te = slice(0, 1500), slice(1500, None)
    C = reference_C(D, K)
    sk = sklearn_linear_probe(x[tr], y[tr], x[te], C, 1000)
    th = torch_linear_probe(
        torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]), K, C, 1000, "cpu"
    )
    f1_sk = f1_score(y[te], sk, average="weighted")
    f1_th = f1_score(y[te], th.numpy(), average="weighted")
    assert 0.7 < f1_sk < 0.95  # the task is neither trivial nor hopeless
    assert abs(f1_sk - f1_th) < 0.005
    assert (th.numpy() == sk).mean() > 0.99


@pytest.mark.parametrize("precondition", [False, True])
def test_torch_reaches_sklearns_optimum_and_objective_value(mixture, precondition):
    """At a tight tolerance both land on the same coefficients: the objective scaling matches exactly."""
    x, y = mixture
    C = reference_C(D, K)
    sk = LogisticRegression(C=C, solver="lbfgs", max_iter=1000, tol=1e-8).fit(x, y)
    probe = TorchLinearProbe(D, K, C, N, max_iter=1000, tol=1e-8).double()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    probe.fit_full_batch(xt, yt, precondition=precondition)
    w, b = (t.numpy() for t in probe.raw_coefficients())
    assert np.abs(w - sk.coef_).max() < 1e-3 * np.abs(sk.coef_).max()
    # intercepts are defined up to a shared constant
    np.testing.assert_allclose(b - b.mean(), sk.intercept_ - sk.intercept_.mean(), atol=1e-3)
    fresh = TorchLinearProbe(D, K, C, N).double()
    with torch.no_grad():
        fresh.linear.weight.copy_(torch.from_numpy(sk.coef_))
        fresh.linear.bias.copy_(torch.from_numpy(sk.intercept_))
        assert float(probe.objective(xt, yt)) == pytest.approx(float(fresh.objective(xt, yt)), rel=1e-7)


def test_preconditioning_changes_variables_not_the_model(mixture):
    x, _ = mixture
    probe = TorchLinearProbe(D, K, 1.0, N).double()
    with torch.no_grad():
        probe.linear.weight.normal_()
        probe.linear.bias.normal_()
    xt = torch.from_numpy(x) * 7 + 3
    before = probe(xt)
    probe.set_preconditioner(xt)
    torch.testing.assert_close(probe.shift, torch.from_numpy(x.mean(axis=0)) * 7 + 3)
    torch.testing.assert_close(probe(xt), before)
    # whitened: the solver's coordinates are uncorrelated with unit variance (up to the 1/(C n) ridge)
    z = probe.precondition(xt)
    torch.testing.assert_close(z.T @ z / N, torch.eye(D, dtype=z.dtype), atol=1e-3, rtol=0)


def test_hand_written_gradient_equals_autograd(mixture):
    """The L-BFGS closure's gradient (written by hand, classes x cells layout) is autograd's."""
    x, y = mixture
    probe = TorchLinearProbe(D, K, 0.3, N).double()
    xt, yt = torch.from_numpy(x) * 3 + 1, torch.from_numpy(y)
    probe.set_preconditioner(xt)
    with torch.no_grad():
        probe.linear.weight.normal_()
        probe.linear.bias.normal_()
    z = probe.precondition(xt)
    expected_loss = probe._loss(z, yt)
    expected_loss.backward()
    expected = [probe.linear.weight.grad.clone(), probe.linear.bias.grad.clone()]
    probe.zero_grad()
    loss = probe.loss_and_set_grad(z, z.T.contiguous(), yt)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    torch.testing.assert_close(probe.linear.weight.grad, expected[0])
    torch.testing.assert_close(probe.linear.bias.grad, expected[1])


def test_preconditioning_converges_faster_on_badly_scaled_features(mixture):
    """Raw CLS dimensions differ in scale and offset and are correlated: whitening needs far fewer steps."""
    x, y = mixture
    rng = np.random.default_rng(3)
    mixing = np.eye(D) + 0.5 * rng.normal(size=(D, D)) / np.sqrt(D)  # correlated dimensions, like a CLS
    xt = torch.from_numpy((x @ mixing) * rng.lognormal(sigma=1.0, size=D) + 5.0)
    yt = torch.from_numpy(y)
    plain = TorchLinearProbe(D, K, 3.84, N, max_iter=1000, tol=1e-6).double()
    pre = TorchLinearProbe(D, K, 3.84, N, max_iter=1000, tol=1e-6).double()
    iters_plain = plain.fit_full_batch(xt, yt, precondition=False)
    iters_pre = pre.fit_full_batch(xt, yt, precondition=True)
    assert iters_pre < iters_plain / 3
    with torch.no_grad():
        assert float(pre.objective(xt, yt)) <= float(plain.objective(xt, yt)) + 1e-9


def test_default_tolerance_lands_on_the_optimum_when_nearly_separable():
    """Weak penalty, few samples per weight, raw scaling: the default probe predicts like a tight solve."""
    rng = np.random.default_rng(0)
    n, d, k = 1000, 128, 8
    y = rng.integers(0, k, n)
    x = (rng.normal(scale=0.15, size=(k, d))[y] + rng.normal(size=(n, d))) * rng.lognormal(
        sigma=0.5, size=d
    ) + 0.5
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    C = reference_C(d, k)
    optimum = TorchLinearProbe(d, k, C, 800, max_iter=2000, tol=1e-9).double()
    optimum.fit_full_batch(xt[:800], yt[:800])
    with torch.no_grad():
        expected = optimum(xt[800:]).argmax(dim=1)
    got = torch_linear_probe(xt[:800], yt[:800], xt[800:], k, C, 1000, "cpu")
    assert torch.equal(got, expected)


def test_penalty_is_scaled_by_the_full_training_size():
    probe = TorchLinearProbe(2, 3, C=2.0, n_train=10).double()
    with torch.no_grad():
        probe.linear.weight.fill_(1.0)  # ||W||^2 = 6; zero inputs make the CE exactly log(3)
    loss = probe.objective(torch.zeros(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    assert loss.item() == pytest.approx(np.log(3) + 6 / (2 * 2.0 * 10))


def test_absent_training_class_keeps_global_label_space(mixture):
    x, y = mixture
    keep = y != 2  # class 2 never seen in training, but the label space stays 0..K-1
    th = torch_linear_probe(
        torch.from_numpy(x[keep][:800]),
        torch.from_numpy(y[keep][:800]),
        torch.from_numpy(x[:300]),
        K,
        1.0,
        200,
        "cpu",
    )
    assert th.dtype == torch.long
    assert set(th.unique().tolist()) <= {0, 1, 3, 4, 5}
    sk = sklearn_linear_probe(x[keep][:800], y[keep][:800], x[:300], 1.0, 200)
    assert (th.numpy() == sk).mean() > 0.98


def test_two_classes_match_the_reference_multinomial_objective(mixture):
    """sklearn >= 1.8 fits a binomial model; at 2C it equals the reference's two-softmax fit (w = w1 - w0)."""
    x, y = mixture
    two = y < 2
    xs, ys = x[two], y[two]
    C = 0.05  # strong enough regularisation that a factor 2 in C shows in the weights
    binomial = LogisticRegression(C=2 * C, solver="lbfgs", max_iter=1000, tol=1e-8).fit(xs, ys)
    probe = TorchLinearProbe(D, 2, C, len(ys), max_iter=1000, tol=1e-8).double()
    probe.fit_full_batch(torch.from_numpy(xs), torch.from_numpy(ys))
    w = probe.raw_coefficients()[0].numpy()
    np.testing.assert_allclose(w[1] - w[0], binomial.coef_[0], atol=1e-4 * np.abs(binomial.coef_).max())
    th = torch_linear_probe(
        torch.from_numpy(xs), torch.from_numpy(ys), torch.from_numpy(xs), 2, C, 1000, "cpu"
    )
    assert (th.numpy() == sklearn_linear_probe(xs, ys, xs, C, 1000)).mean() > 0.995


def test_trainer_fit_runs_the_same_objective():
    """The module is a plain LightningModule: one full-batch L-BFGS step under a Trainer converges too."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(300, 8)))  # float64: both solves reach the optimum
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    probe = TorchLinearProbe(8, 3, C=1.0, n_train=300, max_iter=200, tol=1e-9).double()
    probe.set_preconditioner(x)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, DataLoader(TensorDataset(x, y), batch_size=300))
    direct = TorchLinearProbe(8, 3, C=1.0, n_train=300, max_iter=200, tol=1e-9).double()
    direct.fit_full_batch(x, y)
    for got, expected in zip(probe.raw_coefficients(), direct.raw_coefficients(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_rejects_single_class_folds():
    x = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="two classes"):
        torch_linear_probe(x, torch.zeros(5, dtype=torch.long), x, 3, 1.0, 10, "cpu")
