"""Whitening of frozen CLS features, fitted without labels and shipped with an export.

Why: a network trained from scratch by DINO keeps the high-variance directions of its random init
and adds what it learns in directions of small variance, which Euclidean k-NN then hardly sees.
Whitening (rotate onto the principal axes, divide each by its standard deviation, shrunk towards the
mean variance) gives every direction an equal say. Measured on Chula (benchmarks/pretrain_real.md): it
lifts a trained tiny ViT's 20-NN by 5 to 7 points and lowers its random init's, so it is part of a
trained model's features, not of the random baseline.

It is fitted on the teacher's CLS of the model's own PRETRAINING units (no labels, no evaluation units)
at the end of pretraining, written beside the weights (``whitening.safetensors``) and applied to the
CLS token wherever an export's features are computed (``reddino.eval.features.pool_tokens``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FeatureWhitening:
    """``whiten(x) = (x - mean) @ transform``; ``transform`` is [D, D], ``mean`` [D]."""

    mean: Tensor
    transform: Tensor
    shrinkage: float
    fitted_on: int

    def __post_init__(self) -> None:
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if d < 1 or tuple(self.transform.shape) != (d, d):
            raise ValueError(
                f"whitening: mean {tuple(self.mean.shape)} and transform {tuple(self.transform.shape)} "
                "must be [D] and [D, D]"
            )
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.transform).all()):
            raise ValueError("whitening: mean or transform holds NaN or inf")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def __call__(self, features: Tensor) -> Tensor:
        if features.shape[-1] != self.dim:
            raise ValueError(f"whitening fitted on {self.dim}-d features, got {features.shape[-1]}-d")
        mean = self.mean.to(features.device, features.dtype)
        return (features - mean) @ self.transform.to(features.device, features.dtype)

    def digest(self) -> str:
        """Content hash, for feature-cache keys: other whitening, other features."""
        h = hashlib.sha256()
        for t in (self.mean, self.transform):
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()[:16]


def principal_axes(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [D] in ``x``'s dtype, variances [D] >= 0 and orthonormal axes [D, D] as columns, float64)
    of the rows of ``x``. The n x D^2 product runs in ``x``'s dtype, the eigendecomposition in float64.

    Shared by the export's feature whitening and the linear probe's change of variables.
    """
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = (centred.T @ centred).double() / max(x.shape[0], 1)
    variance, basis = torch.linalg.eigh(covariance)
    return mean, variance.clamp_min(0.0), basis


def fit_whitening(features: Tensor, shrinkage: float) -> FeatureWhitening:
    """Shrunk PCA whitening of ``features`` [N, D]: ``scale_j = 1 / sqrt(var_j + shrinkage * mean(var))``.

    ``shrinkage`` > 0 keeps directions of (near) zero variance from being blown up; large values tend
    to a plain rotation (Euclidean distances unchanged up to a factor).
    """
    if shrinkage <= 0:
        raise ValueError(f"whitening.shrinkage must be > 0, got {shrinkage}")
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"whitening needs at least 2 feature rows [N, D], got {tuple(features.shape)}")
    mean, variance, basis = principal_axes(features.double())
    ridge = shrinkage * variance.mean().clamp_min(torch.finfo(torch.float64).tiny)
    transform = basis / (variance + ridge).sqrt()
    return FeatureWhitening(mean.float(), transform.float(), float(shrinkage), int(features.shape[0]))
