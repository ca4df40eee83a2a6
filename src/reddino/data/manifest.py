"""The units table: one row per training/evaluation unit (a smear tile or a single cell).

Every data source ends up here, so the DataModules never care where units came from. Columns:
``file`` (image path: absolute, or in a prepared manifest relative to the prepared folder, as
``reddino-pack`` writes them so that a packed copy works wherever it is unpacked),
``x0, y0, x1, y1`` (pixel box, may extend past the image: crops pad),
``unit`` ("patch" | "cell"), ``source``, ``subject`` (slide/patient id, globally unique), ``label``
(class name, or None for unlabelled units).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reddino.data.patches import square_boxes, tile_boxes
from reddino.data.synthetic import ensure_synthetic_dataset

UNIT_COLUMNS = ("file", "x0", "y0", "x1", "y1", "unit", "source", "subject", "label")
UNIT_KINDS = ("patch", "cell")


def validate_units(units: pd.DataFrame) -> pd.DataFrame:
    """Check the schema and box sanity; raise naming the first offending row."""
    missing = [c for c in UNIT_COLUMNS if c not in units.columns]
    if missing:
        raise ValueError(f"units table lacks columns {missing}; has {list(units.columns)}")
    if units.empty:
        raise ValueError("units table is empty: no images/cells matched the data configuration")
    bad_kind = ~units["unit"].isin(UNIT_KINDS)
    if bad_kind.any():
        row = units[bad_kind].iloc[0]
        raise ValueError(f"{row['file']}: unit kind {row['unit']!r} not in {UNIT_KINDS}")
    empty = (units["x1"] <= units["x0"]) | (units["y1"] <= units["y0"])
    if empty.any():
        row = units[empty].iloc[0]
        raise ValueError(f"{row['file']}: empty box {tuple(row[['x0', 'y0', 'x1', 'y1']])}")
    return units


def synthetic_units(
    cache_dir: str | Path,
    generator: Mapping[str, Any],
    unit: str,
    patch_size: int,
    cell_context: float,
    cell_window: int | None,
    sources: Sequence[str],
    rbc_only: bool,
) -> pd.DataFrame:
    """Units cut from the embedded synthetic smears (generated into ``cache_dir`` on first use).

    ``unit="patch"``: non-overlapping ``patch_size`` tiles of every smear (unlabelled).
    ``unit="cell"``: a square crop around each object, labelled with its class: ``cell_window`` pixels
    wide when set (keeps the cell's apparent size, itself a class cue: spherocytes and fragments are
    small), else ``cell_context`` x the cell's longer box side (every cell fills the crop alike).
    ``rbc_only`` drops white cells and platelets.
    """
    gen = dict(generator)
    gen["smear_size"] = tuple(gen["smear_size"])
    gen["cells_per_smear"] = tuple(gen["cells_per_smear"])
    root = ensure_synthetic_dataset(cache_dir, **gen)
    if unit == "patch":
        table = _tile_smears(pd.read_parquet(root / "smears.parquet"), root, patch_size)
    elif unit == "cell":
        table = _cell_crops(
            pd.read_parquet(root / "cells.parquet"), root, cell_context, cell_window, rbc_only
        )
    else:
        raise ValueError(f"unit must be one of {UNIT_KINDS}, got {unit!r}")
    unknown = sorted(set(sources) - set(table["source"]))
    if unknown:
        raise ValueError(f"unknown synthetic sources {unknown}; available: {sorted(set(table['source']))}")
    table = table[table["source"].isin(list(sources))].reset_index(drop=True)
    return validate_units(table)


def _tile_smears(smears: pd.DataFrame, root: Path, size: int) -> pd.DataFrame:
    rows = []
    for s in smears.itertuples(index=False):
        boxes = tile_boxes(int(s.width), int(s.height), size)
        rows.append(
            pd.DataFrame(
                {
                    "file": str(root / s.file),
                    "x0": boxes[:, 0],
                    "y0": boxes[:, 1],
                    "x1": boxes[:, 2],
                    "y1": boxes[:, 3],
                    "unit": "patch",
                    "source": s.source,
                    "subject": s.subject,
                    "label": None,
                }
            )
        )
    if not rows:
        raise ValueError(f"no smears listed in {root / 'smears.parquet'}")
    return pd.concat(rows, ignore_index=True)


def _cell_crops(
    cells: pd.DataFrame, root: Path, context: float, window: int | None, rbc_only: bool
) -> pd.DataFrame:
    if rbc_only:
        cells = cells[cells["is_rbc"]]
    if window is not None:
        if window <= 0:
            raise ValueError(f"cell_window must be a positive pixel count or null, got {window}")
        side = np.full(len(cells), float(window))
    else:
        side = context * np.maximum(cells["x1"] - cells["x0"], cells["y1"] - cells["y0"]).to_numpy()
    boxes = square_boxes(cells["cx"].to_numpy(), cells["cy"].to_numpy(), side)
    return pd.DataFrame(
        {
            "file": [str(root / f) for f in cells["file"]],
            "x0": boxes[:, 0],
            "y0": boxes[:, 1],
            "x1": boxes[:, 2],
            "y1": boxes[:, 3],
            "unit": "cell",
            "source": cells["source"].to_numpy(),
            "subject": cells["subject"].to_numpy(),
            "label": cells["label"].to_numpy(),
        }
    )


def prepared_root(manifest: str | Path) -> Path:
    """The prepared folder a manifest belongs to: ``<prepared>/manifests/x.parquet`` -> ``<prepared>``."""
    return Path(manifest).absolute().parent.parent


def resolve_files(files: pd.Series, root: str | Path) -> pd.Series:
    """Relative ``file`` entries joined onto ``root``; absolute ones are returned unchanged.

    Relative entries come from a packed, relocatable copy (``reddino-pack``); resolving them here means
    every reader of a manifest (DataModules, evaluation, reports) sees absolute paths.
    """
    relative = ~files.map(os.path.isabs)
    if not relative.any():
        return files
    mapping = {f: str(Path(root) / f) for f in files[relative].unique()}
    return files.where(~relative, files.map(mapping))


def read_manifest(
    path: str | Path,
    unit: str,
    datasets: Sequence[str] | None,
    sources: Sequence[str] | None,
    labelled_only: bool,
    unlabelled_images_of: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Units of one kind from a prepared manifest (``reddino-prepare``), optionally filtered.

    ``datasets``/``sources`` keep only those catalog names / source ids (None = all); ``labelled_only``
    drops units without a label (evaluation); ``unlabelled_images_of`` lists datasets whose images
    holding any labelled unit are dropped whole (their labelled images are the evaluation set, e.g.
    Chula's: pretraining may then use its unlabelled smears only). A relative ``file`` is resolved
    against the prepared folder (``prepared_root``), so a packed copy can be moved. Raises naming the
    file when it is missing or the filter leaves nothing; a missing image raises at load time naming
    its resolved path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `make prepare` (reddino-prepare) first")
    if unit not in UNIT_KINDS:
        raise ValueError(f"unit must be one of {UNIT_KINDS}, got {unit!r}")
    table = pd.read_parquet(path)
    keep = table["unit"].eq(unit)
    for column, wanted in (("dataset", datasets), ("source", sources)):
        if wanted is not None:
            unknown = sorted(set(wanted) - set(table[column]))
            if unknown:
                raise ValueError(f"{path}: no {column} {unknown}; it has {sorted(set(table[column]))}")
            keep &= table[column].isin(list(wanted))
    if labelled_only:
        keep &= table["label"].notna()
    if unlabelled_images_of:
        labelled_files = set(table.loc[table["label"].notna(), "file"])
        keep &= ~(table["dataset"].isin(list(unlabelled_images_of)) & table["file"].isin(labelled_files))
    table = table[keep].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"{path}: no {unit} units left (datasets={datasets}, sources={sources})")
    table["file"] = resolve_files(table["file"], prepared_root(path))
    return validate_units(table)
