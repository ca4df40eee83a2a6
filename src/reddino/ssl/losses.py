"""DINO, iBOT and KoLeo loss terms as pure functions (docs/reference_recipe.md §7, §9.2, §9.5, §9.6).

Teacher targets are treated as constants: callers produce them under ``torch.no_grad`` with
:mod:`reddino.ssl.centering`. Everything is computed in float32 whatever the autocast dtype, because
65k-131k-way log-softmaxes and KoLeo's log-distances lose too much precision in half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

N_GLOBAL_CROPS = 2
#: Loss terms between the two global crops: A->B and B->A.
N_GLOBAL_LOSS_TERMS = (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS
#: Added inside KoLeo's log so a zero distance cannot give -inf.
KOLEO_LOG_EPS = 1e-8
#: Epsilon of the L2 normalisation of the KoLeo inputs.
KOLEO_NORMALIZE_EPS = 1e-8


def _cross_entropy_rows(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Per-row -sum_k t_k log_softmax(s / T)_k in float32 (the division in place: one [N, K] buffer less)."""
    log_p = F.log_softmax(student_logits.to(torch.float32, copy=True).div_(student_temp), dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


def dino_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Mean over rows of CE(teacher targets, student softmax at ``student_temp``), in float32."""
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher probs "
            f"{tuple(teacher_probs.shape)} must have the same shape"
        )
    return _cross_entropy_rows(student_logits, teacher_probs, student_temp).mean()


def n_local_loss_terms(n_local: int) -> int:
    """Number of local-crop loss terms used in the normalisation: max(2 * n_local, 2).

    Why the floor of 2 (and not the reference's ``max(2 * n_local, 1)``): RedDino runs with
    ``crops.local_crops_number: 1``, and its ``forward_backward`` only computes the local loss when
    ``local_crops_number > 1``. So it makes one local crop, discards it, but still counts
    ``max(1 * 2, 1) = 2`` local terms in the denominator: the global loss is 2 * CE / (2 + 2) = 0.5 * CE.
    Here ``n_local`` is the number of local crops actually used (0 = none are made), so RedDino's
    configuration is ``n_local = 0`` and the floor of 2 reproduces its weighting exactly. For
    ``n_local >= 1`` this equals upstream DINOv2 (2 * n_local terms; e.g. 2 + 16 = 18 with 8 crops).
    Upstream run with truly zero local crops would use 2 / 3 * CE instead; that setting is not offered.
    """
    if n_local < 0:
        raise ValueError(f"n_local must be >= 0, got {n_local}")
    return max(N_GLOBAL_CROPS * n_local, 2)


def _split_teacher(teacher_global_probs: torch.Tensor, n_student_global: int) -> tuple[torch.Tensor, ...]:
    """Chunks (crop A, crop B) of crop-major teacher targets, after checking their shape."""
    n_rows = teacher_global_probs.shape[0]
    if n_rows % N_GLOBAL_CROPS != 0 or n_rows != n_student_global:
        raise ValueError(
            f"teacher global targets must have 2B rows like the student's {n_student_global}, got {n_rows}"
        )
    return teacher_global_probs.chunk(N_GLOBAL_CROPS)


def _local_cross_entropy_sum(
    student_local_logits: torch.Tensor,
    teacher_chunks: tuple[torch.Tensor, ...],
    n_local: int,
    student_temp: float,
) -> torch.Tensor:
    """Sum over local chunks c and teacher chunks j of CE(local chunk c, teacher chunk j)."""
    batch = teacher_chunks[0].shape[0]
    if student_local_logits.shape[0] != n_local * batch:
        raise ValueError(
            f"expected {n_local} x {batch} local logits rows (crop-major), got {len(student_local_logits)}"
        )
    # log_softmax once per local chunk, reused against both teacher chunks (as the reference does).
    log_p = F.log_softmax(student_local_logits.float() / student_temp, dim=-1)
    total = log_p.new_zeros(())
    for chunk in log_p.split(batch):
        for teacher in teacher_chunks:
            total = total - (teacher.float() * chunk).sum(dim=-1).mean()
    return total


def dino_loss_terms(
    student_global_logits: torch.Tensor,
    teacher_global_probs: torch.Tensor,
    student_local_logits: torch.Tensor | None,
    n_local: int,
    student_temp: float,
) -> dict[str, torch.Tensor]:
    """DINO CLS loss terms with the reference normalisation (docs/reference_recipe.md §7).

    Inputs are crop-major (all crop-A rows, then all crop-B rows; locals chunked by crop). The teacher
    targets are given in that natural order and swapped here so crop A's student row is matched to
    crop B's teacher row. The reference swaps before the head and centering; both commute with a
    permutation of samples, so swapping the targets afterwards is equivalent.

    Returns ``dino_global`` = 2 * CE(global, swapped teacher) / (2 + n_local_terms) and, when
    ``n_local > 0``, ``dino_local`` = sum_{c, j} CE(local c, teacher j) / (2 + n_local_terms), with
    ``n_local_terms`` from :func:`n_local_loss_terms`.
    """
    if (student_local_logits is None) != (n_local == 0):
        raise ValueError("student_local_logits must be given exactly when n_local > 0")
    teacher_a, teacher_b = _split_teacher(teacher_global_probs, student_global_logits.shape[0])
    denominator = N_GLOBAL_LOSS_TERMS + n_local_loss_terms(n_local)
    swapped = torch.cat((teacher_b, teacher_a))
    terms = {
        "dino_global": dino_cross_entropy(student_global_logits, swapped, student_temp) * 2 / denominator
    }
    if student_local_logits is not None:
        local = _local_cross_entropy_sum(student_local_logits, (teacher_a, teacher_b), n_local, student_temp)
        terms["dino_local"] = local / denominator
    return terms


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    masks_weight: torch.Tensor,
    n_images: int,
    student_temp: float,
) -> torch.Tensor:
    """iBOT loss over masked patches: -sum_m w_m sum_k t log_softmax(s / T) / n_images.

    ``masks_weight`` is 1 / (masked patches of the patch's image), so every masked image weighs the
    same whatever its mask size; ``n_images`` counts all global-crop images, masked or not
    (docs/reference_recipe.md §9.5). With no masked patch (M = 0) the result is a zero still attached
    to the graph.
    """
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    if student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError("student and teacher patch tensors must have the same [M, K] shape")
    if masks_weight.shape != student_patch_logits.shape[:1]:
        raise ValueError(f"masks_weight must have shape [M] = [{student_patch_logits.shape[0]}]")
    per_patch = _cross_entropy_rows(student_patch_logits, teacher_patch_probs, student_temp)
    return (per_patch * masks_weight.float()).sum() / n_images


def _nearest_neighbour_indices(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine similarity (x is L2-normalised)."""
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-1.0)
        return dots.argmax(dim=1)


def koleo_loss(x: torch.Tensor, eps: float) -> torch.Tensor:
    """KoLeo entropy regulariser on one chunk of CLS embeddings [B, D] (docs/reference_recipe.md §9.6).

    ``eps`` is the PairwiseDistance epsilon: RedDino raised it from 1e-8 to 1e-4 because of infinite
    losses. It is added to the difference vector, so exact duplicates give a finite distance.
    Computed per device on the local chunk (not gathered), as in the reference.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"KoLeo needs >= 2 samples per device and chunk (nearest neighbours), got {tuple(x.shape)}"
        )
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=KOLEO_NORMALIZE_EPS)
        neighbours = _nearest_neighbour_indices(x)
        distances = F.pairwise_distance(x, x[neighbours], p=2, eps=eps)
        return -torch.log(distances + KOLEO_LOG_EPS).mean()
