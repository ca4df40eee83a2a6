"""What does the CLS whitening do to k-NN and the linear probe, for a run's teacher and for its random init?

Scores four feature sets of every labelled evaluation cell with the end-of-run report's probes (5 folds
grouped by image): the run's exported teacher raw and whitened (the whitening its export ships), and the
same architecture at a seeded random init raw and whitened (a whitening fitted exactly as the export's
was: ``fit_export_whitening`` on the same sample of the run's pretraining units).

    .venv/bin/python benchmarks/whitening_knn.py <run dir>     # needs `make prepare`; ~5 min on 2 cores

The run's config is read as checked plain values (``reddino.run_specs``), never instantiated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from reddino.data.datasets import LabelledUnitDataset, eval_transform
from reddino.eval.features import labelled_features
from reddino.eval.pretrain_report import fit_export_whitening
from reddino.eval.protocols import make_splits
from reddino.eval.session import score_feature_set
from reddino.run_specs import read_run_units
from reddino.viz.run_data import local_cache_dir
from reddino.weights import build_from_config, load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a pretraining run directory with export/ and config.yaml")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = OmegaConf.load(args.run / "config.yaml")
    loaded = load_backbone(args.run / "export")
    if loaded.whitening is None:
        raise SystemExit(f"{args.run / 'export'}: ships no whitening (run with whitening.enabled=true)")
    torch.manual_seed(cfg.seed)
    random_init = build_from_config({"architecture": loaded.architecture, "model_args": loaded.model_args})
    cache = local_cache_dir() / "synthetic"
    pretrain_units = read_run_units(
        OmegaConf.to_container(cfg.data.pretrain_units, resolve=True), cache, "data.pretrain_units"
    )
    random_whitening = fit_export_whitening(cfg, random_init.eval(), pretrain_units)
    units = read_run_units(OmegaConf.to_container(cfg.data.eval_units, resolve=True), cache)
    classes = list(cfg.data.classes)
    dataset = LabelledUnitDataset(
        units, eval_transform(loaded.input_size, loaded.mean, loaded.std), classes, 64
    )
    groups = units[cfg.report.group_by].to_numpy()
    splits = make_splits("grouped_kfold", dataset.targets, groups, None, None, cfg.report.n_splits, cfg.seed)
    probes = OmegaConf.to_container(cfg.report.probes, resolve=True)
    for name, net, whitening in (
        ("teacher", loaded.model, loaded.whitening),
        ("random init", random_init, random_whitening),
    ):
        raw, labels = labelled_features(net, dataset, "cls", 256, 0, None)
        for kind, features in (("raw", raw), ("whitened", whitening(raw))):
            scores = score_feature_set(features, labels, splits, classes, probes, False)
            print(
                f"{name}, {kind}: "
                + ", ".join(f"{p} {100 * s['weighted_f1']['mean']:.1f}" for p, s in scores.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
