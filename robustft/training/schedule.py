"""Learning-rate schedule: linear warm-up then cosine decay, as ``mlfoundations/wise-ft`` ``src/models/utils.py``."""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based), wise-ft ``cosine_lr``.

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps; then 0.5·(1 + cos(π·e/E)) with e = step − warmup
    and E = total − warmup (1.0 when E ≤ 0, i.e. when warm-up covers the whole run).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`warmup_cosine_factor`; its ``state_dict`` is the step count only."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps)
    )
