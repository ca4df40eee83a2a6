"""One evaluation run (``reddino-eval``): frozen features -> linear probe and k-NN under a protocol, plus
batch-effect metrics, for a pretrained backbone and its baselines (random init, morphometrics).

Features are computed once per (model, units) and cached (``reddino.eval.features``); every probe and
fold reads the cache. Results go to ``results.json`` / ``results.md`` in the run directory and to the
configured loggers (CSV; W&B offline by default, with per-class tables, confusion matrices and UMAPs).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from tqdm.auto import tqdm

from reddino.data.datasets import LabelledUnitDataset, UnitDataset, eval_transform
from reddino.data.labelled import SKIPPED_ATTR
from reddino.eval.batch_effects import neighbour_source_mixing, source_predictability
from reddino.eval.features import (
    CachedFeatures,
    feature_cache_path,
    feature_trainer,
    labelled_features,
    load_features,
    save_features,
    state_digest,
)
from reddino.eval.morphometrics import MORPHOMETRIC_NAMES, morphometric_features
from reddino.eval.protocols import make_splits
from reddino.eval.session import (
    degeneracy_warnings,
    flat_scores,
    results_table,
    score_feature_set,
    standardise,
)
from reddino.eval.whitening import FeatureWhitening
from reddino.runtime.config_checks import check_config, eval_rules
from reddino.runtime.dashboard import confusion_figure, log_review, save_figure
from reddino.viz.runs import latest_run
from reddino.weights import LoadedBackbone, build_from_config, load_backbone

log = logging.getLogger("reddino.evaluate")
MORPHOMETRICS_VERSION = "morphometrics-v1"


def class_list(cfg: DictConfig, units: pd.DataFrame) -> list[str]:
    """The label map: ``data.classes`` (through the transfer protocol's class map), else the labels found,
    sorted; with transfer, test labels the training side never has are appended (scored, never predicted)."""
    mapping = dict(cfg.eval.get("class_map") or {})
    if cfg.data.classes is None:
        return sorted(set(units["label"]))
    classes = list(dict.fromkeys(mapping.get(c, c) for c in cfg.data.classes))
    return classes + sorted(set(units["label"]) - set(classes))


def transfer_units(
    cfg: DictConfig, train: pd.DataFrame, skipped: list[str]
) -> tuple[pd.DataFrame, list[str]]:
    """The transfer protocol's units: the data's (``split`` train) then ``eval.test_units`` (test), both
    labels mapped through ``eval.class_map``; with everything either reader skipped."""
    test = instantiate(cfg.eval.test_units)
    mapping = dict(cfg.eval.class_map or {})
    unknown = sorted(set(mapping) - set(train["label"]) - set(test["label"]))
    if unknown:
        raise ValueError(f"eval.class_map maps {unknown}, labels found on neither side")
    units = pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)
    units["label"] = units["label"].map(lambda label: mapping.get(label, label))
    for side, frame in (("train", train), ("test", test)):
        log.info("transfer %s: %d units from %s", side, len(frame), sorted(set(frame["source"])))
    return units, [*skipped, *test.attrs.get(SKIPPED_ATTR, [])]


def say_grouping(units: pd.DataFrame, group_by: str | None) -> None:
    """Print which column keeps units together across folds, and warn when nothing does."""
    groups = int(units[group_by].nunique()) if group_by else len(units)
    message = f"folds grouped by {group_by!r}: {groups} groups of {len(units)} units"
    if groups == len(units):
        message += (
            " (WARNING: every unit is its own group, so cells of one smear or patient can sit on both "
            "sides of a split and the scores may be optimistic; give a group column, e.g. data=table "
            "data.group_column=<slide or patient>)"
        )
        log.warning(message)
    print(f"reddino-eval: {message}")


def resolve_weights(cfg: DictConfig) -> list[str]:
    """``weights`` as a list (one path or several), or with none given (a bare ``make eval``) the newest
    pretraining run's export; empty when no pretrained feature set is asked for."""
    if cfg.weights is not None:
        return [str(cfg.weights)] if isinstance(cfg.weights, str) else [str(w) for w in cfg.weights]
    if "pretrained" not in cfg.feature_sets:
        return []
    weights = str(newest_export(Path(cfg.pretrain_runs)))
    log.info("no weights given: evaluating the newest pretraining run's export %s", weights)
    print(f"reddino-eval: no weights given, evaluating the newest pretraining run: weights={weights}")
    return [weights]


def weight_labels(weights: list[str]) -> list[str]:
    """Short unique row names: a run's ``export`` folder is named by its run, a file by its stem."""
    labels = []
    for w in weights:
        path = Path(w.split(":", 1)[1] if w.startswith("hf_hub:") else w)
        label = path.parent.name if path.name == "export" else (path.stem or path.name)
        n, unique = 2, label
        while unique in labels:
            unique, n = f"{label}-{n}", n + 1
        labels.append(unique)
    return labels


@dataclass
class Backbone:
    """A network to score, with what it is fed: input size and normalisation (``inputs``)."""

    net: torch.nn.Module
    inputs: dict[str, Any]
    feature_set: str  # pretrained | random_init: which entry of feature_sets selects it
    whitening: FeatureWhitening | None = None  # an export's CLS whitening (features.whitening: true)


def backbones(cfg: DictConfig, weights: list[str]) -> dict[str, Backbone]:
    """The backbones to compare, by row name, each with the input size and normalisation it expects.

    One weight: ``pretrained`` and the same architecture at a seeded random init, ``random_init``.
    Several: ``pretrained:<label>`` each, and one ``random_init:<label>`` per distinct architecture and
    input (named after the first weight that has it). None: the ``model`` config at random init.
    """
    torch.manual_seed(cfg.seed)
    if not weights:
        inputs = {
            "size": int(cfg.model.img_size),
            "mean": list(cfg.features.mean),
            "std": list(cfg.features.std),
        }
        return {"random_init": Backbone(instantiate(cfg.model), inputs, "random_init")}
    nets: dict[str, Backbone] = {}
    randoms: dict[str, tuple[str, Backbone]] = {}
    single = len(weights) == 1
    for w, label in zip(weights, weight_labels(weights), strict=True):
        loaded: LoadedBackbone = load_backbone(w)
        inputs = {"size": loaded.input_size, "mean": loaded.mean, "std": loaded.std}
        whitening = loaded.whitening if cfg.features.whitening else None
        if whitening is not None:
            log.info("%s: its CLS is whitened as its export says (features.whitening=false: raw)", label)
        nets["pretrained" if single else f"pretrained:{label}"] = Backbone(
            loaded.model, inputs, "pretrained", whitening
        )
        config = {"architecture": loaded.architecture, "model_args": loaded.model_args}
        key = json.dumps({**config, **inputs}, sort_keys=True, default=str)
        if key not in randoms:
            randoms[key] = (label, Backbone(build_from_config(config), inputs, "random_init"))
    for label, backbone in randoms.values():
        nets["random_init" if len(randoms) == 1 else f"random_init:{label}"] = backbone
    return nets


def newest_export(runs: Path) -> Path:
    """The export folder of the newest run under ``runs`` (as ``make figures`` picks its run)."""
    try:
        return latest_run(runs, "export/config.json") / "export"
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no weights given and no pretraining run with an export under {runs}: pass weights=<export "
            "dir or .ckpt> (or feature_sets=[random_init,morphometrics]), or run `make pretrain` first"
        ) from None


