"""Teacher targets and student cross-entropy over chunks of tokens: no [N, K] tensor is ever kept.

With 131,072 prototypes the [masked tokens x prototypes] tensors (about 11 GB each in float32 on a
ViT-S batch of 280) bound the step: Sinkhorn-Knopp's passes, the student's log-softmax and their
backward are memory traffic over them. Here both sides keep only the head's bottleneck features
``z`` [N, D] and the prototype matrix ``W`` [K, D]; the logits ``z W^T`` of one chunk of rows exist
only while that chunk is processed (large-vocabulary language models do the same for their output
layer). What is kept instead:

- teacher: Sinkhorn-Knopp's scaling vectors ([K] per-prototype shift and row scaling; the [N] column
  scaling is recomputed per chunk from its own row of E), or the moving-average centre;
- student: the gradients of ``z`` and ``W``, computed in the same chunk loop as the loss (the
  backward only scales them), so the logits are computed once.

The results equal the dense path (``reddino.ssl.centering`` + ``reddino.ssl.losses``) to float32
rounding: same shift, same exp, the same alternation of row and column normalisations and the same
collectives (over [K] vectors and scalars, so chunking tokens does not change what ranks exchange).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from reddino.runtime.distributed import all_reduce_max_, all_reduce_sum_
from reddino.ssl.centering import MovingAverageCentering, SinkhornKnoppCentering, _as_total
from reddino.ssl.losses import N_GLOBAL_CROPS, N_GLOBAL_LOSS_TERMS, n_local_loss_terms


@dataclass(frozen=True)
class Autocast:
    """The autocast state the dense head would have run its prototype layer under."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device: torch.device) -> Autocast:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def logits(self, z: Tensor, weight: Tensor) -> Tensor:
        """``z W^T`` as the dense head computes it (autocast dtype when on), returned in float32."""
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            return F.linear(z, weight).float()

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        """``a @ b`` in the autocast dtype when on (as the dense backward of the prototype layer)."""
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            return (a @ b).float()


def row_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


@dataclass
class ChunkedTargets:
    """Teacher target distributions of N tokens, recomputed row chunk by row chunk on request.

    Sinkhorn-Knopp (``row`` set): t = E diag(row) / (E row), E = exp((z W^T - shift) / temp), which is
    the dense path's E diag(row) diag(col) B with col = 1 / (B E row). Centering (``row`` None):
    t = softmax((z W^T - shift) / temp) with ``shift`` the centre.
    """

    z: Tensor
    weight: Tensor
    shift: Tensor
    temp: float
    row: Tensor | None
    chunk_size: int
    autocast: Autocast

    def __len__(self) -> int:
        return int(self.z.shape[0])

    @property
    def n_prototypes(self) -> int:
        return int(self.weight.shape[0])

    @torch.no_grad()
    def rows(self, index: slice | Tensor) -> Tensor:
        """Targets [c, K] (float32) of the rows ``index`` (a slice or an index tensor)."""
        logits = self.autocast.logits(self.z[index], self.weight)
        if self.row is None:
            return torch.softmax((logits - self.shift) / self.temp, dim=-1)
        e = logits.sub_(self.shift).div_(self.temp).exp_()
        scaled = e.mul_(self.row)
        return scaled.div_(scaled.sum(dim=-1, keepdim=True))

    def dense(self) -> Tensor:
        """All targets [N, K] at once: for tests and small N (the DINO CLS head), never for iBOT."""
        if len(self) == 0:
            return self.z.new_zeros((0, self.n_prototypes), dtype=torch.float32)
        return torch.cat([self.rows(s) for s in row_chunks(len(self), self.chunk_size)])


