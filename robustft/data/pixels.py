"""The decoded pixel cache: images decoded, resized and centre-cropped once into uint8 HDF5 per (domain, split)."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from robustft.data.images import decode_for_cache
from robustft.io.arrays import array_writer, load_arrays, open_arrays

PIXEL_COLUMNS = ("pixels", "labels", "row_ids")

#: Pixel caches are gzip-1 compressed only where it pays: when zlib level 1 shrinks the first decoded batch below
#: this fraction (sketches, clip art: ~0.05 of raw). Photos compress to ~0.77 at ~15x the read and ~50x the write
#: cost of raw chunks, so they stay uncompressed (measurements: bench/README.md).
COMPRESS_BELOW_RATIO = 0.5
GZIP_FILTER = {"compression": "gzip", "compression_opts": 1}


@dataclass
class PixelSplit:
    """One (domain, split) of decoded images held in memory: (N, H, W, 3) uint8 pixels, labels and row ids."""

    pixels: torch.Tensor
    labels: torch.Tensor
    row_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, mask: torch.Tensor | np.ndarray) -> "PixelSplit":
        mask = torch.as_tensor(mask, dtype=torch.bool)
        return PixelSplit(self.pixels[mask], self.labels[mask], self.row_ids[mask])


def pixel_cache_attrs(manifest_hash: str, pixel_key: str, domain: str, split: str, max_per_class: int | None) -> dict[str, Any]:
    """The provenance a pixel cache is checked against before reuse."""
    return {
        "kind": "pixels",
        "manifest_hash": manifest_hash,
        "pixel_key": pixel_key,
        "domain": domain,
        "split": split,
        "max_per_class": -1 if max_per_class is None else int(max_per_class),
    }


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def write_pixel_cache(
    rows: pd.DataFrame,
    root: str | Path,
    out_path: str | Path,
    image_size: int,
    interpolation: str,
    attrs: dict[str, Any],
    threads: int = 1,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    border: int = 0,
) -> None:
    """Decode ``rows`` (manifest rows of one domain/split) into ``out_path``, streaming in batches.

    Decoding runs in ``threads`` threads (PIL releases the GIL while decoding and resizing); the next batch is
    decoded while the current one is written, so memory holds two batches. ``progress(n)`` is called after each
    batch of ``n`` images is written.
    """
    root = Path(root)
    n = len(rows)
    columns = {
        "pixels": ((image_size, image_size, 3), np.uint8),
        "labels": ((), np.int64),
        "row_ids": ((), np.int64),
    }
    paths = [root / p for p in rows["path"]]
    decode = lambda p: decode_for_cache(p, image_size, interpolation, border)  # noqa: E731
    parts = list(_batches(n, batch_size))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        # pool.map submits a whole batch at once: its images are decoded while the caller does something else
        start = lambda part: pool.map(decode, paths[part])  # noqa: E731
        # the first batch is decoded before the file is created: it decides whether compression pays
        batch = np.stack(list(start(parts[0]))) if parts else None
        filters = {"pixels": GZIP_FILTER} if batch is not None and compression_pays(batch) else None
        with array_writer(out_path, n, columns, attrs, filters) as handle:
            handle["labels"][...] = rows["label"].to_numpy(np.int64)
            handle["row_ids"][...] = rows["row_id"].to_numpy(np.int64)
            for i, part in enumerate(parts):
                ahead = start(parts[i + 1]) if i + 1 < len(parts) else None
                handle["pixels"][part] = batch
                if progress:
                    progress(part.stop - part.start)
                batch = np.stack(list(ahead)) if ahead is not None else None


def compression_pays(sample: np.ndarray, max_bytes: int = 4 << 20) -> bool:
    """Whether zlib level 1 shrinks (up to ``max_bytes`` of) ``sample`` below :data:`COMPRESS_BELOW_RATIO`."""
    raw = np.ascontiguousarray(sample).reshape(-1)[:max_bytes].tobytes()
    return bool(raw) and len(zlib.compress(raw, 1)) < COMPRESS_BELOW_RATIO * len(raw)


def load_pixel_split(path: str | Path, expected_attrs: dict[str, Any] | None = None) -> PixelSplit:
    """Load a whole validated pixel cache into memory."""
    arrays = load_arrays(path, PIXEL_COLUMNS, expected_attrs)
    return PixelSplit(*(torch.from_numpy(arrays[c]) for c in PIXEL_COLUMNS))


def iter_pixel_batches(
    path: str | Path, batch_size: int, expected_attrs: dict[str, Any] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stream (pixels, labels, row_ids) batches from a validated pixel cache; memory holds one batch."""
    with open_arrays(path, PIXEL_COLUMNS, expected_attrs) as handle:
        n = handle["labels"].shape[0]
        for part in _batches(n, batch_size):
            yield tuple(torch.from_numpy(handle[c][part]) for c in PIXEL_COLUMNS)  # type: ignore[misc]


def pixel_split_sizes(paths: Sequence[str | Path]) -> list[int]:
    """Row counts of several pixel caches, from their attributes alone."""
    sizes = []
    for path in paths:
        with open_arrays(path, ()) as handle:
            sizes.append(int(handle.attrs["n_rows"]))
    return sizes
