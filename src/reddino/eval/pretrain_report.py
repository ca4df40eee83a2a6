"""The end of pretraining: the feature whitening fitted for the export, the probes on the trained teacher
and on the network it started from (held-out labelled units, folds grouped by smear), and the review
figures (UMAP, PCA of patch tokens)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from reddino.data.datasets import DecodedUnitDataset, LabelledUnitDataset, collate_decoded, eval_transform
from reddino.eval.features import FeatureExtractor, labelled_features
from reddino.eval.protocols import make_splits
from reddino.eval.session import probes_description, score_feature_set
from reddino.eval.whitening import FeatureWhitening, fit_whitening
from reddino.runtime.dashboard import save_figure

log = logging.getLogger("reddino.pretrain")


def fit_export_whitening(cfg: DictConfig, teacher: torch.nn.Module, units: pd.DataFrame) -> FeatureWhitening:
    """``whitening.*``: the teacher's CLS whitening, fitted on up to ``max_units`` pretraining units (a
    seeded sample, no labels), each fed as the evaluation feeds a unit (resized, normalised). Units whose
    image no longer decodes are skipped and counted in the log, not fatal at the end of a long run."""
    w = cfg.whitening
    if len(units) > w.max_units:
        units = units.sample(n=w.max_units, random_state=cfg.seed)
    transform = eval_transform(cfg.crops.global_size, cfg.augment.mean, cfg.augment.std)
    dataset = DecodedUnitDataset(units.reset_index(drop=True), transform, 64)
    loader = DataLoader(dataset, batch_size=w.batch_size, shuffle=False, collate_fn=collate_decoded)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features, payloads = FeatureExtractor(teacher.to(device), "cls").extract(loader)
    failed = [dataset.files[i] for _, bad in payloads for i in bad]
    if failed:
        log.warning(
            "whitening fit: %d units skipped, their images do not decode (first: %s)", len(failed), failed[0]
        )
    return fit_whitening(features, w.shrinkage)


def held_out_evaluation(
    cfg: DictConfig,
    backbones: dict[str, torch.nn.Module],
    whitenings: dict[str, FeatureWhitening | None],
) -> tuple[dict[str, Any], dict[str, torch.Tensor], pd.DataFrame]:
    """The probes of ``report.probes`` on held-out labelled units (a source unseen in pretraining),
    folds stratified and grouped by smear/subject, scored as ``reddino-eval`` scores them. A backbone
    named in ``whitenings`` gets its CLS whitened by that fit, the others raw.

    Returns the report, each backbone's CLS features and the units they belong to.
    """
    r = cfg.report
    units = instantiate(cfg.data.eval_units)
    if r.max_units is not None and len(units) > r.max_units:
        units = units.sample(n=r.max_units, random_state=cfg.seed).reset_index(drop=True)
    classes = list(cfg.data.classes)
    dataset = LabelledUnitDataset(
        units, eval_transform(cfg.crops.global_size, cfg.augment.mean, cfg.augment.std), classes, 64
    )
    groups = units[r.group_by].to_numpy()
    splits = make_splits("grouped_kfold", dataset.targets, groups, None, None, r.n_splits, cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {}
    features: dict[str, torch.Tensor] = {}
    for name, net in backbones.items():
        # no second Trainer in a training process (DDP ranks): the plain driver of the one feature path
        whitening = whitenings.get(name)
        features[name], labels = labelled_features(
            net.to(device), dataset, "cls", r.batch_size, 0, None, whitening
        )
        results[name] = score_feature_set(features[name], labels, splits, classes, r.probes, scale=False)
    report = {
        "protocol": {
            "units": len(units),
            "sources": sorted(set(units["source"])),
            "subjects": int(units["subject"].nunique()),
            "groups": len(set(groups)),
            "classes": classes,
            "folds": f"{r.n_splits}-fold stratified, grouped by {r.group_by}",
            "features": {
                name: "final-norm CLS"
                + (" whitened (fitted on the pretraining units)" if whitenings.get(name) else ", raw")
                for name in backbones
            },
            "probes": probes_description(r.probes),
        },
        "results": results,
    }
    return report, features, units


def review_figures(
    cfg: DictConfig, out: Path, teacher: torch.nn.Module, features: torch.Tensor, units: pd.DataFrame
) -> dict[str, Path]:
    """UMAP of the teacher's held-out features (by class | by subject) and the PCA map of its patch tokens."""
    from reddino.data.io import read_rgb
    from reddino.viz.pca import patch_pca, patch_tokens, pca_figure
    from reddino.viz.umap import umap_embedding, umap_panels

    f = cfg.report.figures
    xy, idx = umap_embedding(features.numpy(), f.umap_max_points, cfg.seed)
    picked = units.iloc[idx]
    umap = umap_panels(
        xy,
        {"class": picked["label"].tolist(), "subject": picked["subject"].tolist()},
        "teacher CLS, held out",
    )
    smear = read_rgb(units["file"].iloc[0])
    h, w = smear.shape[:2]
    side = min(f.pca_tile, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    tile = smear[top : top + side, left : left + side]
    tokens = patch_tokens(teacher.cpu(), tile, f.pca_size, cfg.augment.mean, cfg.augment.std)
    pca = pca_figure(
        tile,
        patch_pca(tokens, None, f.pca_clip_percent),
        f"teacher patch tokens: {Path(units['file'].iloc[0]).name}",
    )
    return {
        "umap_teacher": save_figure(umap, out / "umap_teacher.png"),
        "pca_patches": save_figure(pca, out / "pca_patches.png"),
    }
