"""Reference heads: the CLIP zero-shot head, or a multinomial logistic regression fitted on cached features.

The fit streams its data: features arrive as re-iterable sources of (features, labels) row chunks (a feature cache
read chunk by chunk, :class:`robustft.features.FeatureChunks`, or :class:`TensorChunks` in memory), so memory is
bounded by one chunk, not by the split (ImageNet's training features are several GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F

#: A re-iterable source of (features (n, D), labels (n,)) row chunks; each pass yields every row once, in order.
Chunks = Iterable[Tuple[torch.Tensor, torch.Tensor]]


class TensorChunks:
    """In-memory features and labels as a :data:`Chunks` source of ``rows`` rows per chunk (None: one chunk)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, rows: int | None = None) -> None:
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"features have {features.shape[0]} rows, labels {labels.shape[0]}")
        self.features, self.labels = features, labels
        self.rows = rows or max(1, features.shape[0])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.rows >= len(self):  # the same tensors on every pass (the fit standardises them once)
            yield self.features, self.labels
            return
        for start in range(0, len(self), self.rows):
            yield self.features[start : start + self.rows], self.labels[start : start + self.rows]


@dataclass
class LinearProbeFit:
    """A fitted linear probe and how it was chosen."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    l2: float
    val_accuracy: float
    grid: list[tuple[float, float]]  # (l2, val accuracy) for every strength tried


@dataclass(frozen=True)
class Standardization:
    """Per-dimension mean and (unbiased, floored) std of training features, in float64, and the row count."""

    mean: torch.Tensor
    std: torch.Tensor
    n: int


class Float64Buffer:
    """One float64 array, grown to the largest chunk and reused for every chunk's copy: hundreds of passes over a
    streamed split allocate it once (a new copy per chunk made glibc's heap grow by a fifth of the process)."""

    def __init__(self) -> None:
        self._array: torch.Tensor | None = None

    def copy_of(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` in float64, in the buffer: valid until the next call."""
        rows, dim = features.shape
        if self._array is None or self._array.shape[0] < rows or self._array.shape[1] != dim:
            self._array = torch.empty((rows, dim), dtype=torch.float64)
        return self._array[:rows].copy_(features)


def standardize_stats(chunks: Chunks, std_floor: float = 1e-6) -> Standardization:
    """Mean and std in one streamed pass: each chunk's mean and sum of squared deviations, merged exactly in float64
    (Chan, Golub and LeVeque 1979), so the result does not depend on the chunking beyond rounding."""
    n, mean, m2 = 0, None, None
    buffer = Float64Buffer()
    for features, _ in chunks:
        k = int(features.shape[0])
        if k == 0:
            continue
        x = buffer.copy_of(features)
        chunk_mean = x.mean(0)
        chunk_m2 = x.sub_(chunk_mean).pow_(2).sum(0)
        if mean is None:
            n, mean, m2 = k, chunk_mean, chunk_m2
            continue
        total = n + k
        delta = chunk_mean - mean
        mean = mean + delta * (k / total)
        m2 = m2 + chunk_m2 + delta.pow(2) * (n * k / total)
        n = total
    if mean is None or n < 2:
        raise ValueError(f"a linear probe needs at least 2 training examples, got {n}")
    return Standardization(mean, (m2 / (n - 1)).sqrt().clamp_min(std_floor), n)


def fit_logistic_regression(
    chunks: Chunks, num_classes: int, l2: float, max_iter: int = 200, stats: Standardization | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with L2 penalty ``l2/2 ||W||^2`` on the weights, fitted by full-batch L-BFGS.

    Full batch, streamed: each L-BFGS evaluation accumulates the loss and its gradient over the chunks (one backward
    pass per chunk), so memory holds one chunk. Features are standardised (``stats``, computed here when not given)
    for conditioning and the solution folded back, so the returned (W, b) act on raw features. Deterministic.
    """
    stats = stats or standardize_stats(chunks)
    weight = torch.zeros(num_classes, stats.mean.shape[0], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    buffer = Float64Buffer()
    last: list[torch.Tensor] = []  # the last chunk and its standardised copy: a one-chunk source is standardised once

    def standardized(features: torch.Tensor) -> torch.Tensor:
        if not last or last[0] is not features:
            # in the one buffer: the previous chunk's backward pass is done before the next chunk overwrites it
            last[:] = [features, buffer.copy_of(features).sub_(stats.mean).div_(stats.std)]
        return last[1]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), dtype=torch.float64)
        for features, labels in chunks:
            z = standardized(features)
            loss = F.cross_entropy(z @ weight.T + bias, labels.long(), reduction="sum") / stats.n
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * l2 * weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    optimizer.step(closure)
    with torch.no_grad():
        w_raw = weight / stats.std
        b_raw = bias - (w_raw * stats.mean).sum(1)
    return w_raw.float().detach(), b_raw.float().detach()


@torch.no_grad()
def head_accuracy(chunks: Chunks, weight: torch.Tensor, bias: torch.Tensor, normalize: bool = False) -> float:
    """Accuracy of the linear head (W, b) over the chunks (``normalize``: L2-normalise features first, as CLIP)."""
    correct, n = 0, 0
    for features, labels in chunks:
        x = features.float()
        if normalize:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        correct += int(((x @ weight.T + bias).argmax(1) == labels).sum())
        n += int(labels.shape[0])
    if n == 0:
        raise ValueError("accuracy of an empty split")
    return correct / n


def fit_linear_probe(
    train: Chunks, val: Chunks, num_classes: int, l2_grid: Sequence[float], max_iter: int = 200
) -> LinearProbeFit:
    """Fit one probe per L2 strength and keep the one with the best ID validation accuracy (ties: stronger L2)."""
    stats = standardize_stats(train)
    best: LinearProbeFit | None = None
    grid = []
    for l2 in sorted(l2_grid, reverse=True):
        weight, bias = fit_logistic_regression(train, num_classes, l2, max_iter, stats)
        acc = head_accuracy(val, weight, bias)
        grid.append((float(l2), acc))
        if best is None or acc > best.val_accuracy:
            best = LinearProbeFit(weight, bias, float(l2), acc, grid)
    if best is None:
        raise ValueError("reference.l2_grid is empty")
    best.grid = sorted(grid)
    return best
