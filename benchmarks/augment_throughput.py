"""Augmentation throughput per CPU core: the RedDino pipeline (and DINOv2's) on real pretraining units.

One thread (torch, OpenCV), so the figure is views/s per core; a loader with W workers does about W times
that. Also times every RedDino pixel transform alone (albumentations 2.x made some of them far slower
than 1.3, see docs/measured_costs.md §4-§5), so a slow one can be dropped from conf/augment/reddino.yaml.

    .venv/bin/python benchmarks/augment_throughput.py                          # 224 px, RedDino sizes
    .venv/bin/python benchmarks/augment_throughput.py --units 8 --repeats 1 crops.global_size=32
Trailing arguments are Hydra overrides of conf/pretrain.yaml (units come from cfg.data.pretrain_units).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import cv2
import numpy as np
import torch
from hydra.utils import instantiate

from benchmarks.common import pretrain_config
from reddino.data.augment import reddino_pixel_transforms
from reddino.data.datasets import UnitDataset


def load_units(cfg, n: int) -> list[np.ndarray]:
    units = instantiate(cfg.data.pretrain_units).sample(n=n, random_state=0, replace=False)
    dataset = UnitDataset(units, transform=lambda x: x, cache_size=64)
    return [dataset.crop(i) for i in range(len(dataset))]


def views_per_second(transform, images: list[np.ndarray], views_per_call: int, repeats: int) -> float:
    transform(images[0])  # warm-up (lazy imports, first-call allocations)
    start = time.perf_counter()
    for _ in range(repeats):
        for image in images:
            transform(image)
    return repeats * len(images) * views_per_call / (time.perf_counter() - start)


def per_transform_ms(cfg, images: list[np.ndarray], repeats: int) -> list[tuple[str, float]]:
    """Milliseconds per call of each RedDino pixel transform alone on global-size crops."""
    size = cfg.crops.global_size
    crops = [cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in images]
    names = [str(n) for n in cfg.augment.pixel_transforms]
    rows = []
    for name, transform in zip(names, reddino_pixel_transforms(tuple(names)), strict=True):
        transform.p = 1.0
        transform(image=crops[0])
        start = time.perf_counter()
        for _ in range(repeats):
            for crop in crops:
                transform(image=crop)
        rows.append((name, 1000 * (time.perf_counter() - start) / (repeats * len(crops))))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--units", type=int, default=64, help="pretraining units to augment")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/pretrain.yaml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    base = ["crops.global_size=224", "crops.local_size=98", *args.overrides]
    print(f"# augmentation throughput, 1 core; {platform.processor() or platform.machine()}, {date.today()}")
    print(f"overrides: {base}")
    for pipeline in ("reddino", "dinov2"):
        cfg = pretrain_config([f"augment={pipeline}", *base])
        images = load_units(cfg, args.units)
        transform = instantiate(cfg.augment)
        views = cfg.augment.n_global + cfg.crops.n_local
        rate = views_per_second(transform, images, views, args.repeats)
        shape = images[0].shape
        print(
            f"{pipeline:8s} {views} views/unit, units {shape[1]}x{shape[0]} px: {rate:8.1f} views/s per core"
        )
        if pipeline == "reddino":
            for name, ms in per_transform_ms(cfg, images, args.repeats):
                print(f"    {name:24s} {ms:8.2f} ms per {cfg.crops.global_size}px crop")


if __name__ == "__main__":
    main()
