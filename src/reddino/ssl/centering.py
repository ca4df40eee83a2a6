"""Teacher target construction: Sinkhorn-Knopp (RedDino's choice) and moving-average centering.

Both expose ``targets(teacher_logits, teacher_temp, n_samples_total=None) -> probs`` so the training
module does not care which one the config picked (docs/reference_recipe.md §9.3, §9.4). Every
collective goes through :mod:`reddino.runtime.distributed`, so results with W processes equal one
process on the full batch.
"""

from __future__ import annotations

import torch
from torch import nn

from reddino.runtime.distributed import all_reduce_max_, all_reduce_sum_, all_reduce_sum_async_, world_size

CENTERING_METHODS = ("sinkhorn_knopp", "centering")


def _per_prototype_max(logits: torch.Tensor) -> torch.Tensor:
    """Max over all samples of all ranks for each prototype, shape [K] (-inf where no rank has samples)."""
    if logits.shape[0] == 0:
        local_max = logits.new_full((logits.shape[1],), float("-inf"))
    else:
        local_max = logits.amax(dim=0)
    return all_reduce_max_(local_max)


def _as_total(n_samples_total: torch.Tensor | int | None, n_local: int, device: torch.device) -> torch.Tensor:
    """Number of samples over all ranks that the assignment spreads mass over, as a float32 scalar."""
    if n_samples_total is None:
        return torch.tensor(float(n_local * world_size()), device=device)
    if isinstance(n_samples_total, torch.Tensor):
        return n_samples_total.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(n_samples_total), device=device)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int,
    n_samples_total: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets [N, K] computed in float32, as docs/reference_recipe.md §9.4.

    ``n_samples_total`` is the number of samples over all ranks: N * world_size for CLS tokens (the
    default); for iBOT the caller passes the all-reduced count of masked patches, since ranks hold
    different numbers of them. Every rank must call this (collectives), even with N = 0.

    Two departures from the reference's loop, neither of which changes the result beyond float rounding:
    - Each prototype's logits are shifted by their max over all samples of all ranks before ``exp``.
      That multiplies row k of Q by a constant, which the first row normalisation removes exactly. It
      prevents the overflow of exp(logits / 0.04) for logits above ~3.5 and guarantees no prototype row
      underflows to all zeros (0/0 = NaN in the reference).
    - The reference rescales the whole [K, N] matrix four times per iteration. Here Q = diag(r) E^T
      diag(c) is kept as E = exp(...) and two scaling vectors: a row normalisation sets
      r = 1 / (K E^T c), a column normalisation sets c = 1 / (B E r) (each needs only the newest other
      vector), and E is scaled once at the end. With 131,072 iBOT prototypes E is ~11 GB on a ViT-S
      batch of 280, so each iteration costs two read-only passes instead of four read-write ones.
    """
    if n_iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs n_iterations >= 1, got {n_iterations}")
    # the matrix-vector products must stay float32 under a caller's bf16 autocast
    with torch.autocast(teacher_logits.device.type, enabled=False):
        e = teacher_logits.to(torch.float32, copy=True)  # one [N, K] buffer, updated in place
        n_samples, n_prototypes = e.shape
        total = _as_total(n_samples_total, n_samples, e.device)
        e.sub_(_per_prototype_max(e)).div_(teacher_temp).exp_()
        col = torch.ones(n_samples, device=e.device) / all_reduce_sum_(e.sum())  # Q = E^T / sum(E)
        for _ in range(n_iterations):
            # each prototype (row of Q) gets total mass 1/K over all ranks
            row = 1.0 / (all_reduce_sum_(col @ e) * n_prototypes)
            # each sample (column of Q, local to this rank) gets mass 1/B_total
            col = 1.0 / ((e @ row) * total)
        # columns scaled by B_total sum to 1: each sample gets a distribution over prototypes
        return e.mul_(row).mul_((col * total).unsqueeze(1))


class SinkhornKnoppCentering(nn.Module):
    """Stateless Sinkhorn-Knopp targets behind the common ``targets`` interface."""

    def __init__(self, n_iterations: int) -> None:
        super().__init__()
        if n_iterations < 1:
            raise ValueError(f"Sinkhorn-Knopp needs n_iterations >= 1, got {n_iterations}")
        self.n_iterations = n_iterations

    @torch.no_grad()
    def targets(
        self,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        n_samples_total: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, self.n_iterations, n_samples_total)

    def extra_repr(self) -> str:
        return f"n_iterations={self.n_iterations}"


class MovingAverageCentering(nn.Module):
    """DINO moving-average centering with the reference's one-step lag (docs/reference_recipe.md §9.3).

    ``update`` starts an (async) all-reduce of this batch's statistics; the centre moves only at the
    next ``softmax_center`` call, so the reduction overlaps with the rest of the training step.

    The reduced vector is the sum of this rank's logits plus their count in the last slot, so the
    batch centre is the mean over every token of every rank, for CLS (``patch=False``) and iBOT masked
    patches (``patch=True``) alike. For iBOT this deliberately departs from the reference, which averages
    the per-rank means of the masked tokens: ranks hold different numbers of masked patches, so that
    mean of means depends on how the batch is split, and 2 GPUs would train differently from 1 on the
    same global batch. Both agree at world size 1 and whenever ranks hold equal counts. A rank without
    tokens adds nothing; if no rank has any, the centre does not move.
    """

    def __init__(self, out_dim: int, momentum: float, patch: bool) -> None:
        super().__init__()
        self.momentum = momentum
        self.patch = patch
        shape = (1, 1, out_dim) if patch else (1, out_dim)
        self.register_buffer("center", torch.zeros(shape))
        self._pending: torch.Tensor | None = None
        self._handle: torch.distributed.Work | None = None

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Queue this batch's centre update (teacher logits [N, K]); applied at the next call."""
        flat = teacher_logits.detach().float().reshape(-1, self.center.shape[-1])
        self.queue_update(flat.sum(dim=0), int(flat.shape[0]))

    @torch.no_grad()
    def queue_update(self, logit_sum: torch.Tensor, count: int) -> None:
        """Queue the update from this rank's sum of logits [K] over ``count`` tokens (the chunked head
        sums them chunk by chunk): one [K + 1] all-reduce of the sum, then the count."""
        self.apply_pending_update()
        stats = torch.cat((logit_sum.float(), logit_sum.new_full((1,), float(count), dtype=torch.float32)))
        self._handle = all_reduce_sum_async_(stats)
        self._pending = stats

    @torch.no_grad()
    def apply_pending_update(self) -> None:
        """center <- m * center + (1 - m) * batch_center, for the update queued by ``update``."""
        if self._pending is None:
            return
        if self._handle is not None:
            self._handle.wait()
        numerator, weight = self._pending[:-1], self._pending[-1]
        batch_center = (numerator / weight).reshape(self.center.shape).to(self.center.device)
        moved = self.center * self.momentum + batch_center * (1 - self.momentum)
        self.center.copy_(torch.where(weight.to(self.center.device) > 0, moved, self.center))
        self._pending, self._handle = None, None

    @torch.no_grad()
    def softmax_center(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t - center) / temp) over prototypes, after applying the previous batch's update."""
        self.apply_pending_update()
        center = self.center.reshape(1, -1)
        return torch.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def targets(
        self,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        n_samples_total: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Centred targets with the current centre, then queue the update (``n_samples_total`` unused)."""
        del n_samples_total  # only Sinkhorn-Knopp needs the global count
        probs = self.softmax_center(teacher_logits, teacher_temp)
        self.update(teacher_logits)
        return probs

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, patch={self.patch}"


def build_centering(method: str, out_dim: int, n_iterations: int, momentum: float, patch: bool) -> nn.Module:
    """Centering module for ``train.centering`` in {"sinkhorn_knopp", "centering"}."""
    if method == "sinkhorn_knopp":
        return SinkhornKnoppCentering(n_iterations)
    if method == "centering":
        return MovingAverageCentering(out_dim, momentum, patch)
    raise ValueError(f"unknown centering method {method!r}; expected one of {CENTERING_METHODS}")
