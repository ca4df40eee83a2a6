"""What shows a self-distillation run is learning or dying, computed from one step's tensors.

- ``entropy_ratio``: the teacher targets' mean entropy over ln K. 1.0 is uniform targets: nothing to
  distil (Sinkhorn-Knopp of identical rows is exactly uniform, so an input-independent teacher shows
  here first; with K much larger than the batch, the column constraint alone keeps it high).
- ``prototypes_used``: exp of the entropy of the batch-mean target, the number of prototypes in
  effective use; near 1 when every image goes to one prototype (collapse under centring).
- ``agreement``: share of images whose student and teacher pick the same prototype.
- ``cls_spread``: the std over images of the L2-normalised CLS features, averaged over dimensions, over
  that of uniformly spread features (1 / sqrt(D)); near 0 when every image gets the same features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from reddino.ssl.chunked_head import ChunkedTargets, row_chunks
from reddino.ssl.heads import DINOHead

MONITOR_CHUNK = 4096  # rows at a time when the targets are chunked


@torch.no_grad()
def target_summary(targets: Tensor | ChunkedTargets) -> tuple[Tensor, Tensor, Tensor]:
    """(mean row entropy, batch-mean target [K], argmax per row) of dense or chunked targets."""
    if isinstance(targets, ChunkedTargets):
        parts = [targets.rows(s) for s in row_chunks(len(targets), MONITOR_CHUNK)]
    else:
        parts = [targets.float()]
    n = sum(p.shape[0] for p in parts)
    entropy = sum(-(p * p.clamp_min(1e-12).log()).sum() for p in parts) / max(n, 1)
    mean = sum(p.sum(dim=0) for p in parts) / max(n, 1)
    return entropy, mean, torch.cat([p.argmax(dim=-1) for p in parts])


@torch.no_grad()
def collapse_monitors(
    targets: Tensor | ChunkedTargets, head: DINOHead, student_cls: Tensor
) -> dict[str, Tensor]:
    """The monitors of the module docstring for the DINO (CLS) head of one step."""
    entropy, mean, teacher_pick = target_summary(targets)
    n_prototypes = mean.shape[-1]
    student_pick = torch.cat(
        [head(c.detach()).argmax(dim=-1) for c in student_cls.split(MONITOR_CHUNK)]
    )  # 2B rows: small even at 131,072 prototypes
    batch = student_cls.shape[0] // 2
    swapped = torch.cat((teacher_pick[batch:], teacher_pick[:batch]))  # crop A's student vs crop B's teacher
    used = torch.exp(-(mean * mean.clamp_min(1e-12).log()).sum())
    normalised = F.normalize(student_cls.detach().float(), dim=-1)
    spread = normalised.std(dim=0).mean() * math.sqrt(student_cls.shape[-1])
    return {
        "teacher_entropy": entropy,
        "entropy_ratio": entropy / math.log(n_prototypes),
        "prototypes_used": used,
        "agreement": (student_pick == swapped).float().mean(),
        "cls_spread": spread,
    }
