"""Evaluation and the WiSE-FT sweep: every alpha's weights built in place, every eval split streamed from its cache."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from robustft.backbones.base import Backbone, Preprocessing
from robustft.features import (
    FREEZE_MIN_PIXELS,
    CpuInferenceGraph,
    cpu_inference_graph,
    forward_uint8,
    pinned_batches,
)
from robustft.interpolation import fisher_weighted_interpolation, interpolate_into
from robustft.io.arrays import open_arrays
from robustft.models import ClassificationHead, ImageClassifier

#: Batches a reader thread keeps ready ahead of the forward pass when a split streams from disk.
READ_AHEAD = 2


@dataclass(frozen=True)
class CachedColumn:
    """One column (``pixels``, ``features``, ``labels``, ``row_ids``) of a validated cache file, streamed in batches.

    ``rows``: sorted row indices of a subset (a seeded sample), None for every row. Memory holds one batch.
    ``expected_attrs``: provenance the file must carry (:func:`robustft.io.arrays.open_arrays`).
    """

    path: str | Path
    column: str
    rows: np.ndarray | None = None
    expected_attrs: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.rows is not None:
            rows = np.asarray(self.rows, dtype=np.int64).reshape(-1)
            if rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0):
                raise ValueError(f"{self.path}: rows must be sorted, distinct and non-negative")
            object.__setattr__(self, "rows", rows)

    def _open(self):
        return open_arrays(self.path, (self.column,), self.expected_attrs)

    @property
    def shape(self) -> tuple[int, ...]:
        """(rows, *row shape) of the column, or of the subset."""
        with self._open() as handle:
            shape = tuple(handle[self.column].shape)
            if self.rows is not None:
                if self.rows.size and self.rows[-1] >= shape[0]:
                    raise ValueError(f"{self.path}: row {int(self.rows[-1])} is beyond its {shape[0]} rows")
                shape = (len(self.rows), *shape[1:])
        return shape

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The column's rows (or the subset's, in order), ``batch_size`` at a time, as CPU tensors."""
        with self._open() as handle:
            data = handle[self.column]
            n = data.shape[0] if self.rows is None else len(self.rows)
            for start in range(0, n, batch_size):
                if self.rows is None:
                    block = data[start : start + batch_size]
                else:
                    block = data[self.rows[start : start + batch_size]]
                yield torch.from_numpy(np.ascontiguousarray(block))

    def read(self) -> np.ndarray:
        """Every row of the column (or of the subset) in memory: for small columns such as labels and row ids."""
        with self._open() as handle:
            data = handle[self.column]
            return data[...] if self.rows is None else data[self.rows]


Source = torch.Tensor | CachedColumn


@dataclass
class EvalSplit:
    """One split to evaluate: its name (e.g. ``sketch_test``), labels, and pixels and/or cached features, each a
    tensor in memory or a :class:`CachedColumn` streamed from its cache."""

    name: str
    domain: str
    split: str
    labels: np.ndarray
    pixels: Source | None = None
    features: Source | None = None


def source_batches(source: Source, batch_size: int, device: torch.device, read_ahead: int = READ_AHEAD
                   ) -> Iterator[torch.Tensor]:
    """``source`` in batches: slices of a tensor in memory (pinned ahead on CUDA), or rows of a cache read
    ``read_ahead`` batches ahead by a helper thread (:func:`pinned_batches`, which also pins on CUDA)."""
    if isinstance(source, CachedColumn):
        return pinned_batches(source.batches(batch_size), device, depth=read_ahead)
    slices = (source[start : start + batch_size] for start in range(0, source.shape[0], batch_size))
    return pinned_batches(slices, device, depth=read_ahead if device.type == "cuda" else 0)


def build_classifier(backbone: Backbone, num_classes: int) -> ImageClassifier:
    """A fresh pre-trained encoder with an (uninitialised) head of ``num_classes`` outputs."""
    head = ClassificationHead(backbone.feature_dim, num_classes, normalize=backbone.features_normalized)
    return ImageClassifier(backbone.build_encoder(), head)


def predict_batches(
    module: nn.Module, batches: Iterable[torch.Tensor], preprocessing: Preprocessing, device: torch.device
) -> Iterator[np.ndarray]:
    """Logits (float32) of ``module`` per uint8 pixel batch (N, H, W, 3) (:func:`forward_uint8`)."""
    module.eval()
    for batch in batches:
        yield forward_uint8(module, batch, preprocessing, device).numpy()


