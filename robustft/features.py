"""Feature extraction: stream a pixel cache through an image encoder into an HDF5 feature cache."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from robustft.backbones.base import Preprocessing
from robustft.data.pixels import PIXEL_COLUMNS, iter_pixel_batches
from robustft.devices import autocast_for, resolve_device
from robustft.io.arrays import array_writer, load_arrays, open_arrays
from robustft.io.prefetch import prefetched

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


#: CPU passes over fewer input pixels than this run eagerly: tracing costs about 0.4 s and each freeze (with its
#: check and the graph's first, profiling calls) 0.1-0.2 s, while a frozen EfficientNet-Lite0 saves 15-50 % of the
#: eager time. 3 M pixels is 60 images at 224 px, 325 at 96 px, 730 at 64 px (bench/README.md: a sweep of 133
#: images at 64 px ran 1.5x slower frozen than eager; 630 at 96 px 1.17x faster).
FREEZE_MIN_PIXELS = 3_000_000


def _outputs_agree(a: nn.Module, b: nn.Module, inputs: Iterable[torch.Tensor]) -> bool:
    return all(torch.allclose(a(x).float(), b(x).float(), rtol=1e-4, atol=1e-4, equal_nan=True) for x in inputs)


class CpuInferenceGraph:
    """``module`` traced once by TorchScript; :meth:`frozen` inlines its *current* weights into a frozen copy.

    The trace shares the module's parameters, so a caller that rewrites them in place (the WiSE-FT sweep, once per
    alpha) calls :meth:`frozen` again and gets a graph with the new weights for about 0.1 s, not a new trace.
    Freezing folds each batch norm into the convolution before it: EfficientNet-Lite0 then runs 1.15-1.35x faster
    on 2 cores than eagerly (bench/README.md). Where tracing fails, or a frozen graph's outputs differ from the module's
    by more than float rounding, :meth:`frozen` returns the module itself.
    """

    def __init__(self, module: nn.Module, example: torch.Tensor) -> None:
        self.module = module.eval()
        self.example = example
        self.traced: torch.jit.ScriptModule | None = None
        self._checked = False
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                self.traced = torch.jit.trace(self.module, example, check_trace=False)
        except Exception:  # noqa: BLE001 - any tracing failure means: run the module eagerly
            self.traced = None

    def frozen(self) -> nn.Module:
        """A frozen graph of the module's weights as they are now, or the module where freezing is not exact.

        The first call checks the graph on the example and on other inputs of another batch size (a trace can bake
        in the batch size); later calls, whose graphs differ only in weights, check two images of the example.
        """
        if self.traced is None:
            return self.module
        first = not self._checked
        checks = [self.example, -self.example[: max(1, self.example.shape[0] // 2)]] if first else [self.example[:2]]
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                frozen = torch.jit.freeze(self.traced)
                same = _outputs_agree(frozen, self.module, checks)
        except Exception:  # noqa: BLE001
            same = False
        if not same:
            self.traced = None  # a graph that was wrong once is not trusted again
            return self.module
        self._checked = True
        return frozen


def cpu_inference_graph(
    module: nn.Module,
    n_images: int,
    height: int,
    width: int,
    device: torch.device,
    min_pixels: int | None = FREEZE_MIN_PIXELS,
    pixels_per_forward: int | None = CPU_PIXELS_PER_FORWARD,
    whole_batch: int | None = None,
) -> CpuInferenceGraph | None:
    """``module`` traced for a CPU pass over ``n_images`` (height, width) images, on an example micro-batch (or
    ``whole_batch`` images where there are no micro-batches); None on CUDA, with ``min_pixels`` None, or where the
    pass has fewer than ``min_pixels`` input pixels (:data:`FREEZE_MIN_PIXELS`)."""
    if device.type != "cpu" or min_pixels is None or n_images * height * width < min_pixels:
        return None
    step = cpu_micro_batch(height, width, pixels_per_forward) or whole_batch or n_images
    example = torch.randn(min(step, n_images), 3, height, width, generator=torch.Generator().manual_seed(0))
    return CpuInferenceGraph(module, example)


@torch.inference_mode()
def forward_uint8(
    module: nn.Module,
    pixels: torch.Tensor,
    preprocessing: Preprocessing,
    device: torch.device,
    cpu_pixels_per_forward: int | None = CPU_PIXELS_PER_FORWARD,
) -> torch.Tensor:
    """``module(normalize(pixels))`` for uint8 pixels (N, H, W, 3), as a float32 CPU tensor.

    CUDA: one pass over the batch in bf16 autocast, copied without blocking from pinned memory (pinned here unless
    the caller pinned it ahead, as :func:`extract_features`'s reader thread does). CPU: fp32, in micro-batches of
    :func:`cpu_micro_batch` images, concatenated (the model is in eval mode, so each image's output does not depend
    on its neighbours).
    """
    if device.type == "cuda":
        pixels = (pixels if pixels.is_pinned() else pixels.pin_memory()).to(device, non_blocking=True)
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


def _pin(batch: Any) -> Any:
    """A batch with its pixels (the batch itself, or the first tensor of a tuple) copied into pinned memory."""
    return (batch[0].pin_memory(), *batch[1:]) if isinstance(batch, tuple) else batch.pin_memory()


def pinned_batches(batches: Iterable[Any], device: torch.device, depth: int = 2) -> Iterator[Any]:
    """``batches`` produced ``depth`` ahead by a helper thread (:func:`~robustft.io.prefetch.prefetched`) that, on
    CUDA, also pins their pixels for :func:`forward_uint8`'s non-blocking copy, as a DataLoader's pin-memory thread
    does. ``depth`` 0: produced inline (and pinned by :func:`forward_uint8`)."""
    return prefetched(batches, depth, _pin if device.type == "cuda" else None)


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
    cpu_freeze_min_pixels: int | None = FREEZE_MIN_PIXELS,
    prefetch: int = 2,
) -> None:
    """Encode every image of a pixel cache and write (features, labels, row_ids) atomically, batch by batch.

    ``batch_size`` images are read at a time, up to ``prefetch`` batches ahead by a reader thread (on CUDA it also
    pins them), so reading the cache overlaps encoding; 0: read inline. On CPU they are encoded in micro-batches
    (:func:`forward_uint8`) by the frozen encoder (:func:`cpu_inference_graph`) where the cache holds at least
    ``cpu_freeze_min_pixels`` input pixels (None: never).
    """
    dev = resolve_device(device)
    with open_arrays(pixel_path, PIXEL_COLUMNS, pixel_attrs) as handle:
        n = int(handle.attrs["n_rows"])
    dim = None
    with torch.inference_mode():
        probe = encoder.eval()(preprocessing.normalize(torch.zeros(1, preprocessing.image_size, preprocessing.image_size, 3, dtype=torch.uint8)))
        dim = int(probe.shape[-1])
    size = preprocessing.image_size
    graph = cpu_inference_graph(encoder, n, size, size, dev, cpu_freeze_min_pixels, cpu_pixels_per_forward, batch_size)
    if graph is not None:
        encoder = graph.frozen()
    columns = {"features": ((dim,), np.float32), "labels": ((), np.int64), "row_ids": ((), np.int64)}
    reader = pinned_batches(iter_pixel_batches(pixel_path, batch_size, pixel_attrs), dev, prefetch)
    with array_writer(out_path, n, columns, attrs) as out, contextlib.closing(reader) as batches:
        start = 0
        for feats, labels, row_ids in encode_batches(encoder, batches, preprocessing, dev, cpu_pixels_per_forward):
            stop = start + feats.shape[0]
            out["features"][start:stop] = feats.numpy()
            out["labels"][start:stop] = labels.numpy()
            out["row_ids"][start:stop] = row_ids.numpy()
            start = stop
            if progress:
                progress(feats.shape[0])


#: Bytes of float32 features per chunk that :class:`FeatureChunks` reads (1,638 rows of 1280-d EfficientNet features,
#: 4,096 of 512-d CLIP ViT-B features). The linear probe holds about four times a chunk (two read buffers and one
#: float64 standardised copy), so this sets the reference stage's memory above the model's.
FEATURE_CHUNK_BYTES = 8 << 20


class FeatureChunks:
    """A validated feature cache as a re-iterable source of (features, labels) row chunks (:data:`robustft.heads.Chunks`).

    Each pass opens the file and reads ``chunk_bytes`` of features at a time, so memory holds one chunk whatever the
    split's size; a cache that fits in one chunk is read once and kept (the linear probe makes hundreds of passes).
    Larger caches are read into two buffers that alternate, allocated once a pass: a chunk stays valid until the
    next but one is read, and hundreds of passes do not churn the allocator (which grew the heap by a fifth).
    """

    def __init__(self, path: str | Path, expected_attrs: dict[str, Any] | None = None,
                 chunk_bytes: int = FEATURE_CHUNK_BYTES) -> None:
        self.path, self.expected_attrs = Path(path), expected_attrs
        with open_arrays(path, FEATURE_COLUMNS, expected_attrs) as handle:
            self.n, self.dim = (int(v) for v in handle["features"].shape)
        self.rows = max(1, chunk_bytes // (4 * max(1, self.dim)))
        self._whole: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._whole is not None:
            yield self._whole
            return
        with open_arrays(self.path, FEATURE_COLUMNS, self.expected_attrs) as handle:
            features, labels = handle["features"], handle["labels"]
            if self.n <= self.rows:
                self._whole = torch.from_numpy(features[:]), torch.from_numpy(labels[:])
                yield self._whole
                return
            buffers = [(np.empty((self.rows, self.dim), features.dtype), np.empty(self.rows, labels.dtype))
                       for _ in range(2)]
            for i, start in enumerate(range(0, self.n, self.rows)):
                stop = min(self.n, start + self.rows)
                feature_buffer, label_buffer = buffers[i % 2]
                features.read_direct(feature_buffer, np.s_[start:stop], np.s_[: stop - start])
                labels.read_direct(label_buffer, np.s_[start:stop], np.s_[: stop - start])
                yield torch.from_numpy(feature_buffer[: stop - start]), torch.from_numpy(label_buffer[: stop - start])


def load_features(path: str | Path, expected_attrs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """(features, labels, row_ids) of a validated feature cache as tensors."""
    arrays = load_arrays(path, FEATURE_COLUMNS, expected_attrs)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}