def backbone_features(
    name: str, backbone: Backbone, units: pd.DataFrame, classes: list[str], cfg: DictConfig
) -> CachedFeatures:
    """Cached frozen features of ``backbone`` on ``units`` (computed by a Lightning predict pass on a miss).

    Its ``inputs`` (size, mean, std: what the network is fed), with the pooling, its whitening and the
    label map, key the cache, so a change to any of them recomputes instead of reading stale features.
    """
    f = cfg.features
    net, inputs, whitening = backbone.net, backbone.inputs, backbone.whitening
    transform = eval_transform(inputs["size"], inputs["mean"], inputs["std"])
    settings = {
        "pooling": f.pooling,
        **inputs,
        "classes": classes,
        "whitening": None if whitening is None else whitening.digest(),
    }
    key = f"{name.replace(':', '_')}-{state_digest(net)}"
    path = feature_cache_path(Path(f.cache_dir), key, units, settings)
    if path.is_dir():
        log.info("%s: features from cache %s", name, path)
        return load_features(path)
    dataset = LabelledUnitDataset(units, transform, classes, f.image_cache_size)
    trainer = feature_trainer(f.accelerator, f.precision, cfg.progress)
    feats, labels = labelled_features(
        net, dataset, f.pooling, f.batch_size, f.num_workers, trainer, whitening
    )
    cached = CachedFeatures(feats.numpy(), labels.numpy(), units, {"model": name, **settings})
    save_features(path, cached)
    return cached


