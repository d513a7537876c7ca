"""LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): linear probe first, then end-to-end.

Stage 1 is exactly the ``linear_probe`` method (cached features, encoder frozen, head initialised from the reference
head) run through the shared trainer with ``lp_epochs`` / ``lp_lr`` / ``lp_warmup_steps`` and the run's other
settings; stage 2 fine-tunes everything end to end from that head. Kumar et al. fit the probe with L-BFGS logistic
regression; AdamW on cached features is used here so that stage 1 equals this pipeline's linear probe.
Stage 1 is recomputed on resume (it is deterministic and cheap: no image pass).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from robustft.methods.base import Method, TrainingHyperparameters, hyperparameter, shared_field_names
from robustft.methods.linear_probe import LinearProbe

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import TrainContext


@dataclass
class LPFTHyperparameters(TrainingHyperparameters):
    lp_epochs: int = hyperparameter(10, "Epochs of the linear-probe stage (on cached features).", minimum=1)
    lp_lr: float = hyperparameter(1e-3, "Learning rate of the linear-probe stage.", exclusiveMinimum=0)
    lp_warmup_steps: int = hyperparameter(0, "Warm-up steps of the linear-probe stage.", minimum=0)


class LPFT(Method):
    name = "lp_ft"
    hyperparameters = LPFTHyperparameters
    needs_features = True

    def __init__(self, hp: LPFTHyperparameters) -> None:
        super().__init__(hp)
        self.first_stage_head: dict[str, Tensor] | None = None
        self.first_stage_info: dict[str, Any] = {}

    def linear_probe_hyperparameters(self) -> TrainingHyperparameters:
        """Stage-1 settings: the run's shared settings with the ``lp_*`` values (no flips, no mid-epoch checkpoints)."""
        shared = {name: getattr(self.hp, name) for name in shared_field_names()}
        shared.update(epochs=self.hp.lp_epochs, lr=self.hp.lp_lr, warmup_steps=self.hp.lp_warmup_steps,
                      augment="none", checkpoint_every=0)
        return TrainingHyperparameters(**shared)

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        lp_hp = self.linear_probe_hyperparameters()
        result = ctx.fit_stage(model, LinearProbe(lp_hp), lp_hp)
        with torch.no_grad():
            model.head.weight.copy_(result.tensors["head.weight"])
            model.head.bias.copy_(result.tensors["head.bias"])
        self.first_stage_head = {k: v.clone() for k, v in result.tensors.items()}
        self.first_stage_info = {
            "lp_hyperparameters": dataclasses.asdict(lp_hp),
            "lp_best_epoch": result.best_epoch,
            "lp_val_accuracy": result.best_val_accuracy,
            "lp_steps": result.steps,
        }
        model.requires_grad_(True)
        return model

    def summary(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Any]:
        return dict(self.first_stage_info)
