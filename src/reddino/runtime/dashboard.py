"""What a run shows on the W&B dashboard, written to the run directory first.

Every run logs its resolved config, its final metrics (also as the W&B run summary, which is what the
runs table and the parallel-coordinates panels of a sweep read), its results table and its figures.
Figures and tables are files in the run directory before they are logged, so an offline run loses
nothing and ``wandb sync <run dir>/wandb/offline-run-*`` uploads the same content later. Runs of one
Hydra multirun share a W&B group (``${run_group:...}`` in ``conf/logger/default.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from matplotlib.figure import Figure
from pytorch_lightning.loggers import Logger, WandbLogger


def run_group(task_name: str) -> str:
    """``<task>-<sweep timestamp>`` inside a Hydra multirun (one group per sweep), else ``<task>``."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{task_name}-{Path(HydraConfig.get().sweep.dir).name}"
    return task_name


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


def confusion_figure(confusion: np.ndarray, classes: list[str], title: str) -> Figure:
    """Row-normalised confusion matrix (true class per row), counts written in the cells."""
    counts = np.asarray(confusion, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = 1.2 + 0.45 * len(classes)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(
                j,
                i,
                f"{int(n)}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_title(title)
    return fig


def log_review(
    loggers: list[Logger],
    config: Mapping[str, Any],
    metrics: Mapping[str, float],
    tables: Mapping[str, pd.DataFrame],
    images: Mapping[str, Path],
    step: int,
) -> None:
    """Config and metrics to every logger; summary, tables and images to W&B."""
    for lg in loggers:
        lg.log_hyperparams(dict(config))
        lg.log_metrics(dict(metrics), step=step)
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update(dict(metrics))
            for name, table in tables.items():
                lg.log_table(name, dataframe=table)
            for name, path in images.items():
                lg.log_image(name, images=[str(path)], caption=[path.name])
        lg.save()
