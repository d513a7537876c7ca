"""Feature extraction: stream a pixel cache through an image encoder into an HDF5 feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from robustft.backbones.base import Preprocessing
from robustft.data.pixels import PIXEL_COLUMNS, iter_pixel_batches
from robustft.io.arrays import array_writer, load_arrays, open_arrays

FEATURE_COLUMNS = ("features", "labels", "row_ids")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, a no-op context on CPU (fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def encode_batches(
    module: nn.Module, batches, preprocessing: Preprocessing, device: torch.device
):
    """Yield (module outputs as float32 CPU tensors, labels, row_ids) for each uint8 pixel batch."""
    module.eval().to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    for pixels, labels, row_ids in batches:
        if device.type == "cuda":
            pixels = pixels.pin_memory().to(device, non_blocking=True)
        x = preprocessing.normalize(pixels)
        with autocast_for(device):
            out = module(x)
        yield out.float().cpu(), labels, row_ids


def extract_features(
    encoder: nn.Module,
    pixel_path: str | Path,
    out_path: str | Path,
    preprocessing: Preprocessing,
    attrs: dict[str, Any],
    batch_size: int = 256,
    device: str = "auto",
    pixel_attrs: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Encode every image of a pixel cache and write (features, labels, row_ids) atomically, batch by batch."""
    dev = resolve_device(device)
    with open_arrays(pixel_path, PIXEL_COLUMNS, pixel_attrs) as handle:
        n = int(handle.attrs["n_rows"])
    dim = None
    with torch.inference_mode():
        probe = encoder.eval()(preprocessing.normalize(torch.zeros(1, preprocessing.image_size, preprocessing.image_size, 3, dtype=torch.uint8)))
        dim = int(probe.shape[-1])
    columns = {"features": ((dim,), np.float32), "labels": ((), np.int64), "row_ids": ((), np.int64)}
    with array_writer(out_path, n, columns, attrs) as out:
        start = 0
        for feats, labels, row_ids in encode_batches(
            encoder, iter_pixel_batches(pixel_path, batch_size, pixel_attrs), preprocessing, dev
        ):
            stop = start + feats.shape[0]
            out["features"][start:stop] = feats.numpy()
            out["labels"][start:stop] = labels.numpy()
            out["row_ids"][start:stop] = row_ids.numpy()
            start = stop
            if progress:
                progress(feats.shape[0])


def load_features(path: str | Path, expected_attrs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """(features, labels, row_ids) of a validated feature cache as tensors."""
    arrays = load_arrays(path, FEATURE_COLUMNS, expected_attrs)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}