@torch.no_grad()
def chunked_sinkhorn_knopp(
    z: Tensor,
    weight: Tensor,
    teacher_temp: float,
    n_iterations: int,
    chunk_size: int,
    n_samples_total: Tensor | int | None = None,
) -> ChunkedTargets:
    """Sinkhorn-Knopp targets of the logits ``z W^T`` in ``n_iterations`` passes over the rows.

    Pass 1 takes each prototype's max and the sums of E together (an online rescaling, as in a
    streaming log-sum-exp), which gives the first row scaling. Each further pass computes one column
    scaling chunk by chunk and, in the same loop, its product with E for the next row scaling. The
    last column scaling is left to ``ChunkedTargets.rows``. Every rank must call this (collectives).
    """
    if n_iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs n_iterations >= 1, got {n_iterations}")
    autocast = Autocast.current(z.device)
    n_samples, n_prototypes = int(z.shape[0]), int(weight.shape[0])
    total = _as_total(n_samples_total, n_samples, z.device)
    local_max = torch.full((n_prototypes,), float("-inf"), device=z.device)
    sums = torch.zeros(n_prototypes, device=z.device)
    for s in row_chunks(n_samples, chunk_size):
        logits = autocast.logits(z[s], weight)
        new_max = torch.maximum(local_max, logits.amax(dim=0))
        sums.mul_(torch.exp((local_max - new_max) / teacher_temp).nan_to_num_(0.0))
        sums += logits.sub_(new_max).div_(teacher_temp).exp_().sum(dim=0)
        local_max = new_max
    shift = all_reduce_max_(local_max.clone())
    rescale = torch.exp((local_max - shift) / teacher_temp).nan_to_num_(0.0)  # -inf - -inf: no rows here
    sums = all_reduce_sum_(sums * rescale)
    row = 1.0 / ((sums / sums.sum()) * n_prototypes)  # the dense path's col = 1 / sum(E) everywhere
    for _ in range(n_iterations - 1):
        col_e = torch.zeros(n_prototypes, device=z.device)
        for s in row_chunks(n_samples, chunk_size):
            e = autocast.logits(z[s], weight).sub_(shift).div_(teacher_temp).exp_()
            col = 1.0 / ((e @ row) * total)
            col_e += col @ e
        row = 1.0 / (all_reduce_sum_(col_e) * n_prototypes)
    return ChunkedTargets(z, weight, shift, teacher_temp, row, chunk_size, autocast)


@torch.no_grad()
def chunked_centering_targets(
    centering: MovingAverageCentering, z: Tensor, weight: Tensor, teacher_temp: float, chunk_size: int
) -> ChunkedTargets:
    """Moving-average centring: targets with the current centre, then this batch's update queued
    (its sum of logits taken chunk by chunk), exactly as ``MovingAverageCentering.targets``."""
    centering.apply_pending_update()
    autocast = Autocast.current(z.device)
    targets = ChunkedTargets(
        z, weight, centering.center.reshape(-1).clone(), teacher_temp, None, chunk_size, autocast
    )
    sums = torch.zeros(weight.shape[0], device=z.device)
    for s in row_chunks(int(z.shape[0]), chunk_size):
        sums += autocast.logits(z[s], weight).sum(dim=0)
    centering.queue_update(sums, int(z.shape[0]))
    return targets


