"""EpochSampler: seeded per-epoch order, one global order split over ranks, mid-epoch resume."""

from __future__ import annotations

import numpy as np
import pytest

import reddino.data.samplers as samplers
from reddino.data.samplers import EpochSampler


def test_order_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(50, None, seed=3), EpochSampler(50, None, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))  # a permutation without weights
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(EpochSampler(50, None, seed=4)) != list(EpochSampler(50, None, seed=3))


def test_weighted_draws_follow_the_weights():
    weights = np.array([0.0] * 10 + [1.0] * 10)
    drawn = list(EpochSampler(20, weights, seed=0))
    assert len(drawn) == 20 and all(i >= 10 for i in drawn)


def test_ranks_split_one_global_order(monkeypatch):
    full = EpochSampler(11, None, seed=1)
    full.set_epoch(1)
    order = full.global_order(1)
    shares = []
    for r in range(2):
        monkeypatch.setattr(samplers, "world_size", lambda: 2)
        monkeypatch.setattr(samplers, "rank", lambda r=r: r)
        s = EpochSampler(11, None, seed=1)
        s.set_epoch(1)
        assert len(s) == 5  # the odd unit out is dropped so both ranks take the same number of steps
        shares.append(list(s))
    assert shares[0] == order[0:10:2].tolist() and shares[1] == order[1:10:2].tolist()
    # one global batch of 4 at world size 1 == the union of two per-rank batches of 2
    assert sorted(order[:4].tolist()) == sorted(shares[0][:2] + shares[1][:2])


def test_resume_skips_consumed_batches_of_that_epoch_only():
    ref = EpochSampler(30, None, seed=0)
    ref.set_epoch(1)
    full = list(ref)
    s = EpochSampler(30, None, seed=0)
    s.resume_at(epoch=1, batches_done=3, batch_size=4)
    s.set_epoch(1)
    assert list(s) == full[12:]
    assert list(s) == full  # one-shot: the next pass over epoch 1 is whole again

    boundary = EpochSampler(30, None, seed=0)
    boundary.resume_at(epoch=0, batches_done=7, batch_size=4)  # checkpoint at the end of epoch 0
    boundary.set_epoch(1)
    assert list(boundary) == full


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="at least one unit"):
        EpochSampler(0, None, seed=0)
    with pytest.raises(ValueError, match="3 weights for 4 units"):
        EpochSampler(4, np.ones(3), seed=0)
