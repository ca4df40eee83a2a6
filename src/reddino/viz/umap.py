"""Figure 4: a 2-D UMAP of embeddings, drawn once per colouring (class, and subject or source) side by side.

One embedding, several colourings: the panels share their coordinates, so a cluster that is one class
in the left panel and one slide in the right panel reads as a batch effect at a glance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def umap_embedding(features: np.ndarray, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(xy [n, 2], indices into ``features``) of a seeded subsample of at most ``max_points`` rows."""
    import umap  # numba compiles on first import: only pay for it when a UMAP is drawn

    rng = np.random.default_rng(seed)
    n = len(features)
    idx = np.sort(rng.choice(n, size=min(max_points, n), replace=False))
    reducer = umap.UMAP(n_neighbors=min(15, len(idx) - 1), random_state=seed, n_jobs=1)
    return reducer.fit_transform(np.asarray(features, dtype=np.float32)[idx]), idx


def umap_panels(xy: np.ndarray, colourings: Mapping[str, Sequence[str]], title: str) -> Figure:
    """One scatter panel per colouring (panel title -> one label per point), same coordinates in each."""
    fig = Figure(figsize=(5.2 * len(colourings), 4.6), layout="constrained")
    axes = fig.subplots(1, len(colourings), squeeze=False)[0]
    for ax, (name, labels) in zip(axes, colourings.items(), strict=True):
        values = np.asarray([str(v) for v in labels])
        if len(values) != len(xy):
            raise ValueError(f"{name}: {len(values)} labels for {len(xy)} points")
        groups = sorted(set(values))
        cmap = "tab10" if len(groups) <= 10 else "tab20"
        for i, value in enumerate(groups):
            sel = values == value
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=_colour(cmap, i, len(groups)), label=value)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(markerscale=3, fontsize=6, loc="best", ncol=1 + len(groups) // 12)
    fig.suptitle(title)
    return fig


def _colour(cmap: str, i: int, n: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    cm = colormaps[cmap if n <= 20 else "turbo"]
    return cm(i % cm.N) if n <= 20 else cm(i / max(n - 1, 1))
