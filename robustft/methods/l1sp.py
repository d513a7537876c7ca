"""L1-SP: cross-entropy + λ‖θ − θ⁰‖₁ toward the pre-trained weights, with separate encoder and head strengths.

No reference implementation was found (REFERENCES §1); this is the standard formula, the L1 counterpart of L2-SP
(the head is pulled toward the reference head it starts from). The defaults 1e-4 / 1e-5 are this pipeline's
choice, not a paper's. Weight decay defaults to 0, as for L2-SP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from robustft.fisher import l1_to_anchor
from robustft.methods.base import Method, TrainingHyperparameters, detached_copy, split_encoder_head

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.trainer import Batch, TrainContext


@dataclass
class L1SPHyperparameters(TrainingHyperparameters):
    weight_decay: float = 0.0
    encoder_strength: float = 1e-4
    head_strength: float = 1e-5


class L1SP(Method):
    name = "l1sp"
    hyperparameters = L1SPHyperparameters

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        model.requires_grad_(True)
        encoder, head = split_encoder_head(dict(model.named_parameters()))
        self.encoder_anchor, self.head_anchor = detached_copy(encoder), detached_copy(head)
        return model

    def loss(self, model: nn.Module, batch: "Batch", ctx: "TrainContext") -> dict[str, Tensor]:
        encoder, head = split_encoder_head(dict(model.named_parameters()))
        return {
            "ce": ctx.cross_entropy(model(batch.inputs), batch.labels),
            "l1sp_encoder": self.hp.encoder_strength * l1_to_anchor(encoder, self.encoder_anchor),
            "l1sp_head": self.hp.head_strength * l1_to_anchor(head, self.head_anchor),
        }
