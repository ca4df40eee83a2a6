"""A run's trained backbone and data for the figures: the export, its labelled units, their embeddings,
and the synthetic smears it was trained on."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from reddino.data.datasets import LabelledUnitDataset, eval_transform
from reddino.data.synthetic import ensure_synthetic_dataset, read_instances
from reddino.eval.features import labelled_features
from reddino.run_specs import plain_value, read_run_units
from reddino.viz.runs import run_config
from reddino.weights import LoadedBackbone, load_backbone


def run_backbone(run_dir: str | Path) -> LoadedBackbone:
    """The run's trained backbone: its ``export/``, else the ``weights`` an evaluation run scored."""
    run_dir = Path(run_dir)
    if (run_dir / "export").is_dir():
        return load_backbone(run_dir / "export")
    weights = run_config(run_dir).get("weights")
    if weights is None:
        raise FileNotFoundError(f"{run_dir}: no export/ and no weights in its config")
    return load_backbone(weights)


def local_cache_dir() -> Path:
    """Where this machine keeps generated data (REDDINO_CACHE_DIR, as ``conf/paths`` says): a run
    directory from elsewhere names its own, which is never written to."""
    default = Path(os.environ.get("HOME", "/tmp")) / ".cache" / "reddino"
    return Path(os.environ.get("REDDINO_CACHE_DIR", default))


def run_units(run_dir: str | Path, max_units: int, seed: int) -> pd.DataFrame:
    """A seeded subsample of the labelled evaluation units of the run's data config (read as plain
    values by ``reddino.run_specs``: the run's config is never instantiated)."""
    data = run_config(run_dir).data
    units = read_run_units(
        OmegaConf.to_container(data.eval_units, resolve=False), local_cache_dir() / "synthetic"
    )
    if len(units) > max_units:
        units = units.sample(n=max_units, random_state=seed).sort_index()
    return units.reset_index(drop=True)


def embed_units(
    backbone: LoadedBackbone, units: pd.DataFrame, classes: list[str], batch_size: int
) -> np.ndarray:
    """CLS features of ``units`` at the backbone's input size and normalisation (CPU or GPU), whitened
    when the export ships a whitening (as reddino-eval scores them)."""
    transform = eval_transform(backbone.input_size, backbone.mean, backbone.std)
    dataset = LabelledUnitDataset(units, transform, classes, cache_size=64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    feats, _ = labelled_features(
        backbone.model.to(device), dataset, "cls", batch_size, 0, None, backbone.whitening
    )
    return feats.numpy()


def synthetic_smear(run_dir: str | Path, source: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, instance map) of the ``index``-th smear of ``source`` in the run's synthetic data."""
    data = run_config(run_dir).data
    if data.get("name") != "synthetic":
        raise ValueError(f"{run_dir}: data is {data.get('name')!r}, not synthetic; pass an image instead")
    gen = plain_value(OmegaConf.to_container(data.generator, resolve=False), "data.generator")
    root = ensure_synthetic_dataset(
        local_cache_dir() / "synthetic",
        **{**gen, "smear_size": tuple(gen["smear_size"]), "cells_per_smear": tuple(gen["cells_per_smear"])},
    )
    smears = pd.read_parquet(root / "smears.parquet")
    rows = smears[smears["source"] == source].reset_index(drop=True)
    if not len(rows):
        raise ValueError(f"no smears of source {source!r}; sources: {sorted(set(smears['source']))}")
    row = rows.iloc[index % len(rows)]
    image = cv2.cvtColor(cv2.imread(str(root / row["file"])), cv2.COLOR_BGR2RGB)
    return image, read_instances(root / row["mask_file"])
