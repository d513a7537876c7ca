"""Feature extraction: stream a pixel cache through an image encoder into an HDF5 feature cache."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from robustft.backbones.base import Preprocessing
from robustft.data.pixels import PIXEL_COLUMNS, iter_pixel_batches
from robustft.io.arrays import array_writer, load_arrays, open_arrays

FEATURE_COLUMNS = ("features", "labels", "row_ids")

#: On CPU the encoder runs on micro-batches of about this many input pixels (4 images at 224 px, 21 at 96 px): the
#: activations then stay in the last-level cache. EfficientNet's depthwise convolutions, padding, batch norms and
#: clamps are memory-bound; a batch of 256 at 224 px streams ~400 MB per layer through DRAM and ran 3-6x slower per
#: image on 2 cores (bench/README.md). CUDA runs whole batches.
CPU_PIXELS_PER_FORWARD = 4 * 224 * 224


def cpu_micro_batch(height: int, width: int, pixels_per_forward: int | None = CPU_PIXELS_PER_FORWARD) -> int | None:
    """Images per CPU forward pass for (height, width) inputs (None: whole batches)."""
    if not pixels_per_forward:
        return None
    return max(1, pixels_per_forward // max(1, height * width))


#: Freezing (tracing) takes about a second; smaller caches are encoded eagerly.
FREEZE_MIN_IMAGES = 64


def frozen_for_cpu_inference(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """``module`` traced and frozen by TorchScript for CPU inference, or ``module`` itself where that fails.

    Freezing inlines the weights and folds each batch norm into the convolution before it; EfficientNet-Lite0 then
    encodes 1.15-1.35x faster on 2 cores (bench/README.md). Outputs differ from eager ones by float rounding only
    (checked on ``example``, normalised inputs (N, 3, H, W), and on other inputs of another batch size); a module
    that cannot be traced, or whose traced outputs differ by more, is returned as it is.
    """
    module.eval()
    checks = [example, -example[: max(1, example.shape[0] // 2)]]  # other values and another batch size
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
            same = all(torch.allclose(frozen(x).float(), module(x).float(), rtol=1e-4, atol=1e-4) for x in checks)
    except Exception:  # noqa: BLE001 - any tracing failure means: run the module eagerly
        return module
    return frozen if same else module


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
def forward_uint8(
    module: nn.Module,
    pixels: torch.Tensor,
    preprocessing: Preprocessing,
    device: torch.device,
    cpu_pixels_per_forward: int | None = CPU_PIXELS_PER_FORWARD,
) -> torch.Tensor:
    """``module(normalize(pixels))`` for uint8 pixels (N, H, W, 3), as a float32 CPU tensor.

    CUDA: one pass over the batch, copied from pinned memory without blocking, in bf16 autocast. CPU: fp32, in
    micro-batches of :func:`cpu_micro_batch` images, concatenated (the model is in eval mode, so each image's output
    does not depend on its neighbours).
    """
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
        with autocast_for(device):
            return module(preprocessing.normalize(pixels)).float().cpu()
    step = cpu_micro_batch(pixels.shape[1], pixels.shape[2], cpu_pixels_per_forward) or pixels.shape[0]
    if pixels.shape[0] <= step:
        return module(preprocessing.normalize(pixels)).float()
    return torch.cat([module(preprocessing.normalize(pixels[i : i + step])).float()
                      for i in range(0, pixels.shape[0], step)])


def encode_batches(
    module: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    preprocessing: Preprocessing,
    device: torch.device,
    cpu_pixels_per_forward: int | None = CPU_PIXELS_PER_FORWARD,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (module outputs as float32 CPU tensors, labels, row_ids) per uint8 pixel batch (:func:`forward_uint8`)."""
    module.eval().to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    for pixels, labels, row_ids in batches:
        yield forward_uint8(module, pixels, preprocessing, device, cpu_pixels_per_forward), labels, row_ids


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
    cpu_pixels_per_forward: int | None = CPU_PIXELS_PER_FORWARD,
    cpu_freeze: bool = True,
) -> None:
    """Encode every image of a pixel cache and write (features, labels, row_ids) atomically, batch by batch.

    ``batch_size`` images are read at a time; on CPU they are encoded in micro-batches (:func:`forward_uint8`) by
    the frozen encoder (:func:`frozen_for_cpu_inference`, unless ``cpu_freeze`` is false).
    """
    dev = resolve_device(device)
    with open_arrays(pixel_path, PIXEL_COLUMNS, pixel_attrs) as handle:
        n = int(handle.attrs["n_rows"])
    dim = None
    with torch.inference_mode():
        probe = encoder.eval()(preprocessing.normalize(torch.zeros(1, preprocessing.image_size, preprocessing.image_size, 3, dtype=torch.uint8)))
        dim = int(probe.shape[-1])
    if dev.type == "cpu" and cpu_freeze and n >= FREEZE_MIN_IMAGES:
        size = preprocessing.image_size
        step = cpu_micro_batch(size, size, cpu_pixels_per_forward) or batch_size
        example = torch.randn(min(step, n), 3, size, size, generator=torch.Generator().manual_seed(0))
        encoder = frozen_for_cpu_inference(encoder, example)
    columns = {"features": ((dim,), np.float32), "labels": ((), np.int64), "row_ids": ((), np.int64)}
    with array_writer(out_path, n, columns, attrs) as out:
        start = 0
        for feats, labels, row_ids in encode_batches(
            encoder, iter_pixel_batches(pixel_path, batch_size, pixel_attrs), preprocessing, dev,
            cpu_pixels_per_forward,
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
