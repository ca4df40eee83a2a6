"""Figure 2 (ablation bars) and the results table in the paper's layout (models x metrics, mean ± std).

Figures are ``matplotlib.figure.Figure`` objects built without pyplot: no global figure state, no
backend choice, nothing to close; callers save or display them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

METRIC_LABELS = {
    "weighted_f1": "wF1",
    "balanced_accuracy": "bAcc",
    "accuracy": "Acc",
    "macro_f1": "macro F1",
}
MODEL_LABELS = {"pretrained_teacher": "teacher", "random_init": "random init", "init_weights": "init weights"}


def ablation_bars(frame: pd.DataFrame, metric: str) -> Figure:
    """Grouped bars of ``metric`` (%, ± std over folds) per variant, one panel per k, one bar per model.

    ``frame`` is ``reddino.ablations.summary.collect``'s table. Variants keep job order; a failed job
    keeps its slot, marked "failed", so a missing bar is never mistaken for a zero score. The dashed line
    is the baseline job's teacher.
    """
    columns = ["job", "variant", "axis", "status", *(["seed"] if "seed" in frame else [])]
    jobs = frame.drop_duplicates("job")[columns].reset_index(drop=True)
    labels = list(jobs["variant"])
    if "seed" in jobs and jobs["seed"].nunique() > 1:  # several seeds: one bar per job, named by seed
        labels = [
            f"{v} (seed {int(s)})" if s == s else v
            for v, s in zip(jobs["variant"], jobs["seed"], strict=True)
        ]
    scored = frame[frame["status"] == "ok"]
    ks = list(dict.fromkeys(scored["probe"]))
    models = list(dict.fromkeys(scored["model"]))
    panels = max(len(ks), 1)
    fig = Figure(figsize=(1.2 + 1.1 * len(jobs) * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False, sharey=True)[0]
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(jobs))
    for ax, k in zip(axes, ks or [None], strict=True):
        for i, model in enumerate(models):
            rows = scored[(scored["probe"] == k) & (scored["model"] == model)].set_index("job")
            means = [100 * rows.at[j, f"{metric}_mean"] if j in rows.index else np.nan for j in jobs["job"]]
            stds = [100 * rows.at[j, f"{metric}_std"] if j in rows.index else np.nan for j in jobs["job"]]
            ax.bar(
                x + (i - (len(models) - 1) / 2) * width,
                means,
                width,
                yerr=stds,
                capsize=2,
                label=MODEL_LABELS.get(model, model),
            )
        base = scored[(scored["axis"] == "baseline") & (scored["probe"] == k)]
        base = base[base["model"] == "pretrained_teacher"]
        if len(base):
            ax.axhline(  # the mean over the baseline's seeds
                100 * base[f"{metric}_mean"].mean(), color="0.3", ls="--", lw=1, label="baseline teacher"
            )
        for xi, status in zip(x, jobs["status"], strict=True):
            if status != "ok":
                ax.text(xi, 1, "failed", ha="center", va="bottom", rotation=90, color="tab:red")
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(jobs) - 0.4)  # keeps the slots of failed jobs at the ends visible
        ax.set_title(probe_label(k) if k else "no job finished")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
    if models:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(f"Ablations: {METRIC_LABELS.get(metric, metric)} of the k-NN report per variant")
    return fig


def probe_label(probe: str) -> str:
    """``knn1`` reads ``1-NN``; other probes (``linear``) keep their name."""
    if probe.startswith("knn") and probe[3:].isdigit():
        return f"{probe[3:]}-NN"
    return probe


def _probe_order(label: str) -> tuple[int, int, str]:
    """The paper's column order: linear probe, then k-NN by increasing k, then anything else."""
    if label == "linear":
        return (0, 0, label)
    if label.endswith("-NN") and label[:-3].isdigit():
        return (1, int(label[:-3]), label)
    return (2, 0, label)


def results_table(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str]
) -> pd.DataFrame:
    """The paper's table: one row per model, columns (probe, metric) as "mean ± std" in %.

    ``results`` is ``{model: {probe: {metric: {"mean", "std"}}}}``, as in ``results.json`` of
    reddino-pretrain and reddino-eval (probes ``linear``, ``knn1``...); a probe or metric
    a model lacks gives an empty cell.
    """
    by_label = {
        model: {probe_label(p): scores for p, scores in by_probe.items()}
        for model, by_probe in results.items()
    }
    labels = sorted({label for by_probe in by_label.values() for label in by_probe}, key=_probe_order)
    columns = pd.MultiIndex.from_tuples(
        [(label, METRIC_LABELS.get(m, m)) for label in labels for m in metrics], names=["probe", "metric"]
    )
    rows = []
    for by_probe in by_label.values():
        row = []
        for label in labels:
            for m in metrics:
                s = by_probe.get(label, {}).get(m)
                row.append(f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s else "")
        rows.append(row)
    index = pd.Index([MODEL_LABELS.get(m, m) for m in results], name="model")
    return pd.DataFrame(rows, index=index, columns=columns)


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``results_table`` with one header row ("1-NN wF1") and the model as a column, for Markdown/CSV."""
    flat = table.copy()
    flat.columns = [" ".join(c) for c in table.columns]
    return flat.reset_index()


def table_figure(table: pd.DataFrame, title: str) -> Figure:
    """``results_table`` drawn as a figure (two header rows: probe, then metric)."""
    flat = flat_columns(table)
    fig = Figure(
        figsize=(1.6 + 1.25 * (flat.shape[1] - 1), 0.8 + 0.35 * (len(flat) + 1)), layout="constrained"
    )
    ax = fig.add_subplot()
    ax.axis("off")
    cell_text = flat.to_numpy().tolist()
    col_labels = ["model"] + [f"{p}\n{m}" for p, m in table.columns]
    tab = ax.table(cellText=cell_text, colLabels=col_labels, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1.0, 1.6)
    ax.set_title(title, fontsize=9)
    return fig
