"""Linear probe: only the head trains, on cached features of the frozen pre-trained encoder (no image pass).

As WiSE-FT's linear classifier with ``--freeze-encoder`` (``src/models/finetune.py``): cross-entropy, AdamW and the
shared schedule on cached features, the head initialised from the reference head. The run stores the head only
(``head.safetensors``); the encoder of the fine-tuned state is the reference encoder, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from torch import Tensor, nn

from robustft.methods.base import Method, TrainingHyperparameters, load_checkpoint_file

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import Batch, TrainContext

HEAD_KEYS = ("head.weight", "head.bias")


class LinearProbe(Method):
    name = "linear_probe"
    hyperparameters = TrainingHyperparameters
    needs_images = False
    needs_features = True
    checkpoint_file = "head.safetensors"

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        return model

    def loss(self, model: nn.Module, batch: "Batch", ctx: "TrainContext") -> dict[str, Tensor]:
        return {"ce": ctx.cross_entropy(model.head(batch.inputs), batch.labels)}

    def checkpoint_tensors(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        return {"head.weight": model.head.weight.detach().clone(), "head.bias": model.head.bias.detach().clone()}

    @classmethod
    def load_finetuned_state(cls, reference_state: Mapping[str, Tensor], run_dir: str | Path) -> dict[str, Tensor]:
        head = load_checkpoint_file(Path(run_dir) / cls.checkpoint_file)
        if set(head) != set(HEAD_KEYS):
            raise ValueError(f"{run_dir}/{cls.checkpoint_file}: expected keys {HEAD_KEYS}, got {sorted(head)}")
        state = {k: v.clone() for k, v in reference_state.items()}
        state.update(head)
        return state
