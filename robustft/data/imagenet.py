"""ImageNet and its five distribution shifts (V2, Sketch, R, A, ObjectNet) as one dataset with six domains.

On-disk layout. ``dataset.root`` is a parent folder holding one sub-folder per domain; for each domain the first
of the listed folder names that exists is used (the alternatives are the names the usual downloads unpack to)::

    <root>/imagenet/train/<wnid>/*.JPEG          ILSVRC-2012 train, 1000 wnid folders, 1,281,167 images
    <root>/imagenet/val/<wnid>/*.JPEG            ILSVRC-2012 val sorted into wnid folders, 50,000 images
    <root>/imagenet_v2/<0..999>/*.jpeg           ImageNet-V2 matched-frequency, folders named by class index,
        (or imagenetv2-matched-frequency-format-val/, ImageNetV2-matched-frequency/)        10,000 images
    <root>/imagenet_sketch/<wnid>/*.JPEG         ImageNet-Sketch, 1000 wnid folders, 50,889 images
        (or sketch/, imagenet-sketch/sketch/)
    <root>/imagenet_r/<wnid>/*.jpg               ImageNet-R, 200 wnid folders, 30,000 images (or imagenet-r/)
    <root>/imagenet_a/<wnid>/*.jpg               ImageNet-A, 200 wnid folders, 7,500 images (or imagenet-a/)
    <root>/objectnet/images/<folder>/*.png       ObjectNet 1.0, 313 folders of which the 113 that map to ImageNet
        (or objectnet-1.0/images/, objectnet/)   classes are kept: 18,574 images

Splits: the ``train`` folder is the ``train`` split, from which :meth:`ImageNetAdapter.assign_splits` carves a
seeded, class-stratified validation split (``val_fraction``; 0.02 in the presets: the held-out 2 % of ImageNet
train that model-soups calls ImageNet2p, same fraction but not the same images); the ``val`` folder is the
``test`` split. Every shift domain is test-only.

Labels: the model's classes are the 1000 ImageNet classes in sorted-wnid order, prompted with CLIP's readable names.
ImageNet, V2 and Sketch are labelled 1000-way. ImageNet-R and ImageNet-A rows are labelled 0..199, their position
in the 200-class sublist of wise-ft, and evaluated with ``EvalProjection(class_subset=sublist)`` (argmax over those
200 logits). ObjectNet rows are labelled 0..112 (sorted folder names) and evaluated with
``EvalProjection(groups=...)`` (an ObjectNet class's logit is the max over its ImageNet classes); its images lose a
2 px border before resizing (:meth:`ImageNetAdapter.border_crop`), as in wise-ft ``objectnet.py``.
:meth:`ImageNetAdapter.finalize` assigns these per-domain labels (``finalize_manifest`` with one class list per
domain).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from robustft.data.adapters import DatasetAdapter, EvalProjection
from robustft.data.classlists import (
    IMAGENET_A_SUBLIST,
    IMAGENET_R_SUBLIST,
    imagenet_openai_classnames,
    imagenet_wnids,
    objectnet_mapping,
)
from robustft.data.manifest import IMAGE_SUFFIXES, DatasetError, assign_splits, file_bytes, finalize_manifest

IMAGENET_DOMAINS = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_r", "imagenet_a", "objectnet")
SHIFT_DOMAINS = IMAGENET_DOMAINS[1:]

#: domain -> folder names tried under the root, first existing wins (relative paths may have several parts).
DOMAIN_FOLDERS: dict[str, tuple[str, ...]] = {
    "imagenet": ("imagenet",),
    "imagenet_v2": (
        "imagenet_v2",
        "imagenetv2-matched-frequency-format-val",
        "ImageNetV2-matched-frequency",
    ),
    "imagenet_sketch": ("imagenet_sketch", "sketch", "imagenet-sketch/sketch"),
    "imagenet_r": ("imagenet_r", "imagenet-r"),
    "imagenet_a": ("imagenet_a", "imagenet-a"),
    "objectnet": ("objectnet/images", "objectnet-1.0/images", "objectnet", "objectnet-1.0"),
}

#: Expected image counts: ``domain`` (all its rows) or ``domain/split`` (the rows of one official split).
IMAGENET_COUNTS: dict[str, int] = {
    "imagenet/train": 1_281_167,
    "imagenet/test": 50_000,
    "imagenet_v2": 10_000,
    "imagenet_sketch": 50_889,
    "imagenet_r": 30_000,
    "imagenet_a": 7_500,
    "objectnet": 18_574,  # the 113 folders mapped to ImageNet classes (313 folders, 50,273 images in all)
}

#: ImageNet2p-style held-out share of ImageNet train used for model selection (model-soups).
IMAGENET_VAL_FRACTION = 0.02


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers for adapters whose data come with official train/test splits.


def split_official(frame: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Turn the official ``split`` column (``train``/``test``) into train/val/test with a seeded ``rank``.

    A class-stratified share ``val_fraction`` of each (domain, class)'s official train rows becomes ``val``
    (the rest stays ``train``); official test rows stay ``test``. ``rank`` is each row's position within its
    (domain, class, split) after the seeded shuffle of :func:`robustft.data.manifest.assign_splits`, so capping a
    split per class takes nested, reproducible subsets (k-shot = ``rank < k`` of train).
    """
    if "split" not in frame.columns:
        raise ValueError("split_official needs the official 'split' column of the scan")
    unknown = sorted(set(frame["split"]) - {"train", "test"})
    if unknown:
        raise ValueError(f"official splits must be 'train' or 'test', found {unknown}")
    parts = []
    train = frame[frame["split"] == "train"].drop(columns=["split"])
    if len(train):
        parts.append(assign_splits(train, val_fraction, 0.0, seed))
    test = frame[frame["split"] == "test"].drop(columns=["split"])
    if len(test):
        test = assign_splits(test, 0.0, 0.0, seed)
        test["split"] = "test"
        parts.append(test)
    if not parts:
        raise DatasetError("the scan holds no images")
    return pd.concat(parts, ignore_index=True)


