"""Teacher exponential moving average over ALL student parameters (backbone and heads), as in DINOv2."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _check_pairs(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> None:
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
    for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
        if t.shape != s.shape:
            raise ValueError(f"tensor {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")


@torch.no_grad()
def ema_update_(teacher: Sequence[Tensor], student: Sequence[Tensor], momentum: float) -> None:
    """In place: teacher = m * teacher + (1 - m) * student, with one fused foreach kernel per op."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    _check_pairs(teacher, student)
    if not teacher:
        return
    teacher_list = list(teacher)
    torch._foreach_mul_(teacher_list, momentum)
    torch._foreach_add_(teacher_list, list(student), alpha=1.0 - momentum)


def ema_param_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Teacher and student parameters matched by name; any name present on one side only is an error."""
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    only_teacher = sorted(teacher_params.keys() - student_params.keys())
    only_student = sorted(student_params.keys() - teacher_params.keys())
    if only_teacher or only_student:
        raise ValueError(
            f"teacher/student parameter names differ: only in teacher {only_teacher}, "
            f"only in student {only_student}"
        )
    names = list(student_params)
    mismatched = [
        f"{n}: teacher {tuple(teacher_params[n].shape)} vs student {tuple(student_params[n].shape)}"
        for n in names
        if teacher_params[n].shape != student_params[n].shape
    ]
    if mismatched:
        raise ValueError(f"teacher/student parameter shapes differ: {mismatched}")
    return [teacher_params[n] for n in names], [student_params[n] for n in names]
