"""The dataset registry, as data: ``dataset.name`` -> ``"module:Class"`` of its adapter, imported on first use.

No adapter module imports another to register it: the ImageNet and DomainNet adapters build on
:mod:`robustft.data.adapters`, and only this table names them.
"""

from __future__ import annotations

from importlib import import_module

from robustft.data.adapters import DatasetAdapter

DATASETS: dict[str, str] = {
    "imagefolder": "robustft.data.adapters:DatasetAdapter",
    "pacs": "robustft.data.adapters:PacsAdapter",
    "imagenet": "robustft.data.imagenet:ImageNetAdapter",
    "domainnet": "robustft.data.domainnet:DomainNetAdapter",
}


def get_adapter(name: str) -> DatasetAdapter:
    """A new adapter of the dataset registered under ``name``."""
    if name not in DATASETS:
        raise ValueError(f"dataset.name: unknown dataset {name!r}; allowed: {sorted(DATASETS)}")
    module_name, class_name = DATASETS[name].split(":")
    return getattr(import_module(module_name), class_name)()


__all__ = ["DATASETS", "get_adapter"]
