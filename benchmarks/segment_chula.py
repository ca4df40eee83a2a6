"""Single-cell segmentation on Chula RBC-12: how many labelled cell centres each backend recovers.

Usage (results and the machine they were taken on: ``benchmarks/segment_chula.md``)::

    REDDINO_DATA_ROOT=/work/shared/datasets .venv/bin/python benchmarks/segment_chula.py
    ... segment_chula.py --limit 50          # a quick subsample (every k-th labelled image)
    ... segment_chula.py --tune              # the small grid used to choose CLASSICAL_PARAMS
    ... segment_chula.py --ids 701-738 --set distance_sigma=0   # one series, one parameter changed

Chula labels are centre points (``Label/<n>.txt``: ``x y class``) for only SOME cells of each smear
(a median of 22 per image, while a smear holds 60-130 cells). So recall is the meaningful number;
precision (share of detected cells holding a labelled point) is a lower bound, and it is also
reported on the "dense" images with >= ``DENSE_MIN_POINTS`` labelled points, which look fully
labelled apart from cells cut by the border. Each backend runs in this one process; timings cover
``segment()`` only (JPEG decoding is timed separately).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from reddino.data.io import read_rgb
from reddino.data.segment import (
    ClassicalSegmenter,
    Segmenter,
    SegmenterWeightsMissing,
    build_segmenter,
    match_centres,
    resolve_cellpose_weights,
)

# Chosen with --tune on TUNE_IDS (see segment_chula.md); read from the config that carries them.
UNIT_CUTTING = Path(__file__).resolve().parents[1] / "conf" / "unit_cutting" / "default.yaml"
CLASSICAL_PARAMS: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(UNIT_CUTTING).segmentation.classical)

# Cellpose-SAM at cellpose's own defaults, rescaled for ~40 px cells; used only if the weights are local.
CELLPOSE_PARAMS: dict[str, Any] = {
    "weights": None,
    "diameter": 40.0,
    "gpu": True,
    "batch_size": 8,
    "flow_threshold": 0.4,
    "cellprob_threshold": 0.0,
    "min_size": 15,
    "use_bfloat16": True,
}

# Densely labelled images from five acquisition series (precision is meaningful there), including a
# pale, unevenly lit one (27) from the hardest series.
TUNE_IDS = (1, 20, 27, 41, 101, 222, 256, 301, 387)
TUNE_GRID: dict[str, Sequence[Any]] = {
    "foreground": ("green_inverted", "green_od"),
    "threshold_factor": (0.8, 0.9, 1.0),
    "peak_separation": (0.25, 0.3, 0.4),
    "max_hole_area": (600, 1200),
    "border_min_area": (0, 800),
    "distance_sigma": (0.0, 1.0),
}
DENSE_MIN_POINTS = 80


def chula_root() -> Path:
    """``$REDDINO_DATA_ROOT/chula-rbc-12``; exits with a message when it is not there."""
    root = os.environ.get("REDDINO_DATA_ROOT")
    if not root or not (Path(root) / "chula-rbc-12" / "Label").is_dir():
        sys.exit("set REDDINO_DATA_ROOT to the folder holding chula-rbc-12/ (e.g. /work/shared/datasets)")
    return Path(root) / "chula-rbc-12"


def read_points(label_file: Path) -> tuple[np.ndarray, int, int]:
    """(N, 2) x, y centres of one label file, plus counts of malformed and exact-duplicate lines dropped."""
    points, bad = [], 0
    for line in label_file.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        try:
            points.append((float(fields[0]), float(fields[1])))
        except (ValueError, IndexError):
            bad += 1
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    unique = np.unique(array, axis=0)
    return unique, bad, len(array) - len(unique)


def labelled_images(root: Path, limit: int | None) -> list[tuple[Path, Path]]:
    """(image, label file) pairs in numeric order; ``limit`` keeps an evenly spaced subsample."""
    labels = sorted((root / "Label").glob("*.txt"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
    pairs = [(root / "Dataset" / f"{p.stem}.jpg", p) for p in labels]
    if limit is not None and limit < len(pairs):
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, limit).round().astype(int)]
    return pairs


Item = tuple[str, np.ndarray, np.ndarray]  # image name, RGB array, (N, 2) labelled centres


def load(pairs: Iterable[tuple[Path, Path]]) -> tuple[list[Item], float, int, int]:
    """Decode every image once (name, rgb, points), timing the decoding and counting label defects."""
    items, bad, dup = [], 0, 0
    tic = time.perf_counter()
    for image_path, label_path in pairs:
        points, n_bad, n_dup = read_points(label_path)
        bad, dup = bad + n_bad, dup + n_dup
        items.append((image_path.stem, read_rgb(image_path), points))
    return items, time.perf_counter() - tic, bad, dup


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def evaluate(segmenter: Segmenter, items: Sequence[Item]) -> dict[str, float]:
    """Pooled counts over all images (not a mean of per-image ratios), plus timing of ``segment``."""
    keys = ("points", "recovered", "cells", "cells_with_point", "merged_cells", "points_outside")
    total = dict.fromkeys(keys, 0)
    dense = dict.fromkeys(keys, 0)
    seconds = 0.0
    for _name, image, points in items:
        tic = time.perf_counter()
        mask = segmenter.segment(image)
        seconds += time.perf_counter() - tic
        result = match_centres(mask, points)
        for k in keys:
            total[k] += result[k]
            if result["points"] >= DENSE_MIN_POINTS:
                dense[k] += result[k]
    return {
        "images": len(items),
        "points": total["points"],
        "cells": total["cells"],
        "recall": _ratio(total["recovered"], total["points"]),
        "precision": _ratio(total["cells_with_point"], total["cells"]),
        "merged_rate": _ratio(total["merged_cells"], total["cells"]),
        "dense_recall": _ratio(dense["recovered"], dense["points"]),
        "dense_precision": _ratio(dense["cells_with_point"], dense["cells"]),
        "seconds": seconds,
        "smears_per_s": _ratio(len(items), seconds),
        "cells_per_s": _ratio(total["cells"], seconds),
    }


def print_table(rows: Sequence[tuple[str, dict[str, float]]]) -> None:
    """A markdown table, one row per backend."""
    cols = ("images", "points", "cells", "recall", "precision", "merged_rate", "dense_recall",
            "dense_precision", "smears_per_s", "cells_per_s")  # fmt: skip
    print("| backend | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


def machine() -> str:
    """Cores this process may use, CPU model, torch threads and whether CUDA is visible."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        import torch

        extra = (
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}"
        )
    except ImportError:
        extra = "torch not installed"
    import cv2

    return (
        f"{cores} usable CPU cores ({cpu}), OpenCV {cv2.getNumThreads()} threads, {extra}, "
        f"python {platform.python_version()}"
    )


