"""The registry of fine-tuning methods: adding a method is one module in this package and one line in ``METHODS``."""

from __future__ import annotations

from robustft.methods.base import Method, TrainingHyperparameters, resolve_hyperparameters
from robustft.methods.ewc import EWC
from robustft.methods.flyp import FLYP
from robustft.methods.full_ft import FullFineTuning
from robustft.methods.kd import KnowledgeDistillation
from robustft.methods.l1sp import L1SP
from robustft.methods.l2sp import L2SP
from robustft.methods.linear_probe import LinearProbe
from robustft.methods.lora import LoRA
from robustft.methods.lp_ft import LPFT
from robustft.methods.saft import SAFT
from robustft.methods.zeroshot import ZeroShot

METHODS: dict[str, type[Method]] = {
    "zeroshot": ZeroShot,
    "linear_probe": LinearProbe,
    "full_ft": FullFineTuning,
    "lp_ft": LPFT,
    "l2sp": L2SP,
    "l1sp": L1SP,
    "kd": KnowledgeDistillation,
    "ewc": EWC,
    "lora": LoRA,
    "saft": SAFT,
    "flyp": FLYP,
}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``; ``ValueError`` naming the allowed names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "TrainingHyperparameters", "get_method", "resolve_hyperparameters"]
