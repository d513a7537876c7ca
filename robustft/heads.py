"""Reference heads: the CLIP zero-shot head, or a multinomial logistic regression fitted on cached features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class LinearProbeFit:
    """A fitted linear probe and how it was chosen."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    l2: float
    val_accuracy: float
    grid: list[tuple[float, float]]  # (l2, val accuracy) for every strength tried


def standardize_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (floored) of training features."""
    mean = features.mean(0)
    std = features.std(0).clamp_min(1e-6)
    return mean, std


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with L2 penalty ``l2/2 ||W||^2`` on the weights, fitted by full-batch L-BFGS.

    Features are standardised for conditioning and the solution folded back, so the returned (W, b) act on
    raw features. Deterministic (no randomness; full batch).
    """
    features = features.double()
    mean, std = standardize_stats(features)
    z = (features - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    n = z.shape[0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels, reduction="sum") / n + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        w_raw = weight / std
        b_raw = bias - (w_raw * mean).sum(1)
    return w_raw.float().detach(), b_raw.float().detach()


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    l2_grid: Sequence[float],
    max_iter: int = 200,
) -> LinearProbeFit:
    """Fit one probe per L2 strength and keep the one with the best ID validation accuracy (ties: stronger L2)."""
    best: LinearProbeFit | None = None
    grid = []
    for l2 in sorted(l2_grid, reverse=True):
        weight, bias = fit_logistic_regression(train_features, train_labels, num_classes, l2, max_iter)
        acc = ((val_features @ weight.T + bias).argmax(1) == val_labels).float().mean().item()
        grid.append((float(l2), acc))
        if best is None or acc > best.val_accuracy:
            best = LinearProbeFit(weight, bias, float(l2), acc, grid)
    assert best is not None
    best.grid = sorted(grid)
    return best
