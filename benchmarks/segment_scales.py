"""Segmentation of smears at another magnification: recall and precision at 0.5x, 1x and 2x.

Usage (results, command, machine and date: ``benchmarks/segment_scales.md``)::

    REDDINO_DATA_ROOT=/work/shared/datasets .venv/bin/python -m benchmarks.segment_scales
    ... -m benchmarks.segment_scales --limit 60   # an evenly spaced subsample of each dataset

Each image is rescaled (INTER_AREA down, INTER_CUBIC up) with its labels, then segmented by the
classical backend of ``conf/unit_cutting/default.yaml`` twice: as configured (``estimate_diameter: true``, px
parameters scaled per image to the cell size it finds) and with the parameters as written for 40 px
cells. Ground truth: Chula's labelled centre points, and the centres of TXL-PBC's and BCCD's RBC boxes.
``reddino.data.segment.match_centres`` scores them: recall = points alone in a detected cell; precision
= detected cells holding a point. Chula labels only some cells and BCCD misses many RBC boxes, so
precision is a lower bound there; what matters is that it holds across scales.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from benchmarks.segment_chula import CLASSICAL_PARAMS, machine
from reddino.data.io import read_rgb
from reddino.data.segment import ClassicalSegmenter, estimate_cell_diameter, match_centres
from reddino.data.sources.catalog import load_source, resolve_root
from reddino.data.sources.parsers import parse_source
from reddino.runtime.paths import config_dir

SCALES = (0.5, 1.0, 2.0)
DATASETS = ("chula_rbc12", "txl_pbc", "bccd")
RBC_LABELS = {"txl_pbc": "RBC", "bccd": "RBC"}  # Chula: every labelled point is a red cell


def labelled_points(name: str, limit: int | None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(file, RGB, RBC centres) for each image of ``name`` with at least one red-cell label."""
    spec = load_source(config_dir() / "data" / "source" / f"{name}.yaml")
    data_root = os.environ.get("REDDINO_DATA_ROOT")
    if not data_root:
        raise SystemExit("set REDDINO_DATA_ROOT to the folder holding the datasets (the Makefile does)")
    parsed = parse_source(name, resolve_root(spec, Path(data_root)), spec.layout, spec.subject, spec.source)
    objects = parsed.objects
    if name in RBC_LABELS:
        objects = objects[objects["label"] == RBC_LABELS[name]]
    files = sorted(set(objects["file"]))
    if limit is not None and limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    by_file = {f: g[["cx", "cy"]].to_numpy(np.float64) for f, g in objects.groupby("file")}
    for file in files:
        yield file, read_rgb(file), by_file[file]


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=interpolation)


def score(items: Sequence[tuple[str, np.ndarray, np.ndarray]], seg: ClassicalSegmenter) -> list[dict]:
    rows = []
    for scale in SCALES:
        totals = {
            mode: dict.fromkeys(("recovered", "points", "cells_with_point", "cells"), 0)
            for mode in ("scaled", "as_written")
        }
        estimates, seconds = [], 0.0
        for _file, image, points in items:
            im = rescale(image, scale)
            estimates.append(estimate_cell_diameter(seg.stained(im)))
            tic = time.perf_counter()
            masks = {"scaled": seg.segment(im), "as_written": seg.segment_as_written(im)}
            seconds += time.perf_counter() - tic
            for mode, mask in masks.items():
                result = match_centres(mask, points * scale)
                for key in totals[mode]:
                    totals[mode][key] += result[key]
        found = np.array([e for e in estimates if e is not None])
        for mode, t in totals.items():
            rows.append(
                {
                    "scale": scale,
                    "segmenter": mode,
                    "images": len(items),
                    "points": t["points"],
                    "cells": t["cells"],
                    "recall": t["recovered"] / t["points"],
                    "precision": t["cells_with_point"] / t["cells"] if t["cells"] else float("nan"),
                    "diameter_median": float(np.median(found)) if len(found) else float("nan"),
                    "diameter_p10": float(np.percentile(found, 10)) if len(found) else float("nan"),
                    "diameter_p90": float(np.percentile(found, 90)) if len(found) else float("nan"),
                    "seconds_both": seconds,
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced subsample per dataset")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    print("classical parameters: " + ", ".join(f"{k}={v!r}" for k, v in CLASSICAL_PARAMS.items()))
    seg = ClassicalSegmenter(**CLASSICAL_PARAMS)
    cols = ("scale", "segmenter", "images", "points", "cells", "recall", "precision", "diameter_median",
            "diameter_p10", "diameter_p90", "seconds_both")  # fmt: skip
    for name in args.datasets:
        items = list(labelled_points(name, args.limit))
        print(f"\n### {name}\n")
        print("| " + " | ".join(cols) + " |")
        print("|---" * len(cols) + "|")
        for row in score(items, seg):
            print(
                "| "
                + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols)
                + " |"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
