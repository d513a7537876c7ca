"""Backbone registry: the config's ``backbone.name`` picks one entry; the rest of ``backbone`` are its arguments."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from robustft.backbones.base import Backbone, Preprocessing, WeightsError

#: name -> "module:class"; imported lazily so that parsing the Snakefile never imports torch models.
BACKBONES: dict[str, str] = {
    "efficientnet_lite0": "robustft.backbones.efficientnet:EfficientNetLite0",
    "open_clip": "robustft.backbones.open_clip_backbone:OpenClipBackbone",
}


def build_backbone(spec: dict[str, Any]) -> Backbone:
    """Instantiate the backbone named by ``spec['name']`` with the remaining keys as arguments."""
    name = spec["name"]
    if name not in BACKBONES:
        raise ValueError(f"backbone.name: unknown backbone {name!r}; allowed: {sorted(BACKBONES)}")
    module_name, class_name = BACKBONES[name].split(":")
    cls = getattr(import_module(module_name), class_name)
    return cls(**{k: v for k, v in spec.items() if k != "name"})


__all__ = ["BACKBONES", "Backbone", "Preprocessing", "WeightsError", "build_backbone"]
