"""Embed a folder of images with any loadable backbone (``reddino.embed``; the ``reddino-embed`` command
runs ``reddino.workflows.embedding.run``, options in ``conf/embed.yaml``).

Three ways to read the folder: ``image`` (each file is one single-cell crop), ``patch`` (smears cut
into non-overlapping tiles, background tiles dropped) and ``cell`` (smears segmented into cells,
cellpose if its weights are local, else the classical fallback). Writes ``embeddings.npy`` (float32,
one row per unit), ``units.parquet`` (the rows: file, box, unit) and ``skipped.csv`` (file, reason).

Python: ``reddino.load_backbone(path)`` and ``reddino.embed(backbone, folder, ...)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reddino.data.datasets import DecodedUnitDataset, collate_decoded, eval_transform
from reddino.data.io import BadImageError, read_rgb
from reddino.data.manifest import UNIT_COLUMNS
from reddino.data.prepare import CellSettings, PatchSettings, units_of_image
from reddino.data.segment import LazySegmenter
from reddino.data.sources.parsers import parse_flat
from reddino.data.sources.records import empty_objects
from reddino.eval.features import extract_features, feature_trainer
from reddino.runtime.paths import config_dir
from reddino.weights import LoadedBackbone, load_backbone

log = logging.getLogger("reddino.embed")
MODES = ("image", "patch", "cell")
UNIT_CUTTING_SECTIONS = ("patches", "cells", "segmentation")


def find_units(
    folder: Path, mode: str, settings: dict[str, Any]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The units to embed and the files skipped (with the reason). ``settings`` = the ``patches``,
    ``cells`` and ``segmentation`` sections of ``conf/unit_cutting/``: smears are cut exactly as
    ``make prepare`` cuts them (``units_of_image``), with every cell coming from the segmenter."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    parsed = parse_flat(folder)
    skipped = [{"file": s.file, "reason": s.reason} for s in parsed.skipped]
    images = parsed.images.assign(source="embed", subject=parsed.images["file"])
    if mode == "image":  # each file is one crop: nothing to decode yet
        units = images.assign(x0=0, y0=0, x1=images["width"], y1=images["height"], unit="cell", label=None)
        return units[list(UNIT_COLUMNS)], skipped
    patches = PatchSettings.from_config(settings["patches"], enabled=mode == "patch")
    cells = CellSettings.from_config({**settings["cells"], "segment": "always"}, enabled=mode == "cell")
    segment = LazySegmenter(settings["segmentation"])
    frames = []
    for image in tqdm(images.to_dict("records"), desc="finding units"):
        try:
            rgb = read_rgb(image["file"])
        except BadImageError as exc:
            skipped.append({"file": image["file"], "reason": str(exc)})
            continue
        found, notes, _ = units_of_image(rgb, image, empty_objects(), patches, cells, None, segment)
        frames += found
        skipped += [{"file": image["file"], "reason": note} for note in notes]
    units = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(UNIT_COLUMNS))
    return units[list(UNIT_COLUMNS)], skipped


def embed(
    backbone: str | Path | LoadedBackbone,
    folder: str | Path,
    *,
    mode: str = "image",
    pooling: str = "cls",
    whitening: bool = True,
    batch_size: int = 64,
    accelerator: str = "auto",
    precision: str = "32-true",
    num_workers: int = 0,
    settings: dict[str, Any] | None = None,
) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """(embeddings [N, D] float32, their units, skipped files with reasons) for every unit in ``folder``.

    The keyword defaults are those of ``conf/embed.yaml``: ``accelerator`` auto | cpu | gpu,
    ``precision`` 32-true | bf16-mixed (one device, through the Lightning predict pass of
    ``reddino.eval.features``). ``whitening``: apply the CLS whitening the weights ship (our exports;
    others have none), false for the raw CLS. ``settings``: the patch/cell/segmentation sections (None:
    ``conf/unit_cutting/default.yaml``, what ``make prepare`` uses).
    """
    loaded = backbone if isinstance(backbone, LoadedBackbone) else load_backbone(backbone)
    if settings is None:
        cfg = OmegaConf.load(config_dir() / "unit_cutting" / "default.yaml")
        settings = {k: OmegaConf.to_container(cfg[k]) for k in UNIT_CUTTING_SECTIONS}
    units, skipped = find_units(Path(folder), mode, settings)
    dataset = DecodedUnitDataset(
        units, eval_transform(loaded.input_size, loaded.mean, loaded.std), cache_size=8
    )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_decoded)
    if units.empty:  # nothing to feed the network (every file skipped, or an empty folder)
        embeddings, payloads = torch.zeros(0, loaded.model.num_features), []
    else:
        trainer = feature_trainer(accelerator, precision, progress=True)
        embeddings, payloads = extract_features(
            loaded.model, loader, pooling, trainer, loaded.whitening if whitening else None
        )
    rows = [index for index, _ in payloads]
    failed = [i for _, bad in payloads for i in bad]
    kept = torch.cat(rows).numpy() if rows else np.zeros(0, dtype=np.int64)
    for file in sorted(set(units["file"].iloc[failed])):
        skipped.append({"file": file, "reason": "cannot decode image"})
    return (
        embeddings.numpy(),
        units.iloc[kept].reset_index(drop=True),
        pd.DataFrame(skipped, columns=["file", "reason"]),
    )
