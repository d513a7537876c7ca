"""Diagonal Fisher information and penalties that pull fine-tuned weights toward the pre-trained ones.

The Fisher follows ``mlfoundations/wise-ft`` ``src/models/fisher.py``: batch size 1, the label sampled from the
model's own softmax, F = mean over examples of the squared gradient of log p(sampled label).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def diagonal_fisher(
    model: nn.Module,
    inputs: Iterable[Tensor],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    generator: torch.Generator | None = None,
    max_examples: int | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher F = E_x E_{y~p(·|x)} [(∂ log p(y|x)/∂θ)²] with sampled labels, as in wise-ft ``fisher.py``.

    Iterates over the rows of each input batch (an item may also be a ``(inputs, ...)`` tuple), one backward pass
    per example, with the model in eval mode (wise-ft uses train mode; eval keeps dropout off so the result is
    deterministic under a seeded ``generator``). The model's mode is restored afterwards and ``.grad`` is untouched.
    Parameters the output does not depend on get a zero Fisher.
    """
    if params is None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("no parameters to compute a Fisher for")
    for name, p in params.items():
        if not p.requires_grad:
            raise ValueError(f"parameter {name!r} does not require grad")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be positive, got {max_examples}")

    names = list(params)
    tensors = [params[n] for n in names]
    acc = [torch.zeros_like(p).detach() for p in tensors]
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in inputs:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            for i in range(batch.shape[0]):
                if max_examples is not None and count >= max_examples:
                    break
                logits = model(batch[i : i + 1])
                if logits.dim() != 2 or logits.shape[0] != 1:
                    raise ValueError(f"model must return logits of shape (1, C), got {tuple(logits.shape)}")
                log_probs = F.log_softmax(logits, dim=-1)
                # drawn on the CPU: ``generator`` is a CPU generator, and the labels do not depend on the device
                label = int(torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator))
                grads = torch.autograd.grad(log_probs[0, label], tensors, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.detach().square())
                count += 1
            if max_examples is not None and count >= max_examples:
                break
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("inputs yielded no examples")
    return {n: a.div_(count) for n, a in zip(names, acc)}


def _check_keys(params: Mapping[str, Tensor], **others: Mapping[str, Tensor]) -> None:
    if not params:
        raise ValueError("params is empty")
    for name, other in others.items():
        for key, p in params.items():
            if key not in other:
                raise ValueError(f"key {key!r} is missing from {name}")
            if other[key].shape != p.shape:
                raise ValueError(f"{name}[{key!r}] has shape {tuple(other[key].shape)}, expected {tuple(p.shape)}")


def ewc_penalty(
    params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor], strength: float
) -> Tensor:
    """EWC penalty of Kirkpatrick et al. 2017 (Eq. 3): λ/2 · Σᵢ Fᵢ (θᵢ − θ₀ᵢ)², summed over the keys of ``params``."""
    _check_keys(params, anchor=anchor, fisher=fisher)
    total = sum((fisher[k].detach() * (p - anchor[k].detach()).square()).sum() for k, p in params.items())
    return 0.5 * strength * total


def l2_to_anchor(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Tensor:
    """Squared L2 distance to the pre-trained weights, Σ‖θ − θ₀‖² (L2-SP, Li et al. 2018; WiSE-FT Fig. 3)."""
    _check_keys(params, anchor=anchor)
    return sum((p - anchor[k].detach()).square().sum() for k, p in params.items())


def l1_to_anchor(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Tensor:
    """L1 distance to the pre-trained weights, Σ|θ − θ₀| (no reference implementation; standard formula)."""
    _check_keys(params, anchor=anchor)
    return sum((p - anchor[k].detach()).abs().sum() for k, p in params.items())
