"""L1-SP: cross-entropy + λ‖θ − θ⁰‖₁ toward the pre-trained weights, with separate encoder and head strengths.

No reference implementation was found (REFERENCES §1); this is the standard formula, the L1 counterpart of L2-SP
(the head is pulled toward the reference head it starts from). The defaults 1e-4 / 1e-5 are this pipeline's
choice, not a paper's. Weight decay defaults to 0, as for L2-SP.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from robustft.fisher import l1_to_anchor
from robustft.methods.base import TrainingHyperparameters, hyperparameter
from robustft.methods.l2sp import L2SP


@dataclass
class L1SPHyperparameters(TrainingHyperparameters):
    weight_decay: float = hyperparameter(
        0.0, "AdamW weight decay (L1-SP: none, the pull toward the start replaces it).", minimum=0)
    encoder_strength: float = hyperparameter(1e-4, "lambda ||w - w0||_1 on the encoder.", minimum=0)
    head_strength: float = hyperparameter(1e-5, "lambda ||W - W0||_1 on the head.", minimum=0)


class L1SP(L2SP):
    """L2-SP's anchoring with an L1 distance (loss terms ``l1sp_encoder`` and ``l1sp_head``)."""

    name = "l1sp"
    hyperparameters = L1SPHyperparameters

    def penalty(self, params: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
        """‖θ − θ⁰‖₁."""
        return l1_to_anchor(params, anchor)
