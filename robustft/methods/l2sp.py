"""L2-SP (Li, Grandvalet & Davoine 2018, arXiv 1802.01483): cross-entropy + a pull toward the pre-trained weights.

Ω = α/2·‖w_S − w_S⁰‖² on the encoder (α = ``encoder_strength``, paper default 0.1) and β/2·‖w_S̄ − w̄⁰‖² on the
head (β = ``head_strength``, paper default 0.01). The paper's new head is randomly initialised and decayed toward
zero; here the head starts from the reference head (zero-shot or linear probe), so it is pulled toward that
instead. Every parameter counts (weights, biases, norm affines). Weight decay defaults to 0 because L2-SP replaces
it (decay toward zero would fight the pull toward w⁰).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from robustft.fisher import l2_to_anchor
from robustft.methods.base import Method, TrainingHyperparameters, detached_copy, hyperparameter, split_encoder_head

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import TrainContext


@dataclass
class L2SPHyperparameters(TrainingHyperparameters):
    weight_decay: float = hyperparameter(
        0.0, "AdamW weight decay (L2-SP: none, the pull toward the start replaces it).", minimum=0)
    encoder_strength: float = hyperparameter(0.1, "alpha of L2-SP: alpha/2 ||w - w0||^2 on the encoder.", minimum=0)
    head_strength: float = hyperparameter(0.01, "beta of L2-SP: beta/2 ||W - W0||^2 on the head.", minimum=0)


class L2SP(Method):
    name = "l2sp"
    hyperparameters = L2SPHyperparameters

    def penalty(self, params: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
        """½‖θ − θ⁰‖² (the ½ of L2-SP's α/2 and β/2)."""
        return 0.5 * l2_to_anchor(params, anchor)

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        model.requires_grad_(True)
        encoder, head = split_encoder_head(dict(model.named_parameters()))
        self.encoder_anchor, self.head_anchor = detached_copy(encoder), detached_copy(head)
        return model

    def step_penalties(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        """The pulls toward the start, once per optimizer step (the cross-entropy is the default :meth:`loss`)."""
        encoder, head = split_encoder_head(dict(model.named_parameters()))
        return {
            f"{self.name}_encoder": self.hp.encoder_strength * self.penalty(encoder, self.encoder_anchor),
            f"{self.name}_head": self.hp.head_strength * self.penalty(head, self.head_anchor),
        }
