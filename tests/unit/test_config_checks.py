"""A typo or a wrong type in an option stops the run before it starts, naming option, value and choices."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from reddino.runtime.config_checks import (
    ConfigError,
    check_config,
    check_crop_sizes,
    check_schedule_length,
    embed_rules,
    eval_rules,
    pack_rules,
    prepare_rules,
    pretrain_rules,
)
from reddino.runtime.schemas import LoaderSchema, SSLSchema


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("units=[patchs]", r"units=\['patchs'\]: has \['patchs'\]; allowed values are \['patch', 'cell'\]"),
        ("units=[]", "units=\\[\\]: must name at least one"),
        ("chunk_size=0", "chunk_size=0: must be at least 1"),
        ("max_images=-1", "max_images=-1: must be at least 1"),
        ("missing_sources=ignore", r"missing_sources='ignore': must be one of \['skip', 'error'\]"),
        ("segmentation.backend=cellpse", "segmentation.backend='cellpse': must be one of"),
        ("cells.segment=sometimes", "cells.segment='sometimes'"),
    ],
)
def test_prepare_options_are_checked(make_cfg, override, message):
    cfg = make_cfg(override, config_name="prepare")
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, prepare_rules())


def test_defaults_pass_every_table(make_cfg):
    check_config(make_cfg(config_name="prepare"), prepare_rules())
    check_config(make_cfg(config_name="pack"), pack_rules())
    check_config(make_cfg("weights=w", "folder=f", "out=o", config_name="embed"), embed_rules())
    check_config(make_cfg(config_name="eval"), eval_rules())
    cfg = make_cfg()
    check_config(cfg, pretrain_rules())
    check_schedule_length(cfg)
    for data in ("real", "txl_pbc_rbc"):
        check_config(make_cfg(f"data={data}"), pretrain_rules())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.loader.batch_size=0", "data.loader.batch_size=0: must be at least 1"),
        ("data.pretrain_units.unit=cells", "data.pretrain_units.unit='cells'"),
        ("ssl.centering.method=sinkhorn", "ssl.centering.method='sinkhorn'"),
        ("augment.n_global=3", r"augment.n_global=3: must be one of \[2\]"),
        ("ssl.optim.freeze_backbone_epochs=-1", "ssl.optim.freeze_backbone_epochs=-1.0: must be at least 0"),
        ("report.probes.knn.metric=cos", "report.probes.knn.metric='cos': must be one of"),
    ],
)
def test_pretrain_options_are_checked(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(make_cfg(override), pretrain_rules())


@pytest.mark.parametrize(
    "override",
    [
        "data.loader.batch_size=abc",
        "ssl.optim.base_lr=abc",
        "ssl.head.chunked=maybe",
        "crops.n_local=1.5",
    ],
)
def test_a_wrong_type_fails_when_the_config_is_composed_naming_the_key(make_cfg, override):
    """The typed schemas (reddino.runtime.schemas): nothing runs, the error names the key."""
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(override)
    assert key in f"{err.value} {err.value.__cause__}"


@pytest.mark.parametrize("experiment", ["embedded", "real_cpu", "reddino_s", "real_gpu_s"])
@pytest.mark.parametrize("ssl", ["reddino", "dinov2", "dinobloom"])
def test_every_recipe_is_typed_by_the_schemas(make_cfg, experiment, ssl):
    cfg = make_cfg(f"experiment={experiment}", f"ssl={ssl}")
    assert OmegaConf.get_type(cfg.ssl) is SSLSchema
    assert OmegaConf.get_type(cfg.data.loader) is LoaderSchema
    assert isinstance(cfg.ssl.optim.base_lr, float) and isinstance(cfg.data.loader.batch_size, int)


@pytest.mark.parametrize("steps", ["-1", "100000"])
def test_training_past_the_schedules_is_refused(make_cfg, steps):
    with pytest.raises(ConfigError, match=f"trainer.max_steps={steps}: must be between 1 and"):
        check_schedule_length(make_cfg(f"trainer.max_steps={steps}"))


def test_eval_options_are_checked(make_cfg):
    with pytest.raises(ConfigError, match=r"features\.pooling='mean'.*probes\.knn\.metric='cos'"):
        check_config(
            make_cfg("features.pooling=mean", "probes.knn.metric=cos", config_name="eval"), eval_rules()
        )


def test_the_cli_prints_one_line_not_a_traceback(tmp_path):
    cmd = [sys.executable, "-m", "reddino.prepare", "units=[patchs]", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "reddino-prepare: error: units=['patchs']: has ['patchs']" in done.stderr
    assert "Traceback" not in done.stderr
    debug = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "REDDINO_DEBUG": "1"}
    )
    assert debug.returncode != 0 and "ConfigError" in debug.stderr


@pytest.mark.parametrize("experiment", ["embedded", "reddino_s", "reddino_b", "reddino_l", "reddino_g"])
@pytest.mark.parametrize("ssl", ["reddino", "dinov2", "dinobloom"])
def test_every_recipe_has_crops_made_of_whole_patches(make_cfg, experiment, ssl):
    check_crop_sizes(make_cfg(f"experiment={experiment}", f"ssl={ssl}"))


def test_a_crop_that_is_not_whole_patches_is_refused(make_cfg):
    cfg = make_cfg("experiment=reddino_b", "ssl=dinov2", "crops.local_size=96")
    message = r"crops\.local_size=96: not a multiple of model\.patch_size=14"
    with pytest.raises(ConfigError, match=message):
        check_crop_sizes(cfg)


def test_an_experiment_can_require_an_option(make_cfg, tmp_path):
    cfg = make_cfg("experiment=continue_real_cpu")
    with pytest.raises(ConfigError, match=r"init is required here .*set init=\.\.\."):
        check_config(cfg, pretrain_rules())
    check_config(make_cfg("experiment=continue_real_cpu", f"init={tmp_path}"), pretrain_rules())
