"""A user's own labelled cells as evaluation units, without a catalog entry or ``make prepare``.

Two layouts (``make eval ARGS="data=folder data.path=<dir>"`` / ``data=table data.path=<file>``):

- a folder of single-cell crops with one sub-folder per class, ``<dir>/<class>/**/<image>``: each image
  is one unit, the whole image its crop;
- a CSV or Parquet table with one row per cell: an image ``file`` (relative to the table's folder),
  its ``label``, optionally a group (slide / patient) column, a source column and a box
  (x0, y0, x1, y1 in pixels; the crop is then a square of ``box_context`` x the box's longer side,
  as ``make prepare`` cuts annotated cells).

Both are read by the catalog's own parsers (``folder_per_class``, ``csv_table``), so bad files, empty
labels, bad boxes and duplicate rows are skipped with their reason; the reasons travel with the units
(``units.attrs["skipped"]``) and ``reddino-eval`` writes them to ``skipped.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from reddino.data.manifest import UNIT_COLUMNS, validate_units
from reddino.data.prepare import square_crops
from reddino.data.sources.parsers import (
    TableColumns,
    parse_csv_table,
    parse_folder_per_class,
    read_table_rows,
)
from reddino.data.sources.records import ParsedSource

SKIPPED_ATTR = "skipped"


def _units(parsed: ParsedSource, box_context: float | None, source: str) -> pd.DataFrame:
    """One unit per labelled object: the box as it is (``box_context`` None) or a square around it."""
    objects = parsed.objects.merge(parsed.images[["file", "subject"]], on="file", how="left")
    if box_context is None:
        boxes = objects[["x0", "y0", "x1", "y1"]].to_numpy().round().astype(np.int64)
    else:  # as make prepare cuts annotated boxes; every parsed row here has a box, no centre point
        boxes = square_crops(objects, box_context, point_window=0)
    units = pd.DataFrame(boxes, columns=["x0", "y0", "x1", "y1"]).assign(
        file=objects["file"].to_numpy(),
        unit="cell",
        source=source,
        subject=objects["subject"].to_numpy(),
        label=objects["label"].to_numpy(),
    )
    units = units[list(UNIT_COLUMNS)]
    if units.empty:
        reasons = "; ".join(str(s) for s in parsed.skipped[:5])
        raise ValueError(f"no labelled cell could be read ({len(parsed.skipped)} skipped: {reasons})")
    units.attrs[SKIPPED_ATTR] = [str(s) for s in parsed.skipped]
    return validate_units(units)


def read_labelled_folder(path: str | Path) -> pd.DataFrame:
    """Units of a folder of single-cell crops, one sub-folder per class (the folder name is the label).

    Each crop is its own group (``subject`` = the file): a folder says nothing about which smear or
    patient a crop comes from, so folds cannot keep them together (``reddino-eval`` warns).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (data.path: a folder with one sub-folder per class)")
    parsed = parse_folder_per_class(root)
    parsed.images["subject"] = parsed.images["file"]
    return _units(parsed, None, root.name)


def read_labelled_table(
    path: str | Path,
    file_column: str,
    label_column: str,
    group_column: str | None,
    source_column: str | None,
    box_columns: Sequence[str] | None,
    box_context: float,
) -> pd.DataFrame:
    """Units of a CSV / Parquet table of cells (see the module docstring).

    ``group_column`` (slide / patient) becomes ``subject``, the folds' grouping; without it each image
    is its own group. ``source_column`` becomes ``source`` (leave-one-source-out); without it the
    source is the table's name. Image paths are relative to the table's folder and must stay inside it.
    """
    table = Path(path)
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no such table (data.path: a .csv or .parquet file)")
    if table.suffix not in (".csv", ".parquet"):
        raise ValueError(f"{table}: a table must be .csv or .parquet")
    parsed = parse_csv_table(
        table.parent,
        table.name,
        file_column=file_column,
        label_column=label_column,
        subject_column=group_column,
        box_columns=box_columns,
    )
    if group_column is None:
        parsed.images["subject"] = parsed.images["file"]
    units = _units(parsed, box_context if box_columns else None, table.stem)
    if source_column is not None:
        units["source"] = units["file"].map(_sources(table, file_column, source_column))
        unknown = units["source"].isna() | units["source"].eq("")
        if unknown.any():
            raise ValueError(
                f"{table}: column {source_column!r} is empty for {units.loc[unknown, 'file'].iloc[0]}"
            )
    return units


def _sources(table: Path, file_column: str, source_column: str) -> dict[str, str]:
    """{absolute image path: source} from the table's source column (one source per image)."""
    rows = read_table_rows(table, TableColumns(file_column, source_column, None, None))
    return {str(table.parent / row[file_column]): row[source_column] for _, row in rows}
