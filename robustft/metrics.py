"""Accuracy metrics, uncertainty across examples and seeds, and the logit projections of the ImageNet shifts."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch

Logits = TypeVar("Logits", np.ndarray, torch.Tensor)

# Bootstrap draws are made in chunks of at most this many indices, to bound memory on large test sets.
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


def _as_array(x: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    pred, labels = _as_array(pred), _as_array(labels)
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(f"pred and labels must be 1-D of equal shape, got {pred.shape} and {labels.shape}")
    if pred.size == 0:
        raise ValueError("accuracy of zero examples is undefined")
    return float(np.mean(pred == labels))


def group_accuracies(pred: np.ndarray, labels: np.ndarray, absent_mask: np.ndarray) -> dict[str, float | int]:
    """Overall accuracy and accuracy on examples of seen / absent classes (NaN for an empty group), with counts."""
    pred, labels, mask = _as_array(pred), _as_array(labels), _as_array(absent_mask)
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(f"pred and labels must be 1-D of equal shape, got {pred.shape} and {labels.shape}")
    if mask.dtype != bool or mask.ndim != 1:
        raise ValueError("absent_mask must be a 1-D boolean array over classes")
    if labels.size and (labels.min() < 0 or labels.max() >= mask.size):
        raise ValueError(f"labels must lie in [0, {mask.size})")
    correct = pred == labels
    absent = mask[labels]

    def mean_or_nan(c: np.ndarray) -> float:
        return float(c.mean()) if c.size else float("nan")

    return {
        "accuracy": mean_or_nan(correct),
        "seen_accuracy": mean_or_nan(correct[~absent]),
        "absent_accuracy": mean_or_nan(correct[absent]),
        "n": int(correct.size),
        "n_seen": int((~absent).sum()),
        "n_absent": int(absent.sum()),
    }


def bootstrap_ci(correct: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, §13.3) of the accuracy, resampling examples.

    Deterministic given ``seed``; resampled indices are drawn in chunks so memory stays bounded.
    """
    c = _as_array(correct).reshape(-1).astype(np.float64)
    n = c.size
    if n == 0:
        raise ValueError("bootstrap of zero examples is undefined")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    if not (0.0 < level < 1.0):
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = c[idx].mean(axis=1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def seed_spread(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1) across seeds; 0.0 for a single value."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("seed_spread of no values is undefined")
    return 0.0 if v.size == 1 else float(np.std(v, ddof=1))


def restrict_logits(logits: Logits, class_indices: Sequence[int]) -> Logits:
    """Keep the columns ``class_indices`` in that order (wise-ft ImageNet-R/A ``project_logits``: logits[:, mask])."""
    idx = np.asarray(class_indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("class_indices is empty")
    if idx.min() < 0 or idx.max() >= logits.shape[1]:
        raise ValueError(f"class indices must lie in [0, {logits.shape[1]})")
    if isinstance(logits, torch.Tensor):
        return logits[:, torch.as_tensor(idx, device=logits.device)]
    return np.asarray(logits)[:, idx]


def max_project_logits(logits: Logits, groups: Sequence[Sequence[int]]) -> Logits:
    """Logit of group g = max over its member columns (wise-ft ObjectNet ``project_logits``)."""
    if len(groups) == 0:
        raise ValueError("groups is empty")
    for g, members in enumerate(groups):
        if len(members) == 0:
            raise ValueError(f"group {g} has no member classes")
    if isinstance(logits, torch.Tensor):
        return torch.stack([restrict_logits(logits, m).amax(dim=1) for m in groups], dim=1)
    return np.stack([restrict_logits(logits, m).max(axis=1) for m in groups], axis=1)
