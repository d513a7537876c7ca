"""Knowledge distillation to the pre-trained model (WiSE-FT App. C.3.3, Eq. 3).

Loss = (1 − a)·CE(f(x; θ), y) + a·CE(f(x; θ), softmax(f(x; θ₀)/T))·T², teacher θ₀ = the reference model (pre-trained
encoder + reference head) in eval mode. WiSE-FT sweeps a and uses T = 1; a = ``kd_weight`` defaults to 0.5 and
T = ``temperature`` to 1 (the T² factor of Hinton et al. 2015 is then 1). Label smoothing applies to the label term.
Without augmentation the teacher's inputs never change, so its logits are computed once before training and looked
up by example index: from the cached features of the pre-trained encoder when the run has them (reference head on
features, no image pass at all), else by one pass over the training images. With ``augment: flip`` the teacher
runs on each (flipped) batch.
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
    from robustft.training.trainer import Batch, TrainContext


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

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        model.requires_grad_(True)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.teacher: nn.Module | None = None
        self.teacher_logits: Tensor | None = None
        if ctx.hp.augment == "none":
            from_features = ctx.train.features is not None  # the cache holds this very encoder's outputs
            chunks = []
            with torch.no_grad():
                for batch in ctx.batches(images=not from_features):
                    with ctx.autocast():
                        chunks.append((teacher.head if from_features else teacher)(batch.inputs).float())
            self.teacher_logits = torch.cat(chunks)
        else:
            self.teacher = teacher
        return model

    def loss(self, model: nn.Module, batch: "Batch", ctx: "TrainContext") -> dict[str, Tensor]:
        logits = model(batch.inputs)
        if self.teacher_logits is not None:
            teacher_logits = self.teacher_logits[batch.indices.to(self.teacher_logits.device)]
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(batch.inputs).float()
        t, a = self.hp.temperature, self.hp.kd_weight
        soft_targets = F.softmax(teacher_logits.float() / t, dim=-1)
        distill = F.cross_entropy(logits.float() / t, soft_targets) * (t * t)
        return {"ce": (1.0 - a) * ctx.cross_entropy(logits, batch.labels), "kd": a * distill}