def finalize_per_domain(frame: pd.DataFrame, label_names: Callable[[str], Sequence[str]]) -> pd.DataFrame:
    """``finalize_manifest`` with each domain's own class list (its label space), then one global ``row_id``."""
    parts = [finalize_manifest(group, label_names(domain)) for domain, group in frame.groupby("domain", sort=True)]
    if not parts:
        raise DatasetError("the scan holds no images")
    out = pd.concat(parts, ignore_index=True)
    out = out.sort_values(["domain", "class_name", "split", "rank", "path"], kind="stable").reset_index(drop=True)
    out["row_id"] = np.arange(len(out), dtype=np.int64)
    return out


def _files_under(folder: str) -> list[tuple[str, int]]:
    """(path, bytes) of every visible file below ``folder``, sorted by path; bytes -1 where it cannot be read
    (a dangling symlink, a vanished file: :func:`~robustft.data.manifest.file_bytes`)."""
    found: list[tuple[str, int]] = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            found.append((path, file_bytes(path)))
    return found


def scan_class_folders(
    root: Path, base: Path, domain: str, split: str, class_of: Callable[[str], str | None]
) -> list[dict]:
    """Rows of ``base/<folder>/**/<file>``: ``class_of(folder)`` gives the class name (None = skip the folder).

    Paths are relative to ``root``. An empty kept class folder, or a folder that holds no class folder at all,
    is refused by name.
    """
    if not base.is_dir():
        raise DatasetError(f"folder {base} not found (domain {domain})")
    folders = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DatasetError(f"folder {base} holds no class folders (domain {domain})")
    rows: list[dict] = []
    root_str = str(root)
    for folder in folders:
        class_name = class_of(folder)
        if class_name is None:
            continue
        files = _files_under(str(base / folder))
        if not files:
            raise DatasetError(f"class folder {base / folder} is empty")
        for path, size in files:
            rows.append(
                {
                    "path": os.path.relpath(path, root_str),
                    "class_name": class_name,
                    "domain": domain,
                    "split": split,
                    "bytes": size,
                    "is_image_suffix": os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES,
                }
            )
    return rows