def chunked_targets(
    centering: torch.nn.Module,
    z: Tensor,
    weight: Tensor,
    teacher_temp: float,
    chunk_size: int,
    n_samples_total: Tensor | int | None = None,
) -> ChunkedTargets:
    """The chunked counterpart of ``centering.targets(z W^T, ...)`` for either centering module."""
    if isinstance(centering, SinkhornKnoppCentering):
        return chunked_sinkhorn_knopp(
            z, weight, teacher_temp, centering.n_iterations, chunk_size, n_samples_total
        )
    if isinstance(centering, MovingAverageCentering):
        return chunked_centering_targets(centering, z, weight, teacher_temp, chunk_size)
    raise TypeError(f"no chunked targets for {type(centering).__name__}")


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum_r w_r CE(t_{index_r}, softmax(z_r W^T / T)); gradients computed in the forward's chunk loop."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z: Tensor,
        weight: Tensor,
        row_weights: Tensor,
        index: Tensor,
        targets: ChunkedTargets,
        student_temp: float,
        chunk_size: int,
    ) -> Tensor:
        autocast = Autocast.current(z.device)
        need_z, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_z = torch.zeros(z.shape, dtype=torch.float32, device=z.device) if need_z else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=z.device) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=z.device)
        w_all = row_weights.float()
        for s in row_chunks(int(z.shape[0]), chunk_size):
            scaled = autocast.logits(z[s], weight).div_(student_temp)
            log_p = F.log_softmax(scaled, dim=-1)
            t = targets.rows(index[s])
            w = w_all[s]
            loss -= (w * (t * log_p).sum(dim=-1)).sum()
            if need_z or need_w:
                # d/ds of -w sum_k t_k log_softmax(s / T)_k = w (softmax * sum(t) - t) / T
                g = log_p.exp_().mul_(t.sum(dim=-1, keepdim=True)).sub_(t).mul_((w / student_temp)[:, None])
                if need_z:
                    grad_z[s] = autocast.matmul(g, weight)
                if need_w:
                    grad_w += autocast.matmul(g.T, z[s])
        ctx.save_for_backward(
            grad_z if grad_z is not None else torch.empty(0), grad_w if grad_w is not None else torch.empty(0)
        )
        ctx.dtypes = (z.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad_z, grad_w = ctx.saved_tensors
        z_dtype, w_dtype = ctx.dtypes
        gz = (grad_z * grad_output).to(z_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_output).to(w_dtype) if ctx.needs_input_grad[1] else None
        return gz, gw, None, None, None, None, None


def chunked_cross_entropy(
    z: Tensor,
    weight: Tensor,
    targets: ChunkedTargets,
    row_weights: Tensor,
    student_temp: float,
    chunk_size: int,
    index: Tensor | None = None,
) -> Tensor:
    """sum_r row_weights[r] * CE(targets[index[r]], softmax(z[r] W^T / student_temp)), float32.

    ``index`` maps each student row to its target row (None: the same row). Differentiable in ``z``
    and ``W`` (the student's bottleneck and prototypes); the targets are constants.
    """
    if index is None:
        index = torch.arange(z.shape[0], device=z.device)
    if index.shape != z.shape[:1] or row_weights.shape != z.shape[:1]:
        raise ValueError(f"index and row_weights must have shape [{z.shape[0]}]")
    return _ChunkedCrossEntropy.apply(z, weight, row_weights, index, targets, student_temp, chunk_size)


def chunked_dino_loss_terms(
    z_global: Tensor,
    weight: Tensor,
    teacher: ChunkedTargets,
    z_local: Tensor | None,
    n_local: int,
    student_temp: float,
    chunk_size: int,
) -> dict[str, Tensor]:
    """``losses.dino_loss_terms`` with chunked logits: same swap of the crops, same normalisation."""
    if (z_local is None) != (n_local == 0):
        raise ValueError("z_local must be given exactly when n_local > 0")
    n_rows = int(z_global.shape[0])
    if n_rows % N_GLOBAL_CROPS != 0 or len(teacher) != n_rows:
        raise ValueError(
            f"teacher global targets must have 2B rows like the student's {n_rows}, got {len(teacher)}"
        )
    batch = n_rows // N_GLOBAL_CROPS
    denominator = N_GLOBAL_LOSS_TERMS + n_local_loss_terms(n_local)
    device = z_global.device
    rows = torch.arange(n_rows, device=device)
    swapped = (rows + batch) % n_rows  # crop A's student row against crop B's teacher row and back
    weights = torch.full((n_rows,), 2.0 / (n_rows * denominator), device=device)
    terms = {
        "dino_global": chunked_cross_entropy(
            z_global, weight, teacher, weights, student_temp, chunk_size, swapped
        )
    }
    if z_local is not None:
        if z_local.shape[0] != n_local * batch:
            raise ValueError(f"expected {n_local} x {batch} local rows (crop-major), got {z_local.shape[0]}")
        local_rows = torch.arange(z_local.shape[0], device=device) % batch
        per_pair = torch.full((z_local.shape[0],), 1.0 / (batch * denominator), device=device)
        terms["dino_local"] = sum(
            chunked_cross_entropy(
                z_local, weight, teacher, per_pair, student_temp, chunk_size, local_rows + j * batch
            )
            for j in range(N_GLOBAL_CROPS)
        )
    return terms


def chunked_ibot_loss(
    z_patches: Tensor,
    weight: Tensor,
    teacher: ChunkedTargets,
    masks_weight: Tensor,
    n_images: int,
    student_temp: float,
    chunk_size: int,
) -> Tensor:
    """``losses.ibot_patch_loss`` with chunked logits: -sum_m w_m sum_k t log_softmax(s / T) / n_images."""
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    if len(teacher) != z_patches.shape[0] or masks_weight.shape != z_patches.shape[:1]:
        raise ValueError(
            f"student patches, teacher targets and masks_weight must all have {len(teacher)} rows"
        )
    return chunked_cross_entropy(
        z_patches, weight, teacher, masks_weight.float() / n_images, student_temp, chunk_size
    )
