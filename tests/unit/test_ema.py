"""Teacher EMA update and name-based parameter pairing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reddino.ssl.ema import ema_param_pairs, ema_update_


def tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, 2, 2, generator=g)]


def test_update_matches_formula():
    teacher, student = tensors(0), tensors(1)
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, 0.9)
    for t, b, s in zip(teacher, before, student, strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    teacher, student = tensors(2), tensors(3)
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, 1.0)
    for t, b in zip(teacher, before, strict=True):
        assert torch.equal(t, b)
    ema_update_(teacher, student, 0.0)
    for t, s in zip(teacher, student, strict=True):
        assert torch.equal(t, s)


def test_student_is_not_modified():
    teacher, student = tensors(4), tensors(5)
    student_before = [s.clone() for s in student]
    ema_update_(teacher, student, 0.5)
    for s, b in zip(student, student_before, strict=True):
        assert torch.equal(s, b)


def test_length_and_shape_mismatch_raise():
    with pytest.raises(ValueError, match="3 tensors but student has 2"):
        ema_update_(tensors(0), tensors(1)[:2], 0.9)
    bad = tensors(1)
    bad[1] = torch.zeros(6)
    with pytest.raises(ValueError, match=r"tensor 1: teacher shape \(5,\) != student shape \(6,\)"):
        ema_update_(tensors(0), bad, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(tensors(0), tensors(1), 1.5)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
        self.dino_head = nn.Linear(3, 2, bias=False)


def test_param_pairs_cover_all_params_and_update_modules():
    student = Tiny()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    t_params, s_params = ema_param_pairs(teacher, student)
    assert len(t_params) == len(s_params) == len(list(student.parameters()))
    expected = {
        n: 0.5 * t.detach().clone() + 0.5 * dict(student.named_parameters())[n].detach()
        for n, t in teacher.named_parameters()
    }
    ema_update_(t_params, s_params, 0.5)
    for name, param in teacher.named_parameters():
        torch.testing.assert_close(param, expected[name])


def test_param_pairs_match_by_name_not_order():
    student = Tiny()
    teacher = Tiny()
    t_params, s_params = ema_param_pairs(teacher, student)
    t_names = {id(p): n for n, p in teacher.named_parameters()}
    s_names = {id(p): n for n, p in student.named_parameters()}
    assert [t_names[id(p)] for p in t_params] == [s_names[id(p)] for p in s_params]


def test_param_pairs_raise_on_name_mismatch():
    student = Tiny()
    teacher = Tiny()
    teacher.ibot_head = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"only in teacher \['ibot_head.bias', 'ibot_head.weight'\]"):
        ema_param_pairs(teacher, student)
    with pytest.raises(ValueError, match=r"only in student \['ibot_head.bias', 'ibot_head.weight'\]"):
        ema_param_pairs(student, teacher)


def test_param_pairs_raise_on_shape_mismatch():
    student = Tiny()
    teacher = Tiny()
    teacher.dino_head = nn.Linear(3, 5, bias=False)
    with pytest.raises(ValueError, match=r"dino_head.weight: teacher \(5, 3\) vs student \(2, 3\)"):
        ema_param_pairs(teacher, student)
