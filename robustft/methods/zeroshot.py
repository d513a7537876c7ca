"""The reference model itself (zero-shot head for CLIP backbones, linear-probe head otherwise): nothing is trained.

The run directory still records it (``run.json`` with zero trainable parameters, an empty ``train_log.parquet``,
and the reference model's ID-validation accuracy when cached validation features are given), so that every method
has the same outputs; ``load_finetuned_state`` returns the reference state unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import Tensor

from robustft.methods.base import Method, TrainingHyperparameters


class ZeroShot(Method):
    name = "zeroshot"
    hyperparameters = TrainingHyperparameters
    needs_images = False  # validation accuracy from cached features; no image pass
    trains = False
    checkpoint_file = None

    @classmethod
    def load_finetuned_state(cls, reference_state: Mapping[str, Tensor], run_dir: str | Path) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in reference_state.items()}