def tune(items: Sequence[Item], base: dict[str, Any]) -> None:
    """Grid over TUNE_GRID around ``base``; prints every setting sorted by recall + precision."""
    keys = list(TUNE_GRID)
    results = []
    for values in itertools.product(*(TUNE_GRID[k] for k in keys)):
        override = dict(zip(keys, values, strict=True))
        r = evaluate(ClassicalSegmenter(**{**base, **override}), items)
        results.append((r["recall"] + r["precision"], override, r))
    print(f"tuning on images {TUNE_IDS}; other parameters: " + _format_params(base, exclude=keys))
    print("| recall + precision | recall | precision | merged_rate | s/smear | setting |")
    print("|---|---|---|---|---|---|")
    for score, override, r in sorted(results, key=lambda t: -t[0]):
        print(f"| {score:.3f} | {r['recall']:.3f} | {r['precision']:.3f} | {r['merged_rate']:.3f} | "
              f"{r['seconds'] / r['images']:.3f} | {_format_params(override)} |")  # fmt: skip


def _format_params(params: dict[str, Any], exclude: Sequence[str] = ()) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items() if k not in exclude)


def _parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` for ``--set``; the value is read as int, float, true/false or else a string."""
    key, _, raw = text.partition("=")
    if key not in CLASSICAL_PARAMS:
        raise argparse.ArgumentTypeError(f"unknown classical parameter {key!r}")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw.lower(), raw)


def _id_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced subsample of labelled images")
    parser.add_argument("--ids", type=_id_range, default=None, help="only images LO-HI (e.g. 701-738)")
    parser.add_argument("--set", type=_parse_override, action="append", default=[], help="key=value")
    parser.add_argument("--tune", action="store_true", help="grid-search classical parameters on TUNE_IDS")
    args = parser.parse_args(argv)
    classical = {**CLASSICAL_PARAMS, **dict(args.set)}
    root = chula_root()
    print(f"machine: {machine()}")
    pairs = labelled_images(root, None if args.tune else args.limit)
    if args.tune:
        wanted = {str(i) for i in TUNE_IDS}
        tune(load([p for p in pairs if p[1].stem in wanted])[0], classical)
        return
    if args.ids is not None:
        pairs = [p for p in pairs if p[1].stem.isdigit() and args.ids[0] <= int(p[1].stem) <= args.ids[1]]
    items, decode_s, bad, dup = load(pairs)
    print(f"data: {root}, {len(items)} labelled images decoded in {decode_s:.1f} s; "
          f"{bad} malformed and {dup} duplicate label lines dropped")  # fmt: skip
    rows = [("classical", evaluate(build_segmenter("classical", CELLPOSE_PARAMS, classical), items))]
    try:
        weights = resolve_cellpose_weights(CELLPOSE_PARAMS["weights"])
    except (SegmenterWeightsMissing, ImportError) as exc:
        print(f"cellpose: NOT RUN, weights not available locally:\n{exc}")
    else:
        print(f"cellpose: weights {weights}")
        cellpose = build_segmenter("cellpose", CELLPOSE_PARAMS, classical)
        rows.append(("cellpose", evaluate(cellpose, items)))
    print("classical parameters: " + _format_params(classical))
    print_table(rows)


if __name__ == "__main__":
    main()
