"""The data-size rule: lightly-train's anchors, log-linear between them, and only ``auto`` is replaced."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from reddino.ssl.data_size_rule import (
    apply_data_size_rule,
    momentum_for,
    prototypes_for,
    ruled_values,
    teacher_temp_for,
)


@pytest.mark.parametrize(
    ("units", "prototypes"),
    [(20_000, 1024), (100_000, 4096), (200_000, 16384), (500_000, 65536), (5_000_000, 65536), (1_000, 256)],
)
def test_prototypes_hit_the_anchors_and_stay_powers_of_two(units, prototypes):
    assert prototypes_for(units) == prototypes


def test_between_anchors_the_values_grow_monotonically():
    sizes = [2_000, 10_000, 20_000, 31_700, 60_000, 150_000, 300_000, 1_280_000, 3_000_000]
    k = [prototypes_for(n) for n in sizes]
    t = [teacher_temp_for(n) for n in sizes]
    m = [momentum_for(n) for n in sizes]
    assert k == sorted(k) and t == sorted(t) and m == sorted(m)
    assert all((v & (v - 1)) == 0 for v in k)
    assert teacher_temp_for(20_000) == 0.02 and teacher_temp_for(1_280_000) == 0.07
    assert momentum_for(10_000) == 0.99 and momentum_for(1_280_000) == 0.996
    assert 0.02 < teacher_temp_for(160_000) < 0.07


def test_only_auto_is_replaced_and_what_was_set_is_returned():
    cfg = OmegaConf.create(
        {
            "ssl": {
                "head": {"n_prototypes": "auto", "ibot_n_prototypes": 512},
                "teacher": {"teacher_temp": "auto", "warmup_teacher_temp": 0.04, "momentum_teacher": "auto"},
            }
        }
    )
    applied = apply_data_size_rule(cfg, 100_000)
    assert applied == {
        "ssl.head.n_prototypes": 4096,
        "ssl.teacher.teacher_temp": ruled_values(100_000)["ssl.teacher.teacher_temp"],
        "ssl.teacher.momentum_teacher": ruled_values(100_000)["ssl.teacher.momentum_teacher"],
    }
    assert cfg.ssl.head.ibot_n_prototypes == 512 and cfg.ssl.teacher.warmup_teacher_temp == 0.04
    with pytest.raises(ValueError, match="at least one pretraining unit"):
        ruled_values(0)


def test_auto_passes_the_config_checks_and_a_typo_does_not(make_cfg):
    from reddino.runtime.config_checks import ConfigError, check_config, pretrain_rules

    check_config(make_cfg("ssl.head.n_prototypes=auto", "ssl.teacher.teacher_temp=auto"), pretrain_rules())
    with pytest.raises(ConfigError, match=r"ssl.head.n_prototypes='aut'.*\(or auto\)"):
        check_config(make_cfg("ssl.head.n_prototypes=aut"), pretrain_rules())