def morphometric_table(units: pd.DataFrame, classes: list[str], cfg: DictConfig) -> CachedFeatures:
    """Morphometric features of every unit's raw crop (cached like backbone features)."""
    cache = Path(cfg.features.cache_dir)
    path = feature_cache_path(cache, MORPHOMETRICS_VERSION, units, {"classes": classes})
    if path.is_dir():
        return load_features(path)
    crops = UnitDataset(units, transform=lambda x: x, cache_size=cfg.features.image_cache_size)
    rows = [morphometric_features(crops.crop(i)) for i in tqdm(range(len(crops)), disable=not cfg.progress)]
    labels = units["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    cached = CachedFeatures(
        np.stack(rows).astype(np.float32), labels, units, {"names": list(MORPHOMETRIC_NAMES)}
    )
    save_features(path, cached)
    return cached


def batch_effects(feats: CachedFeatures, cfg: DictConfig, scale: bool) -> dict[str, Any] | None:
    """Source predictability and neighbour mixing; None when the units come from one source."""
    b = cfg.batch_effects
    sources = feats.units["source"].to_numpy()
    if not b.enabled or len(set(sources)) < 2:
        return None
    x = torch.as_tensor(feats.features).float()
    if scale:
        x, _ = standardise(x, x[:1])
    groups = feats.units[cfg.eval.group_by].to_numpy()
    return {
        "source_predictability": source_predictability(
            x,
            sources,
            groups,
            b.n_splits,
            cfg.seed,
            None,
            cfg.probes.linear.max_iter,
            cfg.probes.linear.device,
        ),
        "neighbour_mixing": neighbour_source_mixing(x, sources, min(b.k, len(x) - 1)),
    }


def umap_figure(
    feats: CachedFeatures, column: str, title: str, path: Path, max_points: int, seed: int
) -> Path:
    """2-D UMAP of the features coloured by a units column, saved as PNG (``reddino.viz.umap``)."""
    from reddino.viz.umap import umap_embedding, umap_panels

    xy, idx = umap_embedding(feats.features, max_points, seed)
    fig = umap_panels(xy, {column: feats.units[column].astype(str).to_numpy()[idx]}, title)
    fig.savefig(path, dpi=120)
    return path


