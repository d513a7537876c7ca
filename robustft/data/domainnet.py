"""DomainNet (Peng et al., ICCV 2019, cleaned release): 6 domains x 345 classes with official train/test lists.

On-disk layout (the official zips unpacked side by side, with the official split files next to them)::

    <root>/clipart/<class>/<file>.jpg       ... one folder per domain: clipart, infograph, painting,
    <root>/clipart_train.txt                    quickdraw, real, sketch
    <root>/clipart_test.txt                 lines "clipart/aircraft_carrier/clipart_001_000018.jpg 0"
    ...                                     (the split files may also lie in <root>/splits/ or <root>/txt/)

Only the files listed in the split files are used (a copy may hold unlisted files, e.g. images dropped from the
cleaned release); every listed file must exist. The label order is the one of the split files (the integer after
each path), which :meth:`DomainNetAdapter.class_names` reads back; it matches ``classlists/domainnet_classes.json``
(a mismatch is reported). Official train -> ``train`` with a seeded ``val`` carved from it; official test ->
``test``. Note that ``painting_train.txt`` lists no ``t-shirt`` image (the class is in ``painting_test.txt``).

Expected counts: images per domain of the cleaned release (DomainNet website table "# Cleaned", reproduced in
datasets-mila/datasets--domainnet README): train + test lines together. The per-split counts commonly quoted
(e.g. clipart 33,525 / 14,604, real 120,906 / 52,041) were not checked against a source here and are not enforced.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from robustft.data.adapters import DatasetAdapter
from robustft.data.classlists import domainnet_classes
from robustft.data.imagenet import check_expected_counts, finalize_per_domain, split_official
from robustft.data.manifest import IMAGE_SUFFIXES, DatasetError, file_bytes

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

#: Images per domain in the cleaned release (train + test split files together).
DOMAINNET_COUNTS: dict[str, int] = {
    "clipart": 48_129,
    "infograph": 51_605,
    "painting": 72_266,
    "quickdraw": 172_500,
    "real": 172_947,
    "sketch": 69_128,
}

#: Folders (relative to the root) searched for ``<domain>_{train,test}.txt``, in order.
SPLIT_FILE_DIRS = (".", "splits", "txt")


def find_split_file(root: Path, domain: str, split: str) -> Path:
    """``<domain>_<split>.txt`` in the root or one of :data:`SPLIT_FILE_DIRS`."""
    for folder in SPLIT_FILE_DIRS:
        path = Path(root) / folder / f"{domain}_{split}.txt"
        if path.is_file():
            return path
    tried = ", ".join(str(Path(root) / folder / f"{domain}_{split}.txt") for folder in SPLIT_FILE_DIRS)
    raise DatasetError(f"DomainNet split file not found; tried {tried}")


def read_split_file(path: Path, domain: str) -> list[tuple[str, str, int]]:
    """(relative path, class folder, official label) per line of an official split file."""
    entries: list[tuple[str, str, int]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DatasetError(f"{path}:{number}: expected '<domain>/<class>/<file> <label>', got {line!r}")
            rel, label = parts[0].replace("\\", "/"), int(parts[1])
            pieces = rel.split("/")
            if len(pieces) < 3 or pieces[0] != domain:
                raise DatasetError(f"{path}:{number}: path {rel!r} is not under {domain}/<class>/")
            entries.append((rel, pieces[1], label))
    return entries


@dataclass
class DomainNetAdapter(DatasetAdapter):
    """DomainNet: 6 domains, 345 classes, official split files (see the module docstring)."""

    name: str = "domainnet"
    expected_counts: dict[str, int] = field(default_factory=lambda: dict(DOMAINNET_COUNTS))

    def scan(self, root: Path, domains: Sequence[str] | None) -> pd.DataFrame:
        """Rows of the files listed in the split files (path relative to root, class_name, domain, split, bytes,
        is_image_suffix, official_label). A listed file that is missing stops the scan with the counts."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset root not found: {root}")
        if domains:
            unknown = [d for d in domains if d not in DOMAINNET_DOMAINS]
            if unknown:
                raise DatasetError(f"unknown DomainNet domain {unknown[0]!r}; allowed: {list(DOMAINNET_DOMAINS)}")
            wanted = list(dict.fromkeys(domains))
        else:
            wanted = [d for d in DOMAINNET_DOMAINS if (root / d).is_dir()]
            if not wanted:
                raise DatasetError(f"dataset root {root} holds none of the domain folders {list(DOMAINNET_DOMAINS)}")
        rows: list[dict] = []
        for domain in wanted:
            if not (root / domain).is_dir():
                raise DatasetError(f"domain folder {root / domain} not found")
            for split in ("train", "test"):
                split_file = find_split_file(root, domain, split)
                entries = read_split_file(split_file, domain)
                missing: list[str] = []
                for rel, class_name, label in entries:
                    if not os.path.lexists(root / rel):
                        missing.append(rel)
                        continue
                    size = file_bytes(root / rel)  # -1 (reported by the build) for a dangling symlink
                    rows.append(
                        {
                            "path": rel,
                            "class_name": class_name,
                            "domain": domain,
                            "split": split,
                            "bytes": size,
                            "is_image_suffix": os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES,
                            "official_label": label,
                        }
                    )
                if missing:
                    raise DatasetError(
                        f"dataset {self.name}, domain {domain}: {split_file} lists {len(entries)} images, found "
                        f"{len(entries) - len(missing)} ({len(missing)} missing, e.g. {root / missing[0]})"
                    )
        columns = ["path", "class_name", "domain", "split", "bytes", "is_image_suffix", "official_label"]
        frame = pd.DataFrame(rows, columns=columns)
        duplicated = frame["path"].duplicated()
        if duplicated.any():
            raise DatasetError(f"{root / frame['path'][duplicated].iloc[0]} is listed twice in the split files")
        return frame

    def check_counts(self, scanned: pd.DataFrame) -> None:
        """Images listed per domain (train + test) against the cleaned release's counts."""
        check_expected_counts(self.name, self.expected_counts, scanned)

    def class_names(self, scanned: pd.DataFrame | None = None) -> list[str]:
        """The 345 classes in the official label order, read from the split files' labels.

        Without a scan (or a scan without ``official_label``), the packaged list. A label given to two classes, or
        a class given two labels, is refused; a gap in the labels is filled from the packaged list.
        """
        reference = list(domainnet_classes())
        if scanned is None or "official_label" not in scanned.columns or scanned.empty:
            return reference
        pairs = scanned[["official_label", "class_name"]].drop_duplicates()
        for column, other in (("official_label", "class_name"), ("class_name", "official_label")):
            counts = pairs.groupby(column)[other].nunique()
            if (counts > 1).any():
                key = counts[counts > 1].index[0]
                values = sorted(pairs.loc[pairs[column] == key, other].astype(str))
                raise DatasetError(f"DomainNet split files are inconsistent: {column} {key!r} goes with {values}")
        by_label = dict(zip(pairs["official_label"].astype(int), pairs["class_name"]))
        if min(by_label) < 0 or max(by_label) >= len(reference):
            raise DatasetError(f"DomainNet labels must lie in 0..{len(reference) - 1}; found {min(by_label)}..{max(by_label)}")
        names = [by_label.get(i, reference[i]) for i in range(len(reference))]
        if len(set(names)) != len(names):
            raise DatasetError("DomainNet split files give a class a label that the packaged list gives another class")
        differing = sorted(i for i, name in by_label.items() if reference[i] != name)
        if differing:
            i = differing[0]
            warnings.warn(
                f"DomainNet split files give label {i} to {by_label[i]!r}, the packaged list to {reference[i]!r}; "
                "using the split files' order",
                stacklevel=2,
            )
        return names

    def prompt_names(self, class_names: Sequence[str]) -> list[str]:
        """Folder names made readable: underscores and hyphens become spaces ("teddy-bear" -> "teddy bear")."""
        return [c.replace("_", " ").replace("-", " ") if c != "t-shirt" else "t-shirt" for c in class_names]

    def has_official_splits(self) -> bool:
        return True

    def assign_splits(
        self, scanned: pd.DataFrame, val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.0
    ) -> pd.DataFrame:
        """Official train -> train + seeded, class-stratified val (``val_fraction``); official test -> test."""
        return split_official(scanned, val_fraction, seed)

    def finalize(self, frame: pd.DataFrame, class_names: Sequence[str] | None = None) -> pd.DataFrame:
        """Labels in the official order (``class_names`` from :meth:`class_names` of the scan), row ids, columns."""
        names = list(class_names) if class_names is not None else self.class_names(frame)
        return finalize_per_domain(frame, lambda domain: names)