def predict_logits(
    module: nn.Module, pixels: Source, preprocessing: Preprocessing, device: torch.device, batch_size: int
) -> np.ndarray:
    """Logits (float32) of ``module`` on every image of ``pixels`` (uint8 (N, H, W, 3) in memory, or a cache column)."""
    with contextlib.closing(source_batches(pixels, batch_size, device)) as batches:
        out = list(predict_batches(module, batches, preprocessing, device))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def encoder_unchanged(reference: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> bool:
    """True when every ``encoder.*`` entry is bit-identical: the sweep can then run on cached features."""
    return all(torch.equal(reference[k], finetuned[k]) for k in reference if k.startswith("encoder."))


def _head_logits(head: nn.Module, features: Source, batch_size: int, device: torch.device
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, logits) of ``head`` on each batch of cached features."""
    start = 0
    with contextlib.closing(source_batches(features, batch_size, device)) as batches:
        for batch in batches:
            with torch.inference_mode():
                logits = head(batch.to(device)).float().cpu().numpy()
            yield start, logits
            start += batch.shape[0]


def sweep_logits(
    model: ImageClassifier,
    reference: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    alphas: Sequence[float],
    splits: Sequence[EvalSplit],
    preprocessing: Preprocessing,
    device: torch.device,
    batch_size: int,
    fisher: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    cpu_freeze_min_pixels: int | None = FREEZE_MIN_PIXELS,
) -> Iterator[tuple[float, EvalSplit, int, np.ndarray]]:
    """Yield (alpha, split, first row, logits of a batch) for every alpha, split and batch (WiSE-FT, Wortsman et al.
    2022, Eq. 1); :func:`gather_logits` assembles them.

    The model is loaded once; each alpha's weights are written into its parameters in place, then every split is
    streamed through it batch by batch (memory: one batch, never a split). On CPU, with at least
    ``cpu_freeze_min_pixels`` input pixels to encode per alpha (None: never), the model is traced once and each
    alpha's weights are frozen into that graph (:class:`CpuInferenceGraph`). When the encoder is untouched
    (head-only methods) only the head is interpolated and applied to cached features; alpha = 0 (the reference
    model) is the reference head on cached features wherever every split has them.
    ``fisher`` = (F_reference, F_finetuned) switches to the Fisher-weighted merge of the reference code.
    """
    reference = {k: v.to(device) for k, v in reference.items()}
    finetuned = {k: v.to(device) for k, v in finetuned.items()}
    model.to(device)
    with_features = all(s.features is not None for s in splits)
    head_only = encoder_unchanged(reference, finetuned) and with_features
    target = model.head if head_only else model
    prefix = "head." if head_only else ""
    live = {f"{prefix}{k}": v for k, v in target.state_dict().items()}
    ref = {k: reference[k] for k in live}
    fin = {k: finetuned[k] for k in live}
    graph = None
    if not head_only:
        model.load_state_dict(dict(reference))  # buffers not in ``live`` stay consistent
        graph = _cpu_graph(model, splits, device, cpu_freeze_min_pixels)
    for alpha in alphas:
        if alpha == 0.0 and not head_only and with_features:
            # theta(0) is the reference model: pre-trained encoder + reference head, i.e. the head on cached features.
            reference_head = copy.deepcopy(model.head)
            reference_head.load_state_dict({"weight": reference["head.weight"], "bias": reference["head.bias"]})
            for split in splits:
                for start, logits in _head_logits(reference_head, split.features, batch_size, device):
                    yield float(alpha), split, start, logits
            continue
        if fisher is None:
            interpolate_into(live, ref, fin, float(alpha))
        else:
            merged = fisher_weighted_interpolation(ref, fin, fisher[0], fisher[1], float(alpha))
            for key, value in merged.items():
                live[key].copy_(value)
        module = graph.frozen() if graph is not None else model
        for split in splits:
            if head_only:
                for start, logits in _head_logits(model.head, split.features, batch_size, device):
                    yield float(alpha), split, start, logits
                continue
            if split.pixels is None:
                raise ValueError(f"split {split.name} has no pixels to evaluate a changed encoder on")
            start = 0
            batches = source_batches(split.pixels, batch_size, device)
            with contextlib.closing(batches):
                for logits in predict_batches(module, batches, preprocessing, device):
                    yield float(alpha), split, start, logits
                    start += logits.shape[0]


def gather_logits(batches: Iterable[tuple[float, EvalSplit, int, np.ndarray]]) -> dict[tuple[float, str], np.ndarray]:
    """{(alpha, split name): logits of the whole split} from :func:`sweep_logits` (tests, benchmarks, small data)."""
    parts: dict[tuple[float, str], list[tuple[int, np.ndarray]]] = {}
    for alpha, split, start, logits in batches:
        parts.setdefault((alpha, split.name), []).append((start, logits))
    out = {}
    for key, chunks in parts.items():
        chunks.sort(key=lambda c: c[0])
        out[key] = np.concatenate([c for _, c in chunks])
    return out


def _cpu_graph(
    model: nn.Module, splits: Sequence[EvalSplit], device: torch.device, min_pixels: int | None
) -> CpuInferenceGraph | None:
    """:func:`cpu_inference_graph` for one alpha's pass over every split's pixels."""
    if device.type != "cpu" or min_pixels is None:
        return None
    shapes = [tuple(s.pixels.shape) for s in splits if s.pixels is not None]
    if not shapes:
        return None
    return cpu_inference_graph(model, sum(shape[0] for shape in shapes), shapes[0][1], shapes[0][2], device, min_pixels)
