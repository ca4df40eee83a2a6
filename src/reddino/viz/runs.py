"""Where the runs are and what they scored: run directories, their config and ``results.json``.

A pretraining run directory (``outputs/pretrain/<time>``) holds ``config.yaml`` (resolved),
``results.json`` and ``export/``; an evaluation run (``outputs/eval/<time>``) holds ``config.yaml`` with
the ``weights`` it scored and ``results.json``. Relative paths are taken from the repository root, where
``make`` runs, so a notebook finds the same runs whether it is opened from ``notebooks/`` or executed
by ``make figures``. Loading a run's backbone and data is ``reddino.viz.run_data`` (torch, timm).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from reddino.runtime.paths import project_root

REPO_ROOT = project_root()


def from_repo(path: str | Path) -> Path:
    """``path`` as given when absolute, else relative to the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def latest_run(root: str | Path, marker: str) -> Path:
    """The newest subdirectory of ``root`` (timestamped names sort by time) that holds ``marker``."""
    root = from_repo(root)
    runs = sorted(p for p in root.glob("*") if (p / marker).exists()) if root.is_dir() else []
    if not runs:
        raise FileNotFoundError(
            f"no run with {marker} under {root}: run the make target that writes it first"
        )
    return runs[-1]


def run_config(run_dir: str | Path) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no config.yaml)")
    return OmegaConf.load(path)


def run_results(run_dir: str | Path) -> dict[str, Any]:
    """The ``results`` block of ``results.json``: {model: {probe: {metric: {mean, std, folds}}}}."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run has no results (did it finish?)")
    return json.loads(path.read_text())["results"]


def merged_results(run_dirs: list[str | Path]) -> dict[str, Any]:
    """The models of several runs in one table; with more than one run, each model is prefixed by its run
    directory's name so two runs' ``pretrained_teacher`` rows stay apart."""
    merged: dict[str, Any] = {}
    for run in run_dirs:
        for model, scores in run_results(run).items():
            merged[model if len(run_dirs) == 1 else f"{Path(run).name}/{model}"] = scores
    return merged
