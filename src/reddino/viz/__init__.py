"""Figures of the paper from run directories; the notebooks in ``notebooks/`` only call these.

- ``plots``: Figure 2 (ablation bars) and the results table (models x metrics, mean ± std);
- ``pca``: Figure 3, PCA of patch tokens as RGB next to the input;
- ``umap``: Figure 4, UMAP coloured by class and by subject/source side by side;
- ``runs``: finding run directories and reading their config and scores;
- ``run_data``: a run's backbone, labelled units, embeddings and synthetic smears;
- ``execute``: running the notebooks (``make figures`` and the tests).

Names are imported lazily, so ``reddino.viz.plots`` does not pull in torch or umap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ablation_bars": "plots",
    "results_table": "plots",
    "flat_columns": "plots",
    "table_figure": "plots",
    "patch_tokens": "pca",
    "patch_foreground": "pca",
    "patch_pca": "pca",
    "pca_figure": "pca",
    "umap_embedding": "umap",
    "umap_panels": "umap",
    "REPO_ROOT": "runs",
    "from_repo": "runs",
    "latest_run": "runs",
    "run_config": "runs",
    "run_results": "runs",
    "run_backbone": "run_data",
    "run_units": "run_data",
    "embed_units": "run_data",
    "synthetic_smear": "run_data",
    "merged_results": "runs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"reddino.viz.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'reddino.viz' has no attribute {name!r}")
