"""Shared fixtures: Hydra composition of the real configs at test sizes, and data-root detection."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from threadpoolctl import threadpool_limits

import reddino.runtime.resolvers
import reddino.runtime.schemas  # noqa: F401  (registers the typed config schemas)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:  # test helpers: W&B offline reader, callbacks injected into CLI runs
    sys.path.insert(0, str(SUPPORT))


def compose_config(config_name: str, overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """Compose like the CLI would (hydra config included) and point outputs/caches into tmp dirs."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as under @hydra.main: the job config has no hydra node (resolvers still work)
        if "paths" in cfg:
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.cache_dir = str(cache_dir)
    return cfg


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir for generated synthetic data, shared by all tests of a session."""
    return tmp_path_factory.mktemp("reddino-cache")


@pytest.fixture
def make_cfg(tmp_path: Path, synthetic_cache: Path):
    def factory(*overrides: str, config_name: str = "pretrain") -> DictConfig:
        return compose_config(config_name, list(overrides), tmp_path / "run", synthetic_cache)

    yield factory
    GlobalHydra.instance().clear()


def data_root() -> Path | None:
    root = os.environ.get("REDDINO_DATA_ROOT")
    return Path(root) if root and Path(root).is_dir() else None


@pytest.fixture(scope="module")
def single_thread():
    """One BLAS/OpenMP thread: on a shared 2-core box, solver threads spin against other jobs (measured:
    up to 50x slower for the L-BFGS probes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service():
    """``wandb.init`` in this process exports WANDB_SERVICE; CLI runs that later tests start as subprocesses
    would inherit it and share this process's W&B service, where a SIGKILLed run's id stays "in use"."""
    yield
    os.environ.pop("WANDB_SERVICE", None)
