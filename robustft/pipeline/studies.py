"""Several studies side by side: the per-study summaries concatenated into one table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from robustft.io.tables import read_table, read_table_metadata, write_table

log = logging.getLogger("robustft")


def combine_summaries(summaries: Sequence[str | Path], out: str | Path) -> None:
    """Concatenate per-study summaries (same columns, rows unchanged, in the order given) into ``out``."""
    if not summaries:
        raise ValueError("combine_summaries: no study summaries given")
    columns = read_table_metadata(summaries[0])["columns"]
    frames = []
    for path in summaries:
        found = read_table_metadata(path)["columns"]
        if found != columns:
            raise ValueError(f"{path}: summary columns {found} differ from those of {summaries[0]} ({columns})")
        frames.append(read_table(path, columns))
    combined = pd.concat(frames, ignore_index=True)
    write_table(out, combined, {"columns": list(columns)})
    log.info("summary %s: %d rows from %d studies", out, len(combined), len(summaries))
