"""SAFT, sparse adaptation for fine-tuning (Nam et al. 2024, arXiv 2407.03036): update only ~0.1% of the weights.

Selection as the unofficial code (``ayush939/FineTuneCLIP`` ``saft.py``): gradients of the cross-entropy are summed
over the whole training set (one pass, eval mode, fixed order), divided by N, and their magnitude |ḡ| scored; the
global top ``fraction`` (default 0.001) of all parameters becomes a boolean mask m. During training the gradients
are masked and, after each optimizer step, θ ← m⊙θ + ¬m⊙θ₀ (as the unofficial code) so unselected weights stay
bit-identical (AdamW's weight decay would otherwise move them). BatchNorm running statistics are frozen, so the
buffers stay pre-trained too. The unofficial code uses lr 5e-6, wd 0.1, batch 512, 100 epochs; those are left to the
config. The run stores a sparse update, ``<param>.indices`` (flat int64 positions) and ``<param>.values`` (the
fine-tuned values there: assigning them rebuilds the weights exactly, which adding a float delta would not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.methods.base import Method, TrainingHyperparameters, hyperparameter, load_checkpoint_file

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.trainer import TrainContext


@dataclass
class SAFTHyperparameters(TrainingHyperparameters):
    fraction: float = hyperparameter(
        0.001, "Fraction of parameters updated, by top gradient magnitude (SAFT paper 0.1%).",
        exclusiveMinimum=0, maximum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction: expected a value in (0, 1], got {self.fraction}")


def top_fraction_masks(scores: Mapping[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """Boolean masks selecting the global top ``fraction`` of all entries of ``scores`` (at least one entry)."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float() for n in names])
    k = max(1, round(fraction * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = chosen[start : start + size].view_as(scores[n])
        start += size
    return masks


class SAFT(Method):
    name = "saft"
    hyperparameters = SAFTHyperparameters
    checkpoint_file = "sparse_update.safetensors"
    freeze_norm_statistics = True

    def gradient_scores(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        """|Σ_batches ∇ CE_sum / N| per parameter (pre-trained model in eval mode)."""
        params = dict(model.named_parameters())
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = model.training
        model.eval()
        try:
            for batch in ctx.batches(images=True, batch_size=ctx.hp.batch_size):
                with ctx.autocast():
                    logits = model(batch.inputs)
                loss = F.cross_entropy(logits.float(), batch.labels, reduction="sum")
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        sums[n].add_(g)
        finally:
            model.train(was_training)
        return {n: (s / len(ctx.train)).abs() for n, s in sums.items()}

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        model.requires_grad_(True)
        masks = top_fraction_masks(self.gradient_scores(model, ctx), self.hp.fraction)
        self.masks = {n: m for n, m in masks.items() if bool(m.any())}
        self.anchor: dict[str, Tensor] = {}
        self.total = sum(m.numel() for m in masks.values())
        for name, p in model.named_parameters():
            if name in self.masks:
                mask = self.masks[name]
                self.anchor[name] = p.detach().clone()
                p.register_hook(lambda grad, mask=mask: grad.masked_fill(~mask, 0))
            else:
                p.requires_grad_(False)
        return model

    def trainable_count(self, model: nn.Module) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @torch.no_grad()
    def after_step(self, model: nn.Module, ctx: "TrainContext") -> None:
        for name, p in model.named_parameters():
            if name in self.masks:
                p.copy_(torch.where(self.masks[name], p, self.anchor[name]))

    def checkpoint_tensors(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        params = dict(model.named_parameters())
        out = {}
        for name, mask in self.masks.items():
            indices = mask.flatten().nonzero().flatten()
            out[f"{name}.indices"] = indices.to(torch.int64)
            out[f"{name}.values"] = params[name].detach().flatten()[indices].clone()
        return out

    def summary(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Any]:
        selected = self.trainable_count(model)
        return {"selected_parameters": selected, "selected_fraction": selected / self.total,
                "tensors_with_selection": len(self.masks)}

    @classmethod
    def load_finetuned_state(cls, reference_state: Mapping[str, Tensor], run_dir: str | Path) -> dict[str, Tensor]:
        path = Path(run_dir) / cls.checkpoint_file
        sparse = load_checkpoint_file(path)
        state = {k: v.clone() for k, v in reference_state.items()}
        for key in sparse:
            if not key.endswith(".indices"):
                continue
            name = key[: -len(".indices")]
            if name not in state:
                raise ValueError(f"{path}: {name!r} is not a key of the reference model")
            state[name].view(-1)[sparse[key]] = sparse[f"{name}.values"].to(state[name].dtype)
        return state
