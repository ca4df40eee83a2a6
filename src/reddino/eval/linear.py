"""The paper's linear probe: multinomial logistic regression on raw frozen features.

The reference fits scikit-learn's ``LogisticRegression`` (L-BFGS, max_iter 1000, L2, default tol) with
C = feature_dim x n_train_classes / 100 and no feature scaling. ``sklearn_linear_probe`` reproduces it;
``TorchLinearProbe`` minimises the identical objective with full-batch L-BFGS in torch, so it runs on a
GPU and at Elsafty scale.

The objective, exactly as scikit-learn 1.9 writes it for lbfgs (``_logistic_regression_path``: the
penalty is ``1 / (C * n_samples)`` because the loss is averaged, not summed)::

    (1/n) sum_i CE(W x_i + b, y_i)  +  1 / (2 C n) ||W||_F^2        (b unpenalised)

i.e. the textbook ``sum_i CE + ||W||^2 / (2C)`` divided by n. Same minimiser; the averaging matters for
the stopping rule (``gtol = tol`` on the largest gradient component of the AVERAGED objective, n times
looser than on the summed objective that sklearn < 1.1 minimised). ``TorchLinearProbe`` uses the same
rule (``tolerance_grad = tol``), the zero initialisation and history size 10, but a tighter default tol
(``TORCH_TOL``): with the weak penalty C = D K / 100 and small folds the problem is nearly separable and
tol 1e-4 stops far from the optimum whatever the solver (measured on 2,400 x 384 x 13 synthetic: sklearn's
default answer matches the optimum's test predictions on 87% of cells, at 1e-6 the torch probe on 99.8%).

Raw features are badly conditioned, and sklearn often stops at max_iter unconverged. The torch probe
therefore solves in whitened coordinates by default: centred, rotated onto the principal axes of the
training features and scaled by ``sqrt(variance + 1 / (C n))``, which makes the Hessian of the whole
objective (data term and penalty) close to the identity. It is an exact change of variables (the
penalty stays on the raw-feature weights, the shift is absorbed by the unpenalised bias), so the
minimiser is the reference's, reached in far fewer iterations. Predictions then differ from sklearn's
only where sklearn had not converged.

Two classes: scikit-learn >= 1.8 fits the binomial model (one weight vector) where the reference's
``multi_class="multinomial"`` penalised two softmax vectors. The softmax optimum is antisymmetric
(w1 = -w0), so it equals the binomial fit at 2C: ``sklearn_linear_probe`` doubles C for two classes and
both probes then solve the reference objective.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from reddino.eval.whitening import principal_axes

SKLEARN_TOL = 1e-4  # LogisticRegression's default tol, which the reference keeps
TORCH_TOL = 1e-6  # reaches the optimum in the nearly separable regime; cheap once preconditioned


def probe_device(device: str | torch.device) -> torch.device:
    """``auto``: the GPU when there is one (the probes are a few matmuls and a top-k), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def reference_C(feature_dim: int, num_classes: int) -> float:
    """The reference's inverse regularisation: 1 / l2_reg with l2_reg = 100 / (D * K)."""
    return feature_dim * num_classes / 100.0


def sklearn_linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, C: float, max_iter: int
) -> np.ndarray:
    """Predicted labels (in ``train_y``'s label space) from the reference's sklearn logistic regression."""
    train_y = np.asarray(train_y)
    n_classes = len(np.unique(train_y))
    if n_classes < 2:
        raise ValueError("a linear probe needs at least two classes in the training fold")
    effective_C = 2.0 * C if n_classes == 2 else C  # binomial at 2C == the 2-softmax reference (see top)
    model = LogisticRegression(C=effective_C, solver="lbfgs", max_iter=max_iter, tol=SKLEARN_TOL)
    model.fit(np.asarray(train_x), train_y)
    return model.predict(np.asarray(test_x))


