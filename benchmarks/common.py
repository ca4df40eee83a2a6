"""Shared by the training benchmarks: compose the real pretraining config outside a Hydra run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import reddino.config  # noqa: F401  (resolvers)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def pretrain_config(overrides: list[str]) -> DictConfig:
    """``conf/pretrain.yaml`` with command-line style overrides; outputs go to a temporary directory."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose("pretrain", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="reddino-bench-")
    return cfg