def check_expected_counts(name: str, expected_counts: dict[str, int], scanned: pd.DataFrame) -> None:
    """Compare counts keyed ``domain`` or ``domain/split`` with the scan (domains not scanned are not checked)."""
    present = set(scanned["domain"])
    for key, expected in expected_counts.items():
        domain, _, split = key.partition("/")
        if domain not in present:
            continue
        mask = scanned["domain"] == domain
        where = f"domain {domain}"
        if split:
            mask &= scanned["split"] == split
            where += f" ({split} split)"
        found = int(mask.sum())
        if found != expected:
            raise DatasetError(
                f"dataset {name}, {where}: found {found} images, expected {expected} (incomplete or modified copy)"
            )


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageNetAdapter(DatasetAdapter):
    """ImageNet-1k plus V2, Sketch, R, A and ObjectNet (see the module docstring for the layout on disk)."""

    name: str = "imagenet"
    expected_counts: dict[str, int] = field(default_factory=lambda: dict(IMAGENET_COUNTS))

    # -- on disk ---------------------------------------------------------------------------------------------

    @staticmethod
    def domain_folder(root: Path, domain: str) -> Path | None:
        """The folder of ``domain`` under ``root`` (first existing candidate), or None."""
        for candidate in DOMAIN_FOLDERS[domain]:
            path = Path(root) / candidate
            if path.is_dir():
                return path
        return None

    def scan(self, root: Path, domains: Sequence[str] | None) -> pd.DataFrame:
        """Rows (path relative to root, class_name, domain, split = official train/test, bytes, is_image_suffix).

        ``class_name`` is the wnid for the ImageNet-class domains (V2's index folders are translated) and the
        ObjectNet folder name for ObjectNet. ``domains=None`` scans every domain present under ``root``.
        """
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset root not found: {root}")
        if domains:
            unknown = [d for d in domains if d not in IMAGENET_DOMAINS]
            if unknown:
                raise DatasetError(f"unknown ImageNet domain {unknown[0]!r}; allowed: {list(IMAGENET_DOMAINS)}")
            wanted = list(dict.fromkeys(domains))
        else:
            wanted = [d for d in IMAGENET_DOMAINS if self.domain_folder(root, d) is not None]
            if not wanted:
                raise DatasetError(f"dataset root {root} holds none of the folders {DOMAIN_FOLDERS}")
        rows: list[dict] = []
        for domain in wanted:
            folder = self.domain_folder(root, domain)
            if folder is None:
                tried = ", ".join(str(root / c) for c in DOMAIN_FOLDERS[domain])
                raise DatasetError(f"domain {domain}: none of the folders {tried} exists")
            rows.extend(self._scan_domain(root, folder, domain))
        return pd.DataFrame(rows, columns=["path", "class_name", "domain", "split", "bytes", "is_image_suffix"])

    def _scan_domain(self, root: Path, folder: Path, domain: str) -> list[dict]:
        wnids = imagenet_wnids()
        if domain == "imagenet":
            known = set(wnids)
            rows = scan_class_folders(root, folder / "train", domain, "train", _checked(known, folder / "train"))
            return rows + scan_class_folders(root, folder / "val", domain, "test", _checked(known, folder / "val"))
        if domain == "imagenet_v2":
            return scan_class_folders(root, folder, domain, "test", _v2_class(wnids, folder))
        if domain == "imagenet_sketch":
            return scan_class_folders(root, folder, domain, "test", _checked(set(wnids), folder))
        if domain in ("imagenet_r", "imagenet_a"):
            return scan_class_folders(root, folder, domain, "test", _checked(set(self.label_names(domain)), folder))
        if domain == "objectnet":
            mapped = {entry["folder"] for entry in objectnet_mapping()}
            return scan_class_folders(root, folder, domain, "test", lambda f: f if f in mapped else None)
        raise DatasetError(f"unknown ImageNet domain {domain!r}")

    def check_counts(self, scanned: pd.DataFrame) -> None:
        """Refuse an incomplete download, naming the domain (and official split), the count found and expected."""
        check_expected_counts(self.name, self.expected_counts, scanned)

    # -- classes and labels ----------------------------------------------------------------------------------

    def class_names(self, scanned: pd.DataFrame | None = None) -> list[str]:
        """The model's 1000 classes: ImageNet wnids in sorted (label) order, whatever subset was scanned."""
        return list(imagenet_wnids())

    def prompt_names(self, class_names: Sequence[str]) -> list[str]:
        """CLIP's readable names (wise-ft ``openai_classnames``) for the given wnids."""
        readable = dict(zip(imagenet_wnids(), imagenet_openai_classnames()))
        missing = [c for c in class_names if c not in readable]
        if missing:
            raise DatasetError(f"not ImageNet wnids: {missing[:5]}")
        return [readable[c] for c in class_names]

    def label_names(self, domain: str) -> list[str]:
        """The label space of ``domain``: its ``class_name`` values in label order.

        1000 wnids (imagenet, V2, Sketch); the 200 sublist wnids (R, A); the 113 ObjectNet folders (ObjectNet).
        """
        wnids = imagenet_wnids()
        if domain in ("imagenet", "imagenet_v2", "imagenet_sketch"):
            return list(wnids)
        if domain == "imagenet_r":
            return [wnids[i] for i in IMAGENET_R_SUBLIST]
        if domain == "imagenet_a":
            return [wnids[i] for i in IMAGENET_A_SUBLIST]
        if domain == "objectnet":
            return [entry["folder"] for entry in objectnet_mapping()]
        raise DatasetError(f"unknown ImageNet domain {domain!r}; allowed: {list(IMAGENET_DOMAINS)}")

    def eval_prompt_names(self, domain: str) -> list[str]:
        """Readable names of ``domain``'s label space (for reports): CLIP names, ObjectNet's own names."""
        if domain == "objectnet":
            return [entry["name"] for entry in objectnet_mapping()]
        return self.prompt_names(self.label_names(domain))

    def projection(self, domain: str) -> EvalProjection:
        """1000-way logits -> the domain's label space (wise-ft ``project_logits``)."""
        if domain == "imagenet_r":
            return EvalProjection(class_subset=tuple(IMAGENET_R_SUBLIST))
        if domain == "imagenet_a":
            return EvalProjection(class_subset=tuple(IMAGENET_A_SUBLIST))
        if domain == "objectnet":
            return EvalProjection(groups=tuple(tuple(e["imagenet_indices"]) for e in objectnet_mapping()))
        if domain in IMAGENET_DOMAINS:
            return EvalProjection()
        raise DatasetError(f"unknown ImageNet domain {domain!r}; allowed: {list(IMAGENET_DOMAINS)}")

    def border_crop(self, domain: str) -> int:
        """Pixels cut from every side of a decoded image before resizing: 2 for ObjectNet (its red border)."""
        return 2 if domain == "objectnet" else 0

    # -- splits and the manifest -----------------------------------------------------------------------------

    def has_official_splits(self) -> bool:
        return True

    def assign_splits(
        self, scanned: pd.DataFrame, val_fraction: float = IMAGENET_VAL_FRACTION, seed: int = 0, test_fraction: float = 0.0
    ) -> pd.DataFrame:
        """Official train -> train + seeded val (``val_fraction``); official val folder and shifts -> test."""
        return split_official(scanned, val_fraction, seed)

    def finalize(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Labels per domain (see :meth:`label_names`), row ids, canonical columns."""
        return finalize_per_domain(frame, self.label_names)


def _checked(known: set[str], folder: Path) -> Callable[[str], str]:
    def class_of(name: str) -> str:
        if name not in known:
            raise DatasetError(f"unexpected class folder {folder / name}: not one of this domain's wnids")
        return name

    return class_of


def _v2_class(wnids: Sequence[str], folder: Path) -> Callable[[str], str]:
    def class_of(name: str) -> str:
        if not name.isdigit() or not 0 <= int(name) < len(wnids):
            raise DatasetError(f"unexpected class folder {folder / name}: ImageNet-V2 folders are named 0..999")
        return wnids[int(name)]

    return class_of
