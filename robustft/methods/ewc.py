"""Elastic weight consolidation toward the pre-trained model (Kirkpatrick et al. 2017, Eq. 3).

Loss = CE + λ/2·Σᵢ Fᵢ(θᵢ − θ₀ᵢ)² over every parameter (encoder and head), with F the diagonal Fisher of the
pre-trained model (reference head included) on the ID training data, labels sampled from the model's own softmax,
batch size 1 (:func:`robustft.fisher.diagonal_fisher`, as wise-ft ``fisher.py``). EWC has no portable default λ:
``strength`` = 100 is this pipeline's choice. The Fisher uses at most ``fisher_examples`` training images in a seeded
random order (one backward pass each); None uses them all. Weight decay defaults to 0 (it would pull toward zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from robustft.fisher import diagonal_fisher, ewc_penalty
from robustft.methods.base import Method, TrainingHyperparameters, detached_copy, hyperparameter

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import TrainContext


@dataclass
class EWCHyperparameters(TrainingHyperparameters):
    weight_decay: float = hyperparameter(
        0.0, "AdamW weight decay (EWC: none, the Fisher-weighted pull toward the start replaces it).", minimum=0)
    strength: float = hyperparameter(100.0, "lambda in lambda/2 sum F (w - w0)^2.", minimum=0)
    fisher_examples: int | None = hyperparameter(
        1024, "ID training images used to estimate the diagonal Fisher (null = all).", minimum=1)


class EWC(Method):
    name = "ewc"
    hyperparameters = EWCHyperparameters

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        model.requires_grad_(True)
        params = dict(model.named_parameters())
        self.anchor = detached_copy(params)
        group = ctx.group
        self.fisher_count = min(len(ctx.train), self.hp.fisher_examples or len(ctx.train))
        self.fisher = diagonal_fisher(
            model,
            ctx.batches(images=True, shuffle="fisher", limit=self.hp.fisher_examples, shard=True),
            params=params,
            # each rank draws the labels of its own rows from a stream of its own
            generator=ctx.generator("fisher-labels", *([group.rank] if group.parallel else [])),
            max_examples=self.hp.fisher_examples,
        )
        if group.parallel:  # the mean over every rank's examples: sum the ranks' sums
            local = len(group.shard(torch.arange(self.fisher_count)))
            sums = [f.mul_(local) for f in self.fisher.values()]
            group.all_reduce_(sums)
            for f in sums:
                f.div_(self.fisher_count)
        return model

    def penalty(self, model: nn.Module) -> Tensor:
        return ewc_penalty(dict(model.named_parameters()), self.anchor, self.fisher, self.hp.strength)

    def step_penalties(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        """The Fisher-weighted pull, once per optimizer step (the cross-entropy is the default :meth:`loss`)."""
        return {"ewc": self.penalty(model)}

    def summary(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Any]:
        return {"fisher_examples_used": self.fisher_count}
