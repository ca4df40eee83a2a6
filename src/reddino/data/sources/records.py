"""What a layout parser returns: readable images, their labelled objects, and everything it skipped.

Parsers never raise on bad data: each problem becomes a ``Skipped`` record naming the file (and line)
and the reason, so a long preparation run goes on and the report says what was lost and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

# One row per image the parser could open (header read; full decoding happens during preparation).
# ``file``: absolute path; ``source``: the source id (usually the catalog name; datasets that pool
# several labs, like TXL-PBC, give each its own id); ``subject``: slide/patient id, unique across
# sources (prefixed with the source id); ``split``: the dataset's own split name or None.
IMAGE_COLUMNS = ("file", "width", "height", "source", "subject", "split")

# One row per labelled object. Boxes are float pixels (x1/y1 exclusive); point labels (Chula) have
# NaN boxes and only (cx, cy). ``label`` is the class NAME after the source's label map.
OBJECT_COLUMNS = ("file", "x0", "y0", "x1", "y1", "cx", "cy", "label")


@dataclass(frozen=True)
class Skipped:
    """One thing left out, and why (shown in the preparation report)."""

    file: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.reason}"


@dataclass
class ParsedSource:
    """A parsed dataset: images, objects (possibly empty for unlabelled layouts), skipped items."""

    images: pd.DataFrame
    objects: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, frame, cols in (
            ("images", self.images, IMAGE_COLUMNS),
            ("objects", self.objects, OBJECT_COLUMNS),
        ):
            missing = [c for c in cols if c not in frame.columns]
            if missing:
                raise ValueError(f"ParsedSource.{name} lacks columns {missing}")

    def skipped_by_reason(self) -> Counter[str]:
        """Counts of skipped items per reason, with the varying details (numbers) stripped."""
        return Counter(s.reason.split(":")[0] for s in self.skipped)


def empty_objects() -> pd.DataFrame:
    """An objects table with the right columns and no rows (unlabelled layouts)."""
    return pd.DataFrame(
        {c: pd.Series(dtype="float64" if c not in ("file", "label") else "object") for c in OBJECT_COLUMNS}
    )
