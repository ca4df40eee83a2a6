"""Run-directory helpers of reddino-pretrain: W&B run id persistence and resume resolution."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from reddino.runtime.paths import config_dir
from reddino.runtime.run_dir import checkpoint_to_resume, logger_run_id, run_id_of

CONF = str(config_dir())


def test_run_id_is_created_once_and_reused(tmp_path):
    first = run_id_of(tmp_path / "run")
    assert first == run_id_of(tmp_path / "run") == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert first != run_id_of(tmp_path / "other")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["wandb_run_id"]  # no temp file left


def test_only_wandb_loggers_without_an_id_get_the_directory_id(tmp_path):
    wandb = OmegaConf.create({"_target_": "pytorch_lightning.loggers.WandbLogger", "id": None})
    assert logger_run_id(wandb, tmp_path) == {"id": run_id_of(tmp_path)}
    assert logger_run_id(OmegaConf.merge(wandb, {"id": "mine"}), tmp_path) == {}
    assert (
        logger_run_id(OmegaConf.create({"_target_": "pytorch_lightning.loggers.CSVLogger"}), tmp_path) == {}
    )


def test_resume_resolves_last_checkpoint_or_names_what_is_missing(tmp_path):
    cfg = OmegaConf.create({"resume": str(tmp_path), "ckpt_path": None})
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'checkpoints' / 'last.ckpt'}"):
        checkpoint_to_resume(cfg)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert checkpoint_to_resume(cfg) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="not both"):
        checkpoint_to_resume(OmegaConf.merge(cfg, {"ckpt_path": "x.ckpt"}))
    assert checkpoint_to_resume(OmegaConf.create({"resume": None, "ckpt_path": "x.ckpt"})) == "x.ckpt"


def test_runs_of_one_multirun_share_a_wandb_group():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from reddino.runtime.dashboard import run_group

    sweep = "hydra.sweep.dir=multirun/pretrain/2026-01-02_03-04-05"
    groups = []
    for mode in ("MULTIRUN", "RUN"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=CONF):
            cfg = compose("pretrain", [sweep, f"hydra.mode={mode}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        groups.append(run_group("pretrain"))
    GlobalHydra.instance().clear()
    assert groups == ["pretrain-2026-01-02_03-04-05", "pretrain"]