class TorchLinearProbe(pl.LightningModule):
    """Softmax regression whose ``training_step`` is sklearn's lbfgs objective (see module docstring).

    ``n_train`` is the FULL training-set size: the penalty is scaled by it, so a mini-batch step (under
    a Trainer with smaller batches) is an unbiased estimate of the same objective. The intended use is
    one full batch and one L-BFGS ``step`` running up to ``max_iter`` iterations (``fit_full_batch``).

    Preconditioning (``set_preconditioner``) is a change of variables, not of the objective: the layer
    sees ``z = ((x - shift) @ basis) / scale`` and the penalty is taken on ``(weight / scale) @ basis.T``,
    the raw-feature weights, whose norm is that of ``weight / scale`` because ``basis`` is orthogonal;
    so the minimiser in raw space is unchanged (the shift is absorbed by the unpenalised bias). CLS
    dimensions are badly scaled and strongly correlated: rotating onto the principal axes, not only
    scaling each dimension, is what brings L-BFGS down to a few dozen iterations
    (benchmarks/eval_speed.md).
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        C: float,
        n_train: int,
        max_iter: int = 1000,
        tol: float = TORCH_TOL,
        history_size: int = 10,
    ) -> None:
        super().__init__()
        if C <= 0:
            raise ValueError(f"C must be positive, got {C}")
        self.save_hyperparameters()
        self.linear = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(self.linear.weight)  # sklearn starts L-BFGS from zero
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("shift", torch.zeros(feature_dim))
        self.register_buffer("basis", torch.eye(feature_dim))
        self.register_buffer("scale", torch.ones(feature_dim))

    def precondition(self, x: Tensor) -> Tensor:
        return ((x - self.shift) @ self.basis) / self.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.precondition(x))

    @torch.no_grad()
    def set_preconditioner(self, x: Tensor) -> None:
        """Whiten inputs by the statistics of ``x``, keeping the raw-space model unchanged.

        ``scale**2 = variance + 1 / (C n)`` along each principal axis: the data term's curvature grows
        with the variance and the penalty's is ``1 / (C n)``, so both are brought near 1, and an axis
        without variance is not blown up.
        """
        weight, bias = self.raw_coefficients()
        shift, variance, basis = principal_axes(x)
        ridge = 1.0 / (self.hparams.C * self.hparams.n_train)
        scale = (variance + ridge).sqrt()
        self.shift.copy_(shift)
        self.basis.copy_(basis)
        self.scale.copy_(scale)
        self.linear.weight.copy_((weight.double() @ basis) * scale)
        self.linear.bias.copy_(bias + weight @ shift)

    @torch.no_grad()
    def raw_coefficients(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) acting on raw features, comparable with sklearn's ``coef_`` and ``intercept_``."""
        weight = (self.linear.weight / self.scale) @ self.basis.T
        return weight.clone(), self.linear.bias - weight @ self.shift

    def _loss(self, z: Tensor, y: Tensor) -> Tensor:
        """The objective on already preconditioned inputs ``z``; the penalty is on raw-space weights
        (``basis`` is orthogonal, so their norm is that of ``weight / scale``)."""
        penalty = (self.linear.weight / self.scale).pow(2).sum() / (
            2.0 * self.hparams.C * self.hparams.n_train
        )
        return F.cross_entropy(self.linear(z), y) + penalty

    def objective(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy + ||W_raw||^2 / (2 C n_train), bias unpenalised."""
        return self._loss(self.precondition(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.objective(*batch)
        self.log("train/objective", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # tolerance_grad = sklearn's gtol (max |gradient component|, here in the preconditioned
        # coordinates); tolerance_change stops at float precision; history 10 = scipy's maxcor default.
        return torch.optim.LBFGS(
            self.parameters(),
            lr=1.0,
            max_iter=self.hparams.max_iter,
            max_eval=int(self.hparams.max_iter * 1.25),
            tolerance_grad=self.hparams.tol,
            tolerance_change=1e-12 if self.linear.weight.dtype == torch.float64 else 1e-9,
            history_size=self.hparams.history_size,
            line_search_fn="strong_wolfe",
        )

    @torch.no_grad()
    def loss_and_set_grad(self, z: Tensor, z_t: Tensor, y: Tensor) -> Tensor:
        """``_loss(z, y)`` with its gradients written to ``.grad`` by hand, for the L-BFGS closure.

        The same numbers as autograd (a test checks it), at under half the cost: the logits are laid
        out classes x cells (``z_t`` is ``z.T``, contiguous), where the log-softmax over the class
        axis is a cheap column reduction; over the rows of a cells x 13 matrix it took 4 ms of a 9 ms
        evaluation at Chula size.
        """
        weight, bias = self.linear.weight, self.linear.bias
        n = z.shape[0]
        cells = torch.arange(n, device=z.device)
        log_p = torch.log_softmax(torch.addmm(bias[:, None], weight, z_t), dim=0)
        ridge = 1.0 / (self.hparams.C * self.hparams.n_train)
        penalty = 0.5 * ridge * (weight / self.scale).pow(2).sum()
        loss = -log_p[y, cells].sum() / n + penalty
        residual = log_p.exp_()  # softmax probabilities, then minus the one-hot targets
        residual[y, cells] -= 1.0
        weight.grad = torch.addmm(weight / self.scale.pow(2), residual, z, beta=ridge, alpha=1.0 / n)
        bias.grad = residual.sum(dim=1) / n
        return loss

    def fit_full_batch(self, x: Tensor, y: Tensor, precondition: bool = True) -> int:
        """Run L-BFGS on the whole training set without a Trainer (which adds nothing here).

        Returns the number of L-BFGS iterations taken.
        """
        if precondition:
            self.set_preconditioner(x)
        with torch.no_grad():
            z = self.precondition(x).contiguous()  # once, not at every function evaluation
        z_t = z.T.contiguous()
        optimizer = self.configure_optimizers()
        optimizer.step(lambda: self.loss_and_set_grad(z, z_t, y))
        return int(optimizer.state[self.linear.weight].get("n_iter", 0))


def torch_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    num_classes: int,
    C: float,
    max_iter: int,
    device: str | torch.device,  # auto | cpu | cuda (probe_device)
    dtype: torch.dtype = torch.float32,
    precondition: bool = True,
    tol: float = TORCH_TOL,
) -> Tensor:
    """Predictions in ``[0, num_classes)`` from the torch probe (on CPU, as a long tensor).

    Like sklearn, the model only knows the classes present in the training fold: a class absent from
    it gets no softmax output at all (an unpenalised bias would otherwise run off to -inf), and
    predictions are mapped back to the global label indices. float32 is enough once preconditioned
    (measured at Chula size: objective within 3e-5 of a float64 solve, 99.7% identical predictions).
    """
    device = probe_device(device)
    train_y = train_y.long()
    if train_y.numel() and (train_y.min() < 0 or train_y.max() >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes})")
    present = torch.unique(train_y)
    if present.numel() < 2:
        raise ValueError("a linear probe needs at least two classes in the training fold")
    local_y = torch.searchsorted(present, train_y)
    x = train_x.to(device=device, dtype=dtype)
    probe = TorchLinearProbe(x.shape[1], present.numel(), C, x.shape[0], max_iter, tol).to(device, dtype)
    probe.fit_full_batch(x, local_y.to(device), precondition=precondition)
    with torch.no_grad():
        local_pred = probe(test_x.to(device=device, dtype=dtype)).argmax(dim=1).cpu()
    return present[local_pred]
