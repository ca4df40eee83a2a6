"""What the figure notebooks read from a run directory: its config, scores, backbone, units and images.

A pretraining run directory (``outputs/pretrain/<time>``) holds ``config.yaml`` (resolved),
``results.json`` and ``export/``; an evaluation run (``outputs/eval/<time>``) holds ``config.yaml`` with
the ``weights`` it scored and ``results.json``. Relative paths are taken from the repository root, where
``make`` runs, so a notebook finds the same runs whether it is opened from ``notebooks/`` or executed
by ``make figures``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import reddino.config  # noqa: F401  (resolvers of the saved configs)
from reddino.data.datasets import LabelledUnitDataset, eval_transform
from reddino.data.synthetic import ensure_synthetic_dataset, read_instances
from reddino.eval.features import extract_cls_features
from reddino.weights import LoadedBackbone, load_backbone

REPO_ROOT = Path(__file__).resolve().parents[3]


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


def run_backbone(run_dir: str | Path) -> LoadedBackbone:
    """The run's trained backbone: its ``export/``, else the ``weights`` an evaluation run scored."""
    run_dir = Path(run_dir)
    if (run_dir / "export").is_dir():
        return load_backbone(run_dir / "export")
    weights = run_config(run_dir).get("weights")
    if weights is None:
        raise FileNotFoundError(f"{run_dir}: no export/ and no weights in its config")
    return load_backbone(weights)


def run_units(run_dir: str | Path, max_units: int, seed: int) -> pd.DataFrame:
    """A seeded subsample of the labelled evaluation units of the run's data config."""
    units = instantiate(run_config(run_dir).data.eval_units)
    if len(units) > max_units:
        units = units.sample(n=max_units, random_state=seed).sort_index()
    return units.reset_index(drop=True)


def embed_units(
    backbone: LoadedBackbone, units: pd.DataFrame, classes: list[str], batch_size: int
) -> np.ndarray:
    """CLS features of ``units`` at the backbone's input size and normalisation (CPU or GPU)."""
    import torch

    transform = eval_transform(backbone.input_size, backbone.mean, backbone.std)
    dataset = LabelledUnitDataset(units, transform, classes, cache_size=64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    feats, _ = extract_cls_features(backbone.model, dataset, batch_size, 0, device)
    return feats.numpy()


def synthetic_smear(run_dir: str | Path, source: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, instance map) of the ``index``-th smear of ``source`` in the run's synthetic data."""
    data = run_config(run_dir).data
    if data.get("name") != "synthetic":
        raise ValueError(f"{run_dir}: data is {data.get('name')!r}, not synthetic; pass an image instead")
    gen = OmegaConf.to_container(data.generator, resolve=True)
    root = ensure_synthetic_dataset(
        data.cache_dir,
        **{**gen, "smear_size": tuple(gen["smear_size"]), "cells_per_smear": tuple(gen["cells_per_smear"])},
    )
    smears = pd.read_parquet(root / "smears.parquet")
    rows = smears[smears["source"] == source].reset_index(drop=True)
    if not len(rows):
        raise ValueError(f"no smears of source {source!r}; sources: {sorted(set(smears['source']))}")
    row = rows.iloc[index % len(rows)]
    image = cv2.cvtColor(cv2.imread(str(root / row["file"])), cv2.COLOR_BGR2RGB)
    return image, read_instances(root / row["mask_file"])
