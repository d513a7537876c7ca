"""Evaluation and the WiSE-FT sweep: every alpha's weights built in place, every eval split read once."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from robustft.backbones.base import Backbone, Preprocessing
from robustft.data.pixels import PixelSplit
from robustft.features import (
    FREEZE_MIN_PIXELS,
    CpuInferenceGraph,
    cpu_inference_graph,
    forward_uint8,
    pinned_batches,
)
from robustft.interpolation import fisher_weighted_interpolation, interpolate_into
from robustft.models import ClassificationHead, ImageClassifier


@dataclass
class EvalSplit:
    """One split to evaluate: its name (e.g. ``sketch_test``), labels, and either pixels or cached features."""

    name: str
    domain: str
    split: str
    labels: np.ndarray
    pixels: PixelSplit | None = None
    features: torch.Tensor | None = None


def build_classifier(backbone: Backbone, num_classes: int) -> ImageClassifier:
    """A fresh pre-trained encoder with an (uninitialised) head of ``num_classes`` outputs."""
    head = ClassificationHead(backbone.feature_dim, num_classes, normalize=backbone.features_normalized)
    return ImageClassifier(backbone.build_encoder(), head)


@torch.inference_mode()
def predict_logits(
    module: nn.Module, pixels: torch.Tensor, preprocessing: Preprocessing, device: torch.device, batch_size: int
) -> np.ndarray:
    """Logits (float32) of ``module`` on uint8 pixels (N, H, W, 3), ``batch_size`` at a time (:func:`forward_uint8`).

    On CUDA a helper thread pins the next batches while the device runs this one (:func:`pinned_batches`); on CPU
    the slices of ``pixels`` are taken inline.
    """
    module.eval()
    batches = (pixels[start : start + batch_size] for start in range(0, pixels.shape[0], batch_size))
    with contextlib.closing(pinned_batches(batches, device, depth=2 if device.type == "cuda" else 0)) as ready:
        out = [forward_uint8(module, batch, preprocessing, device) for batch in ready]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def encoder_unchanged(reference: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> bool:
    """True when every ``encoder.*`` entry is bit-identical: the sweep can then run on cached features."""
    return all(torch.equal(reference[k], finetuned[k]) for k in reference if k.startswith("encoder."))


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
) -> Iterator[tuple[float, EvalSplit, np.ndarray]]:
    """Yield (alpha, split, logits) for every alpha and split (WiSE-FT, Wortsman et al. 2022, Eq. 1).

    The model is loaded once; each alpha's weights are written into its parameters in place. On CPU, with at least
    ``cpu_freeze_min_pixels`` input pixels to encode per alpha (None: never), the model is traced once and each
    alpha's weights are frozen into that graph (:class:`CpuInferenceGraph`). When the encoder is untouched
    (head-only methods) only the head is interpolated and applied to cached features.
    ``fisher`` = (F_reference, F_finetuned) switches to the Fisher-weighted merge of the reference code.
    """
    reference = {k: v.to(device) for k, v in reference.items()}
    finetuned = {k: v.to(device) for k, v in finetuned.items()}
    model.to(device)
    head_only = encoder_unchanged(reference, finetuned) and all(s.features is not None for s in splits)
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
        if alpha == 0.0 and not head_only and all(s.features is not None for s in splits):
            # theta(0) is the reference model: pre-trained encoder + reference head, i.e. the head on cached features.
            reference_head = copy.deepcopy(model.head)
            reference_head.load_state_dict({"weight": reference["head.weight"], "bias": reference["head.bias"]})
            for split in splits:
                with torch.inference_mode():
                    logits = reference_head(split.features.to(device)).float().cpu().numpy()
                yield float(alpha), split, logits
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
                with torch.inference_mode():
                    logits = model.head(split.features.to(device)).float().cpu().numpy()
            else:
                assert split.pixels is not None, f"split {split.name} has no pixels"
                logits = predict_logits(module, split.pixels.pixels, preprocessing, device, batch_size)
            yield float(alpha), split, logits


def _cpu_graph(
    model: nn.Module, splits: Sequence[EvalSplit], device: torch.device, min_pixels: int | None
) -> CpuInferenceGraph | None:
    """:func:`cpu_inference_graph` for one alpha's pass over every split's pixels."""
    shapes = [s.pixels.pixels.shape for s in splits if s.pixels is not None]
    if not shapes:
        return None
    return cpu_inference_graph(model, sum(shape[0] for shape in shapes), shapes[0][1], shapes[0][2], device, min_pixels)
