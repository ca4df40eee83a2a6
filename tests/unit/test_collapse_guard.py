"""The collapse monitors read what they claim, and the guard turns failing monitors into a diagnosis."""

from __future__ import annotations

import math

import pytest
import torch

from reddino.callbacks import CollapseGuard
from reddino.ssl.heads import DINOHead
from reddino.ssl.monitors import collapse_monitors

K, D, B = 32, 24, 6


def guard(**changes) -> CollapseGuard:
    settings = dict(
        check_every_n_steps=10,
        patience=2,
        uniform_entropy_ratio=0.98,
        min_prototypes_used=1.5,
        min_cls_spread=0.05,
        stop=True,
    )
    return CollapseGuard(**{**settings, **changes})


def test_monitors_of_uniform_one_hot_and_healthy_targets():
    torch.manual_seed(0)
    head = DINOHead(in_dim=D, out_dim=K, hidden_dim=16, bottleneck_dim=8, nlayers=2)
    cls = torch.randn(2 * B, D)
    uniform = collapse_monitors(torch.full((2 * B, K), 1.0 / K), head, cls)
    assert uniform["entropy_ratio"] == pytest.approx(1.0) and uniform["prototypes_used"] == pytest.approx(K)
    one_hot = torch.zeros(2 * B, K)
    one_hot[:, 3] = 1.0
    collapsed = collapse_monitors(one_hot, head, torch.ones(2 * B, D))
    assert collapsed["prototypes_used"] == pytest.approx(1.0) and collapsed["entropy_ratio"] < 1e-6
    assert collapsed["cls_spread"] == pytest.approx(0.0, abs=1e-6)
    assert 0.5 < float(collapse_monitors(one_hot, head, cls)["cls_spread"]) < 1.5  # random features: ~1
    # the student agrees with a teacher that picks what the student picks (crops swapped)
    picks = head(cls).argmax(-1)
    targets = torch.nn.functional.one_hot(torch.cat((picks[B:], picks[:B])), K).float()
    assert collapse_monitors(targets, head, cls)["agreement"] == pytest.approx(1.0)


def test_the_guard_needs_patience_consecutive_failures_and_says_why():
    g = guard()
    assert g.check({"monitor/entropy_ratio": 0.99}, 10) == []
    assert g.check({"monitor/entropy_ratio": 0.5}, 20) == []  # a healthy check resets the count
    assert g.check({"monitor/entropy_ratio": 0.99}, 30) == []
    assert g.check({"monitor/entropy_ratio": 1.0}, 40) == ["uniform_targets"]
    assert "teacher targets uniform" in g.diagnoses["uniform_targets"]
    assert "for 20 steps" in g.diagnoses["uniform_targets"] and g.diagnoses["uniform_targets"].startswith(
        "step 40"
    )
    assert g.check({"monitor/entropy_ratio": 1.0}, 50) == []  # said once
    g2 = guard(patience=1)
    assert set(g2.check({"monitor/prototypes_used": 1.0, "monitor/cls_spread": 0.01}, 10)) == {
        "one_prototype",
        "constant_features",
    }
    assert guard(patience=1).check({"monitor/entropy_ratio": math.nan}, 10) == []
    with pytest.raises(ValueError, match="patience"):
        guard(patience=0)
