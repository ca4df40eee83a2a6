"""How much is rotation / flip invariance alone worth to k-NN on Chula cells? A backbone's CLS features
of every labelled Chula cell, as they are and averaged over the 8 flips and quarter turns of each crop,
scored by the end-of-run report's probes (1-NN, 20-NN, 5 folds grouped by image).

    .venv/bin/python benchmarks/dihedral_knn.py <run dir> [--random-init]   # needs `make prepare`

``--random-init``: the same architecture at a seeded random init instead of the run's exported teacher.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from reddino.data.datasets import LabelledUnitDataset, eval_transform
from reddino.data.manifest import read_manifest
from reddino.eval.features import pool_tokens
from reddino.eval.protocols import make_splits
from reddino.eval.session import score_feature_set
from reddino.weights import build_from_config, load_backbone

PROBES = {
    "linear": {"enabled": False},
    "knn": {
        "enabled": True,
        "ks": [1, 20],
        "metric": "euclidean",
        "temperature": 0.07,
        "chunk_size": 2048,
        "device": "cpu",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a pretraining run directory with export/ and config.yaml")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = OmegaConf.load(args.run / "config.yaml")
    loaded = load_backbone(args.run / "export")
    torch.manual_seed(0)
    config = {"architecture": loaded.architecture, "model_args": loaded.model_args}
    net = (build_from_config(config) if args.random_init else loaded.model).eval()
    units = read_manifest(cfg.data.eval_units.path, "cell", None, None, True)
    classes = list(cfg.data.classes)
    dataset = LabelledUnitDataset(
        units, eval_transform(loaded.input_size, loaded.mean, loaded.std), classes, 64
    )
    splits = make_splits("grouped_kfold", dataset.targets, units["file"].to_numpy(), None, None, 5, cfg.seed)
    plain, dihedral = [], []
    with torch.no_grad():
        for x, _ in DataLoader(dataset, batch_size=512):
            views = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(3)) for k in range(4)]
            feats = torch.stack([pool_tokens(net, v, "cls") for v in views])
            plain.append(feats[0])
            dihedral.append(feats.mean(0))
    labels = torch.tensor(dataset.targets)
    name = "random init" if args.random_init else "teacher"
    for kind, f in (("as is", torch.cat(plain)), ("dihedral mean", torch.cat(dihedral))):
        scores = score_feature_set(f, labels, splits, classes, PROBES, False)
        print(
            f"{name}, {kind}: "
            + ", ".join(f"{p} {100 * s['weighted_f1']['mean']:.1f}" for p, s in scores.items())
        )


if __name__ == "__main__":
    main()
