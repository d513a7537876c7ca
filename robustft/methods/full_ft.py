"""End-to-end fine-tuning: encoder and head trained with cross-entropy, the head initialised from the reference head.

As WiSE-FT's end-to-end fine-tuning (``mlfoundations/wise-ft`` ``src/models/finetune.py`` without
``--freeze-encoder``; Wortsman et al. 2022, App. D.2): the shared trainer defaults are its hyperparameters.
"""

from __future__ import annotations

from robustft.methods.base import Method, TrainingHyperparameters


class FullFineTuning(Method):
    """Every parameter trains; the run stores the full ``ImageClassifier`` state (``model.safetensors``)."""

    name = "full_ft"
    hyperparameters = TrainingHyperparameters
