"""Knowledge distillation to the pre-trained model (WiSE-FT App. C.3.3, Eq. 3).

Loss = (1 − a)·CE(f(x; θ), y) + a·CE(f(x; θ), softmax(f(x; θ₀)/T))·T², teacher θ₀ = the reference model (pre-trained
encoder + reference head) in eval mode. WiSE-FT sweeps a and uses T = 1; a = ``kd_weight`` defaults to 0.5 and
T = ``temperature`` to 1 (the T² factor of Hinton et al. 2015 is then 1). Label smoothing applies to the label term.
The teacher's logits are computed per batch, so memory never holds a table over the training set (ImageNet's would
be 1.28 M x 1000 floats, 5 GB): without augmentation from the cached features of the batch's rows, which the cache
holds for this very pre-trained encoder (the reference head on features: no image pass for the teacher); with
``augment: flip``, or without cached features, by running the teacher on the (flipped) batch images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.methods.base import Method, TrainingHyperparameters, hyperparameter

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import Batch, TrainContext


@dataclass
class KDHyperparameters(TrainingHyperparameters):
    kd_weight: float = hyperparameter(
        0.5, "a in (1-a) CE(labels) + a CE(student, teacher) (WiSE-FT Eq. 3).", minimum=0, maximum=1)
    temperature: float = hyperparameter(1.0, "Softmax temperature of the teacher targets.", exclusiveMinimum=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight: expected a value in [0, 1], got {self.kd_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected a positive value, got {self.temperature}")


class KnowledgeDistillation(Method):
    name = "kd"
    hyperparameters = KDHyperparameters

    def teacher_on_features(self, ctx: "TrainContext") -> bool:
        """Whether the teacher reads the batch rows' cached features (no augmentation, features given)."""
        return ctx.hp.augment == "none" and ctx.train.features is not None

    def batch_columns(self, ctx: "TrainContext") -> tuple[str, ...]:
        return ("pixels", "features") if self.teacher_on_features(ctx) else ("pixels",)

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        model.requires_grad_(True)
        # the teacher: the reference head alone on cached features, else the whole reference model (eval, frozen)
        self.on_features = self.teacher_on_features(ctx)
        self.teacher = copy.deepcopy(model.head if self.on_features else model).eval().requires_grad_(False)
        return model

    @torch.no_grad()
    def teacher_logits(self, batch: "Batch") -> Tensor:
        return self.teacher(batch.features if self.on_features else batch.inputs).float()

    def loss(self, model: nn.Module, batch: "Batch", ctx: "TrainContext") -> dict[str, Tensor]:
        logits = model(batch.inputs)
        t, a = self.hp.temperature, self.hp.kd_weight
        soft_targets = F.softmax(self.teacher_logits(batch) / t, dim=-1)
        distill = F.cross_entropy(logits.float() / t, soft_targets) * (t * t)
        return {"ce": (1.0 - a) * ctx.cross_entropy(logits, batch.labels), "kd": a * distill}
