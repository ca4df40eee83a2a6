"""FSDP support: what changes when parameters are sharded over ranks instead of replicated.

Three things in self-distillation assume whole tensors and need care under FSDP (Lightning's
``FSDPStrategy`` with ``use_orig_params=True``):

- **Wrapping.** Transformer blocks and the DINO/iBOT heads become their own FSDP units, so student and
  teacher units have identical layouts and each rank holds matching shards of both; what is left in
  the root unit (position embedding, class and mask tokens, patch embedding, final norm) is small.
- **EMA.** Shards of wrapped units pair up directly. The root unit flattens student and teacher together,
  so their shards do not line up; its parameters are gathered (a few MB even for ViT-g) for the update.
- **Gradient clipping.** Each rank holds only shards of the gradients; the norm is the all-reduced sum
  of squares, not the local one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from reddino.runtime.distributed import all_reduce_sum_
from reddino.ssl.ema import ema_param_pairs, ema_update_
from reddino.ssl.heads import DINOHead


def fsdp_wrap_policy() -> ModuleWrapPolicy:
    """One FSDP unit per transformer block and per projection head (``trainer=fsdp``)."""
    return ModuleWrapPolicy({Block, DINOHead})


@torch.no_grad()
def sharded_ema_update_(root: FSDP, teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student on sharded parameters (collective: every rank calls it).

    Inside ``summon_full_params(root, recurse=False)`` the root unit's parameters are whole and every
    nested unit's are this rank's shard, equal in shape on the student and teacher side.
    """
    with FSDP.summon_full_params(root, recurse=False, writeback=True):
        teacher_params, student_params = ema_param_pairs(teacher, student)
        ema_update_(teacher_params, student_params, momentum)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, sharded: bool) -> Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping.

    ``sharded``: gradients are shards (FSDP), so the squared norms are summed over ranks first. With
    replicated gradients (one process, DDP) this is ``torch.nn.utils.clip_grad_norm_``.
    """
    with_grad = [p for p in parameters if p.grad is not None]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    grads = [p.grad for p in with_grad]
    device = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        squares += g.detach().float().square().sum()
    norm = all_reduce_sum_(squares).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm
