"""``reddino-embed``: embed a folder of images with any loadable backbone.

Three ways to read the folder: ``image`` (each file is one single-cell crop), ``patch`` (smears cut
into non-overlapping tiles, background tiles dropped) and ``cell`` (smears segmented into cells,
cellpose if its weights are local, else the classical fallback). Writes ``embeddings.npy`` (float32,
one row per unit), ``units.parquet`` (the rows: file, box, unit) and ``skipped.csv`` (file, reason).

Python: ``reddino.load_backbone(path)`` and ``reddino.embed(backbone, folder, ...)``.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reddino.data.datasets import UnitDataset, eval_transform
from reddino.data.io import BadImageError, read_rgb
from reddino.data.manifest import UNIT_COLUMNS
from reddino.data.prepare import CellSettings, PatchSettings, units_of_image
from reddino.data.segment import LazySegmenter
from reddino.data.sources.parsers import parse_flat
from reddino.data.sources.records import empty_objects
from reddino.eval.features import pool_tokens
from reddino.runtime.paths import config_dir
from reddino.runtime.user_errors import one_line_errors
from reddino.weights import LoadedBackbone, load_backbone

log = logging.getLogger("reddino.embed")
MODES = ("image", "patch", "cell")
PREPARE_CONFIG = config_dir() / "prepare.yaml"


def find_units(
    folder: Path, mode: str, settings: dict[str, Any]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The units to embed and the files skipped (with the reason). ``settings`` = prepare.yaml's
    ``patches``, ``cells`` and ``segmentation`` sections: smears are cut exactly as ``make prepare``
    cuts them (``units_of_image``), with every cell coming from the segmenter."""
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


class _CropDataset(UnitDataset):
    """Unit crops -> normalised tensors; an image that fails to decode now yields None (dropped)."""

    def __getitem__(self, index: int) -> Any:
        try:
            return index, self.transform(self.crop(index))
        except BadImageError:
            return index, None


def _collate(batch: list[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(indices of decoded units, their images, indices of units whose image failed to decode)."""
    kept = [(i, x) for i, x in batch if x is not None]
    index = torch.tensor([i for i, _ in kept], dtype=torch.long)
    return index, (torch.stack([x for _, x in kept]) if kept else None), [i for i, x in batch if x is None]


@torch.no_grad()
def embed(
    backbone: str | Path | LoadedBackbone,
    folder: str | Path,
    *,
    mode: str = "image",
    pooling: str = "cls",
    batch_size: int = 64,
    device: str = "cpu",
    precision: str = "32",
    num_workers: int = 0,
    settings: dict[str, Any] | None = None,
) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """(embeddings [N, D] float32, their units, skipped files with reasons) for every unit in ``folder``.

    ``precision``: "32" or "bf16" (autocast on the device). ``settings``: patch/cell/segmentation
    settings as in ``conf/prepare.yaml`` (read from there when None).
    """
    loaded = backbone if isinstance(backbone, LoadedBackbone) else load_backbone(backbone)
    if settings is None:
        cfg = OmegaConf.load(PREPARE_CONFIG)
        settings = {k: OmegaConf.to_container(cfg[k]) for k in ("patches", "cells", "segmentation")}
    units, skipped = find_units(Path(folder), mode, settings)
    model = loaded.model.to(device).eval()
    dataset = _CropDataset(units, eval_transform(loaded.input_size, loaded.mean, loaded.std), cache_size=8)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    autocast = (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        if precision == "bf16"
        else nullcontext()
    )
    rows, feats, failed = [], [], []
    for index, images, bad in tqdm(loader, desc="embedding", unit="batch"):
        failed += bad
        if images is None:
            continue
        with autocast:
            feats.append(pool_tokens(model, images.to(device), pooling).float().cpu())
        rows.append(index)
    kept = torch.cat(rows).numpy() if rows else np.zeros(0, dtype=np.int64)
    for file in sorted(set(units["file"].iloc[failed])):
        skipped.append({"file": file, "reason": "cannot decode image"})
    embeddings = torch.cat(feats).numpy() if feats else np.zeros((0, model.num_features), np.float32)
    return (
        embeddings,
        units.iloc[kept].reset_index(drop=True),
        pd.DataFrame(skipped, columns=["file", "reason"]),
    )


@one_line_errors("reddino-embed")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reddino-embed", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "weights", help="backbone: export folder, .ckpt, DINOv2/DinoBloom .pth, timm folder, hf_hub:<id>"
    )
    parser.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("out", type=Path, help="output folder for embeddings.npy, units.parquet, skipped.csv")
    parser.add_argument(
        "--mode", choices=MODES, default="image", help="image: each file is a cell crop (default)"
    )
    parser.add_argument("--pooling", choices=("cls", "cls+mean"), default="cls")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    embeddings, units, skipped = embed(
        args.weights,
        args.folder,
        mode=args.mode,
        pooling=args.pooling,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        num_workers=args.num_workers,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "embeddings.npy", embeddings)
    units.to_parquet(args.out / "units.parquet", index=False)
    skipped.to_csv(args.out / "skipped.csv", index=False)
    print(
        f"{len(units)} units embedded ({embeddings.shape[1]}-d) -> {args.out}; {len(skipped)} files skipped"
    )
    for row in skipped.itertuples(index=False):
        print(f"  skipped {row.file}: {row.reason}")


if __name__ == "__main__":
    main()
