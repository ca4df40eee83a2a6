"""Markdown tables for reports, without pulling in ``tabulate`` for ``DataFrame.to_markdown``."""

from __future__ import annotations

import pandas as pd


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.2f}") -> str:
    """GitHub-flavoured Markdown of a DataFrame (index dropped; floats formatted)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return float_format.format(value)
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])
