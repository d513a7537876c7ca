"""HDF5 array files (pixel and feature caches): streamed writes, provenance attributes, validated reads."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from robustft.io.atomic import atomic_path
from robustft.io.tables import CorruptArtifactError


class StaleCacheError(RuntimeError):
    """A cache file is complete but was computed from different inputs than the ones asked for."""


def _encode(value: Any) -> Any:
    # HDF5 attributes hold no None and no nested containers: store those as JSON (read back by read_attrs).
    return json.dumps(value, sort_keys=True) if value is None or isinstance(value, (dict, list, tuple)) else value


def _as_stored(value: Any) -> Any:
    """``value`` as :func:`read_attrs` returns it after a write (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value)) if value is None or isinstance(value, (dict, list, tuple)) else value


@contextmanager
def array_writer(
    path: str | Path,
    n_rows: int,
    columns: Mapping[str, tuple[tuple[int, ...], Any]],
    attrs: Mapping[str, Any],
    filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[h5py.File]:
    """Create an HDF5 file with one dataset per column (shape ``(n_rows, *shape)``), written atomically.

    Chunks hold whole rows so that batched reads and writes touch few chunks. ``filters``: per column, h5py
    dataset options such as ``{"compression": "gzip", "compression_opts": 1}`` (reads decompress transparently).
    The file is marked ``complete`` only after the caller's block finishes, then renamed into place.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            for name, (shape, dtype) in columns.items():
                row_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize if shape else 8
                rows_per_chunk = max(1, min(n_rows, (1 << 20) // max(row_bytes, 1))) if n_rows else 1
                handle.create_dataset(
                    name, shape=(n_rows, *shape), dtype=dtype, chunks=(rows_per_chunk, *shape) if n_rows else None,
                    **(dict((filters or {}).get(name, {})) if n_rows else {}),
                )
            for key, value in attrs.items():
                handle.attrs[key] = _encode(value)
            handle.attrs["n_rows"] = n_rows
            handle.attrs["complete"] = False
            yield handle
            handle.attrs["complete"] = True


def read_attrs(handle: h5py.File) -> dict[str, Any]:
    """Decode the attributes written by :func:`array_writer`."""
    out: dict[str, Any] = {}
    for key, value in handle.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and (value[:1] in "[{" or value == "null"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def open_arrays(
    path: str | Path, columns: tuple[str, ...], expected_attrs: Mapping[str, Any] | None = None
) -> h5py.File:
    """Open a cache file for reading after checking it is complete, has ``columns``, and matches ``expected_attrs``.

    Raises :class:`CorruptArtifactError` for incomplete or broken files and :class:`StaleCacheError` when an
    attribute (manifest hash, backbone, weights, preprocessing) differs from the expected one.
    """
    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except Exception as exc:
        raise CorruptArtifactError(f"{path}: not a readable HDF5 file ({exc})") from None
    try:
        attrs = read_attrs(handle)
        if not attrs.get("complete"):
            raise CorruptArtifactError(f"{path}: incomplete (not marked complete)")
        n_rows = attrs.get("n_rows")
        for column in columns:
            if column not in handle:
                raise CorruptArtifactError(f"{path}: missing dataset {column!r}")
            if handle[column].shape[0] != n_rows:
                raise CorruptArtifactError(f"{path}: dataset {column!r} has {handle[column].shape[0]} rows, expected {n_rows}")
        for key, value in (expected_attrs or {}).items():
            if key not in attrs or attrs[key] != _as_stored(value):
                raise StaleCacheError(f"{path}: stale cache: {key} is {attrs.get(key)!r}, expected {value!r}")
    except Exception:
        handle.close()
        raise
    return handle


def load_arrays(
    path: str | Path, columns: tuple[str, ...], expected_attrs: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Read whole columns of a validated cache file into memory."""
    with open_arrays(path, columns, expected_attrs) as handle:
        return {column: handle[column][...] for column in columns}
