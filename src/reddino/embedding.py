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
from reddino.data.patches import foreground_fraction, square_boxes, tile_boxes
from reddino.data.segment import build_segmenter, label_boxes
from reddino.data.sources.parsers import parse_flat
from reddino.eval.features import pool_tokens
from reddino.weights import LoadedBackbone, load_backbone

log = logging.getLogger("reddino.embed")
MODES = ("image", "patch", "cell")
PREPARE_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "prepare.yaml"


def _units_frame(file: str, boxes: np.ndarray, unit: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "file": file,
            "x0": boxes[:, 0],
            "y0": boxes[:, 1],
            "x1": boxes[:, 2],
            "y1": boxes[:, 3],
            "unit": unit,
        }
    )


def find_units(
    folder: Path, mode: str, settings: dict[str, Any]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The units to embed and the files skipped (with the reason). ``settings`` = prepare.yaml's
    ``patches``, ``cells`` and ``segmentation`` sections (one source of truth for both tools)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    parsed = parse_flat(folder)
    skipped = [{"file": s.file, "reason": s.reason} for s in parsed.skipped]
    frames = []
    segmenter = None
    p, c = settings["patches"], settings["cells"]
    for image in tqdm(parsed.images.to_dict("records"), desc="finding units", disable=mode == "image"):
        if mode == "image":
            frames.append(
                _units_frame(image["file"], np.array([[0, 0, image["width"], image["height"]]]), "cell")
            )
            continue
        try:
            rgb = read_rgb(image["file"])
        except BadImageError as exc:
            skipped.append({"file": image["file"], "reason": str(exc)})
            continue
        h, w = rgb.shape[:2]
        if mode == "patch":
            boxes = tile_boxes(w, h, p["size"])
            if len(boxes) == 0:
                skipped.append(
                    {"file": image["file"], "reason": f"image {w}x{h} smaller than one {p['size']}px patch"}
                )
                continue
            keep = (
                foreground_fraction(rgb, boxes, p["background_percentile"], p["contrast"])
                >= p["min_foreground"]
            )
            frames.append(_units_frame(image["file"], boxes[keep], "patch"))
        else:
            if segmenter is None:
                s = settings["segmentation"]
                segmenter = build_segmenter(s["backend"], s["cellpose"], s["classical"])
                log.info("segmentation backend: %s", segmenter.name)
            found = label_boxes(segmenter.segment(rgb))
            found = found[found["area"] >= c["min_area"]]
            side = (
                c["box_context"] * np.maximum(found["x1"] - found["x0"], found["y1"] - found["y0"]).to_numpy()
            )
            frames.append(
                _units_frame(
                    image["file"], square_boxes(found["cx"].to_numpy(), found["cy"].to_numpy(), side), "cell"
                )
            )
    units = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["file", "x0", "y0", "x1", "y1", "unit"])
    )
    return units.assign(source="embed", subject=units["file"], label=None), skipped


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
