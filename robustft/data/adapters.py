"""Dataset adapters: how a dataset lies on disk, its class list, expected sizes and evaluation projections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from robustft.data.manifest import DatasetError, assign_splits, finalize_manifest, scan_domain_folders


@dataclass(frozen=True)
class EvalProjection:
    """How an evaluation domain's labels relate to the model's classes.

    ``class_subset``: model-class indices the logits are restricted to before argmax (ImageNet-R/-A style);
    labels are then indices into that subset. ``groups``: for each evaluation class, the model classes whose
    maximum logit is its logit (ObjectNet style). Neither: logits are used as they are.
    """

    class_subset: tuple[int, ...] | None = None
    groups: tuple[tuple[int, ...], ...] | None = None

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Project (N, C_model) logits to (N, C_eval)."""
        if self.class_subset is not None:
            return logits[:, list(self.class_subset)]
        if self.groups is not None:
            return np.stack([logits[:, list(g)].max(axis=1) for g in self.groups], axis=1)
        return logits


@dataclass
class DatasetAdapter:
    """Base adapter for the generic layout ``root/<domain>/<class>/<image>``."""

    name: str = "imagefolder"
    #: domain -> expected number of image files (an incomplete download is refused with both counts)
    expected_counts: dict[str, int] = field(default_factory=dict)

    def scan(self, root: Path, domains: Sequence[str] | None) -> pd.DataFrame:
        """Rows with ``path`` (relative to root), ``class_name``, ``domain``, ``bytes`` (+ ``split`` if official)."""
        return scan_domain_folders(root, domains)

    def class_names(self, scanned: pd.DataFrame) -> list[str]:
        """The model's class order (labels are indices into it): sorted folder names by default."""
        return sorted(scanned["class_name"].unique())

    def prompt_names(self, class_names: Sequence[str]) -> list[str]:
        """Readable class names for text prompts."""
        return [c.replace("_", " ") for c in class_names]

    def has_official_splits(self) -> bool:
        return False

    def assign_splits(self, scanned: pd.DataFrame, val_fraction: float, seed: int, test_fraction: float = 0.0) -> pd.DataFrame:
        """Add ``split`` and ``rank``: a seeded, stratified split per (domain, class) (official splits override)."""
        return assign_splits(scanned, val_fraction, test_fraction, seed)

    def finalize(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Integer labels in :meth:`class_names` order, row ids, canonical column order."""
        return finalize_manifest(frame, self.class_names(frame))

    def border_crop(self, domain: str) -> int:
        """Pixels cut from every side before resizing (ObjectNet's border); 0 for most datasets."""
        return 0

    def projection(self, domain: str) -> EvalProjection:
        return EvalProjection()

    def check_counts(self, scanned: pd.DataFrame) -> None:
        """Refuse an incomplete download: name the domain, the count found and the count expected."""
        for domain, expected in self.expected_counts.items():
            if domain not in set(scanned["domain"]):
                continue
            found = int((scanned["domain"] == domain).sum())
            if found != expected:
                raise DatasetError(
                    f"dataset {self.name}, domain {domain}: found {found} images, expected {expected} "
                    f"(incomplete or modified copy)"
                )


PACS_COUNTS = {"photo": 1670, "art_painting": 2048, "cartoon": 2344, "sketch": 3929}
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
#: Public copy used when PACS is absent (Li et al., ICCV 2017); pinned to the commit checked here.
PACS_SOURCE = {"repository": "https://github.com/MachineLearning2020/Homework3-PACS", "commit": "33f7def", "folder": "PACS"}


@dataclass
class PacsAdapter(DatasetAdapter):
    """PACS (Li et al. 2017): 4 domains x 7 classes, layout ``PACS/<domain>/<class>/<file>``."""

    name: str = "pacs"
    expected_counts: dict[str, int] = field(default_factory=lambda: dict(PACS_COUNTS))

    def class_names(self, scanned: pd.DataFrame) -> list[str]:
        return list(PACS_CLASSES)
