"""Parquet tables with their expected columns checked on read; metadata travels in the schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from robustft.io.atomic import atomic_path


class CorruptArtifactError(RuntimeError):
    """A file exists but is not a complete, valid artifact of the expected kind."""


def write_table(path: str | Path, frame: pd.DataFrame, metadata: dict[str, Any] | None = None) -> None:
    """Write ``frame`` to Parquet atomically, with ``metadata`` stored as JSON under the key ``robustft``."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"robustft"] = json.dumps(metadata or {}, sort_keys=True, default=str).encode()
    meta[b"robustft_rows"] = str(len(frame)).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path: str | Path, required_columns: Iterable[str] = ()) -> pd.DataFrame:
    """Read a Parquet table written by :func:`write_table`, checking its row count and required columns."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise CorruptArtifactError(f"{path}: not a readable Parquet file ({exc})") from None
    meta = table.schema.metadata or {}
    if b"robustft_rows" in meta and int(meta[b"robustft_rows"]) != table.num_rows:
        raise CorruptArtifactError(f"{path}: holds {table.num_rows} rows, expected {int(meta[b'robustft_rows'])}")
    missing = [c for c in required_columns if c not in table.column_names]
    if missing:
        raise CorruptArtifactError(f"{path}: missing columns {missing}")
    return table.to_pandas()


def read_table_metadata(path: str | Path) -> dict[str, Any]:
    """The ``robustft`` metadata dict stored by :func:`write_table`."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"robustft", b"{}"))
