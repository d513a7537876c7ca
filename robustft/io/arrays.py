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


#: Bytes of rows one HDF5 chunk holds (at least one row). HDF5 reads, and decompresses, whole chunks: training reads
#: rows in a seeded random order, so a chunk of many rows is read whole for each of them. With the former 1 MiB
#: chunks a random 96-px image read 37 images; with 32 KiB chunks it reads one (images of 96 px and up are a chunk
#: each), and a 512-float feature row reads 16 rows. Sequential reads of such chunks still run at GB/s
#: (bench/README.md, ``bench_reads.py``).
CHUNK_BYTES = 32 << 10


def rows_per_chunk(row_bytes: int, n_rows: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows in one chunk of a column whose rows take ``row_bytes``: as many as fit in ``chunk_bytes``, at least 1."""
    return max(1, min(n_rows, chunk_bytes // max(1, row_bytes)))


@contextmanager
def array_writer(
    path: str | Path,
    n_rows: int,
    columns: Mapping[str, tuple[tuple[int, ...], Any]],
    attrs: Mapping[str, Any],
    filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[h5py.File]:
    """Create an HDF5 file with one dataset per column (shape ``(n_rows, *shape)``), written atomically.

    Chunks hold whole rows, :data:`CHUNK_BYTES` of them at most (one image per chunk), so that reading rows at
    random reads little besides them. ``filters``: per column, h5py dataset options such as
    ``{"compression": "gzip", "compression_opts": 1}`` (reads decompress transparently). The file is marked
    ``complete`` only after the caller's block finishes, then renamed into place.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            for name, (shape, dtype) in columns.items():
                row_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                chunks = (rows_per_chunk(row_bytes, n_rows), *shape) if n_rows else None
                handle.create_dataset(
                    name, shape=(n_rows, *shape), dtype=dtype, chunks=chunks,
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


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) positions in ``rows`` (sorted ascending, unique) of its runs of consecutive values."""
    rows = np.asarray(rows)
    if rows.size == 0:
        return []
    breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
    return list(zip([0, *breaks], [*breaks, int(rows.size)]))


def take_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for rows in any order: read in ascending order, one slice per run of consecutive rows, each
    run copied into its places in the given order (memory: the result and one run). (h5py reads a list index
    through a selection built row by row, several times slower than these slices.)

    The order the rows are read in changes nothing in what is returned: only the disk is read front to back.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= dataset.shape[0]):
        raise IndexError(f"{dataset.file.filename}:{dataset.name}: rows outside [0, {dataset.shape[0]})")
    places = np.argsort(rows, kind="stable")
    ascending = rows[places]
    if ascending.size > 1 and not (np.diff(ascending) > 0).all():  # repeated rows: read each once
        unique, inverse = np.unique(rows, return_inverse=True)
        return take_rows(dataset, unique)[inverse]
    out = np.empty((rows.size, *dataset.shape[1:]), dataset.dtype)
    for start, stop in contiguous_runs(ascending):
        first = int(ascending[start])
        out[places[start:stop]] = dataset[first : first + stop - start]
    return out


class ColumnReader:
    """One column of a validated array file (:func:`open_arrays`), kept open and read by rows (:func:`take_rows`).

    Memory holds what one :meth:`take` returns, never the column. h5py serialises calls from several threads.
    """

    def __init__(self, path: str | Path, column: str, expected_attrs: Mapping[str, Any] | None = None) -> None:
        self.path, self.column = Path(path), column
        self.handle = open_arrays(path, (column,), expected_attrs)
        self.dataset = self.handle[column]

    def __len__(self) -> int:
        return int(self.dataset.shape[0])

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.shape[1:])

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dataset.dtype.itemsize

    def take(self, rows: np.ndarray) -> np.ndarray:
        return take_rows(self.dataset, rows)

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "ColumnReader":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
