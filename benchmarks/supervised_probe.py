"""How much class signal can the pretraining backbone learn in N steps through an augmentation?

A yardstick for the embedded k-NN margin, not a recipe: the run's backbone is trained WITH labels on the
pretraining sources' labelled cells, each sample one random global view of ``augment`` (or, with
``--no-augment``, the plain evaluation resize plus a horizontal flip), AdamW with a one-cycle lr. Then the
exact k-NN of the end-of-pretraining report (raw final-norm CLS, held-out source, grouped folds) scores it.
If labels cannot teach the backbone a feature through some augmentation in N steps, self-supervision with
that augmentation will not either.

    .venv/bin/python -m benchmarks.supervised_probe --steps 200                     # embedded default
    .venv/bin/python -m benchmarks.supervised_probe --steps 200 augment.color_jitter_p=0.0
Trailing arguments are Hydra overrides of conf/pretrain.yaml (``experiment=embedded`` is its default).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from datetime import date

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import endless, pretrain_config
from reddino.data.datasets import LabelledUnitDataset, eval_transform
from reddino.eval.features import labelled_features
from reddino.eval.protocols import make_splits
from reddino.eval.session import score_feature_set
from reddino.ssl.backbone import forward_tokens


class AugmentedCells(Dataset):
    """(one view of a labelled cell, class index): a random global crop of ``augment``, or the cells' own
    evaluation resize with a random horizontal flip when ``augment`` is None."""

    def __init__(self, cells: LabelledUnitDataset, augment: Callable | None, seed: int) -> None:
        self.cells, self.augment = cells, augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.augment is None:
            view, label = self.cells[index]
            return (view.flip(2) if self.rng.random() < 0.5 else view), label
        views = self.augment(self.cells.crop(index))["global_crops"]
        return views[int(self.rng.integers(len(views)))], int(self.cells.targets[index])


def labelled_cells(cfg: DictConfig, sources: list[str]) -> LabelledUnitDataset:
    """The labelled RBC crops of ``sources``, cut exactly as the report's held-out cells are."""
    spec = OmegaConf.to_container(cfg.data.eval_units, resolve=True)
    units = instantiate({**spec, "sources": sources})
    plain = eval_transform(cfg.crops.global_size, cfg.augment.mean, cfg.augment.std)
    return LabelledUnitDataset(units, plain, list(cfg.data.classes), cfg.data.loader.image_cache_size)


def train_supervised(
    backbone: torch.nn.Module, data: Dataset, n_classes: int, steps: int, lr: float, batch_size: int
) -> list[float]:
    """Backbone + linear classifier on the CLS token, cross-entropy; returns the loss of every step."""
    classifier = torch.nn.Linear(backbone.embed_dim, n_classes)
    params = [*backbone.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    backbone.train()
    losses = []
    for _, (images, labels) in zip(range(steps), endless(lambda: loader), strict=False):
        loss = F.cross_entropy(classifier(forward_tokens(backbone, images).cls), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of the one-cycle schedule")
    parser.add_argument("--no-augment", action="store_true", help="evaluation resize + flip only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/pretrain.yaml")
    args = parser.parse_args()
    cfg = pretrain_config(args.overrides)
    torch.manual_seed(cfg.seed)
    classes = list(cfg.data.classes)
    train = labelled_cells(cfg, list(cfg.data.train_sources))
    held_out = labelled_cells(cfg, list(cfg.data.eval_sources))
    augment = None if args.no_augment else instantiate(cfg.augment)
    data = AugmentedCells(train, augment, cfg.seed)

    backbone = instantiate(cfg.model)
    start = time.perf_counter()
    losses = train_supervised(backbone, data, len(classes), args.steps, args.lr, cfg.data.loader.batch_size)
    seconds = time.perf_counter() - start
    features, labels = labelled_features(backbone, held_out, "cls", cfg.report.batch_size, 0, None)
    groups = held_out.units[cfg.report.group_by].to_numpy()
    splits = make_splits("grouped_kfold", labels.numpy(), groups, None, None, cfg.report.n_splits, cfg.seed)
    probes = {"linear": {"enabled": False}, "knn": cfg.report.probes.knn}
    scores = score_feature_set(features, labels, splits, classes, probes, scale=False)

    print(f"# supervised probe, {platform.processor() or platform.machine()}, {date.today()}")
    pipeline = "none (resize + flip)" if args.no_augment else cfg.augment._target_
    print(f"overrides: {args.overrides}; augment: {pipeline}")
    print(f"train cells {len(train)} ({list(cfg.data.train_sources)}), held-out cells {len(held_out)}")
    tail = losses[-max(1, len(losses) // 10) :]
    print(f"steps {args.steps}, lr {args.lr}: loss {losses[0]:.3f} -> {np.mean(tail):.3f} in {seconds:.0f} s")
    for probe, by_metric in scores.items():
        f1 = by_metric["weighted_f1"]
        print(f"  {probe:5s} weighted F1 {100 * f1['mean']:.1f} ± {100 * f1['std']:.1f}")


if __name__ == "__main__":
    main()