def log_everything(cfg: DictConfig, summary: dict[str, Any], figures: list[Path]) -> None:
    """Scalars, config and summary to every logger; per-class F1 and confusion tables, confusion
    matrices and UMAPs to W&B; every table and image is a file in the run directory first."""
    out = Path(cfg.paths.output_dir)
    flat = flat_scores(summary["results"])
    for fs, be in summary["batch_effects"].items():
        if be is not None:
            flat[f"{fs}/batch/source_bacc"] = be["source_predictability"]["balanced_accuracy"]
            flat[f"{fs}/batch/mixing_ratio"] = be["neighbour_mixing"]["ratio"]
    classes = summary["protocol"]["classes"]
    tables: dict[str, pd.DataFrame] = {}
    images = {p.stem: p for p in figures}
    (out / "tables").mkdir(exist_ok=True)
    for fs, by_probe in summary["results"].items():
        for probe, s in by_probe.items():
            key = f"{fs}/{probe}"
            tables[f"{key}/per_class_f1"] = pd.DataFrame(
                {"class": classes, "f1": [s["per_class_f1"][c] for c in classes]}
            )
            tables[f"{key}/confusion"] = pd.DataFrame(s["confusion"], columns=classes).assign(true=classes)
            fig = confusion_figure(np.asarray(s["confusion"]), classes, f"{fs}, {probe}")
            images[f"confusion_{fs}_{probe}"] = save_figure(fig, out / f"confusion_{fs}_{probe}.png")
    for name, table in tables.items():
        table.to_csv(out / "tables" / f"{name.replace('/', '__')}.csv", index=False)
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    log_review(loggers, OmegaConf.to_container(cfg, resolve=True), flat, tables, images, step=0)
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate; returns what is written to ``results.json``."""
    check_config(cfg, eval_rules())
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    units = instantiate(cfg.data.eval_units)
    skipped = units.attrs.get(SKIPPED_ATTR, [])
    if cfg.eval.protocol == "transfer":
        units, skipped = transfer_units(cfg, units, skipped)
    if skipped:
        pd.DataFrame({"skipped": skipped}).to_csv(out / "skipped.csv", index=False)
        log.warning(
            "%d items of the data skipped, each with its reason in %s", len(skipped), out / "skipped.csv"
        )
    if cfg.max_units is not None and len(units) > cfg.max_units:
        units = units.sample(n=cfg.max_units, random_state=cfg.seed).sort_index().reset_index(drop=True)
    classes = class_list(cfg, units)
    say_grouping(units, cfg.eval.group_by)
    weights = resolve_weights(cfg)
    sets: dict[str, tuple[CachedFeatures, bool]] = {}
    for name, b in backbones(cfg, weights).items():
        if b.feature_set in cfg.feature_sets:
            sets[name] = (backbone_features(name, b, units, classes, cfg), False)
    if "morphometrics" in cfg.feature_sets:
        sets["morphometrics"] = (morphometric_table(units, classes, cfg), True)
    unknown = sorted(set(cfg.feature_sets) - {name.split(":")[0] for name in sets})
    if unknown:
        raise ValueError(f'feature sets {unknown} unavailable ("pretrained" needs weights=<export dir>)')
    e = cfg.eval
    labels = next(iter(sets.values()))[0].labels
    splits = make_splits(
        e.protocol,
        labels,
        units[e.group_by].to_numpy() if e.group_by else None,
        units["source"].to_numpy(),
        units[e.split_column].to_numpy() if e.protocol in ("fixed", "transfer") else None,
        e.n_splits,
        cfg.seed,
    )
    results, effects, figures = {}, {}, []
    for name, (feats, scale) in sets.items():
        log.info("scoring %s (%d x %d) on %d splits", name, *feats.features.shape, len(splits))
        x, y = torch.tensor(feats.features), torch.tensor(feats.labels)  # copies: the cache is read-only
        results[name] = score_feature_set(x, y, splits, classes, cfg.probes, scale)
        effects[name] = batch_effects(feats, cfg, scale)
        if cfg.umap.enabled:
            for column in cfg.umap.color_by:
                path = out / f"umap_{name}_by_{column}.png"
                figures.append(
                    umap_figure(feats, column, f"{name} by {column}", path, cfg.umap.max_points, cfg.seed)
                )
    summary = {
        "protocol": {
            "name": e.protocol,
            "splits": [s.name for s in splits],
            "units": len(units),
            "sources": sorted(set(units["source"])),
            "groups": int(units[e.group_by].nunique()) if e.group_by else None,
            "group_by": e.group_by,
            "classes": classes,
            "feature_pooling": cfg.features.pooling,
            "weights": weights[0] if len(weights) == 1 else weights,
            "skipped": len(skipped),
        },
        "results": results,
        "batch_effects": effects,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    for warning in degeneracy_warnings(results):
        log.warning("degenerate: %s", warning)
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    print(f"\n{e.protocol} on {len(units)} units ({out}):\n{table}\n")
    log_everything(cfg, summary, figures)
    return summary
