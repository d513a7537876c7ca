"""Dataset manifests: one Parquet table per dataset listing every image with its class, domain and split."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

#: Columns every manifest has, in this order.
MANIFEST_COLUMNS = ("row_id", "path", "label", "class_name", "domain", "split", "rank", "bytes")
#: Image file suffixes accepted by folder scans (case-insensitive).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """The dataset on disk is missing, incomplete or inconsistent; the message names the offending path."""


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def scan_domain_folders(root: str | Path, domains: Sequence[str] | None = None) -> pd.DataFrame:
    """Scan ``root/<domain>/<class>/<image>`` into rows (path relative to root, class_name, domain, bytes).

    Every domain must hold the same class folders, and no domain or class folder may be empty. A file whose
    suffix is not an image suffix is reported by name (set ``on_bad_image: skip`` to record and skip it).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}")
    available = [p.name for p in _visible(root.iterdir()) if p.is_dir()]
    if not available:
        raise DatasetError(f"dataset root {root} holds no domain folders")
    domains = list(domains) if domains else available
    missing = [d for d in domains if d not in available]
    if missing:
        raise DatasetError(f"domain folder {root / missing[0]} not found; found: {available}")
    rows: list[dict] = []
    reference_classes: list[str] | None = None
    for domain in domains:
        class_dirs = [p for p in _visible((root / domain).iterdir()) if p.is_dir()]
        classes = [p.name for p in class_dirs]
        if not classes:
            raise DatasetError(f"domain folder {root / domain} is empty (no class folders)")
        if reference_classes is None:
            reference_classes = classes
        elif classes != reference_classes:
            extra = sorted(set(classes) ^ set(reference_classes))
            raise DatasetError(
                f"classes differ between domains: {root / domain} vs {root / domains[0]} (differing: {extra})"
            )
        for class_dir in class_dirs:
            # Skip hidden files and anything under a hidden folder (.ipynb_checkpoints/, .git/, ...). Every entry that
            # is not a folder is listed, also a dangling symlink: the build reports it (bytes -1) instead of losing it.
            files = sorted(
                p for p in class_dir.rglob("*")
                if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            )
            if not files:
                raise DatasetError(f"class folder {class_dir} is empty")
            for file in files:
                rows.append(
                    {
                        "path": str(file.relative_to(root)),
                        "class_name": class_dir.name,
                        "domain": domain,
                        "bytes": file_bytes(file),
                        "is_image_suffix": file.suffix.lower() in IMAGE_SUFFIXES,
                    }
                )
    return pd.DataFrame(rows)


def file_bytes(path: str | Path) -> int:
    """Size of a regular file (symlinks followed), or -1 when it cannot be read: a dangling symlink, a file that
    vanished since it was listed, a FIFO or device (never opened), no permission to stat."""
    try:
        info = os.stat(path)
    except OSError:
        return -1
    return info.st_size if stat.S_ISREG(info.st_mode) else -1


def assign_splits(
    frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int, group_by: Sequence[str] = ("domain", "class_name")
) -> pd.DataFrame:
    """Add ``split`` and ``rank`` columns: a seeded, stratified train/val/test split per (domain, class).

    ``rank`` is the position of a row within its (domain, class, split) after the seeded shuffle, so capping a
    split at ``k`` per class (``rank < k``) gives nested, reproducible subsets.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"split fractions val={val_fraction}, test={test_fraction} must be in [0, 1) and sum below 1")
    frame = frame.sort_values(list(group_by) + ["path"]).reset_index(drop=True)
    split = np.empty(len(frame), dtype=object)
    rank = np.zeros(len(frame), dtype=np.int64)
    for key, index in frame.groupby(list(group_by), sort=True).indices.items():
        # One generator per group, keyed by the group's name, so adding a domain never reshuffles another.
        digest = hashlib.sha256(f"{seed}/{'/'.join(map(str, key if isinstance(key, tuple) else (key,)))}".encode())
        rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
        order = index[rng.permutation(len(index))]
        n = len(order)
        n_test = int(round(test_fraction * n)) if test_fraction > 0 else 0
        n_val = int(round(val_fraction * n)) if val_fraction > 0 else 0
        if n >= 3:
            n_test = max(n_test, 1) if test_fraction > 0 else 0
            n_val = max(n_val, 1) if val_fraction > 0 else 0
        bounds = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        for name, rows in bounds.items():
            split[rows] = name
            rank[rows] = np.arange(len(rows))
    frame["split"] = split
    frame["rank"] = rank
    return frame


def finalize_manifest(frame: pd.DataFrame, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Assign integer labels (sorted class names unless given), row ids, and the canonical column order."""
    classes = list(class_names) if class_names is not None else sorted(frame["class_name"].unique())
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(frame["class_name"]) - set(index))
    if unknown:
        raise DatasetError(f"classes {unknown[:5]} are not in the dataset's class list")
    frame = frame.sort_values(["domain", "class_name", "split", "rank", "path"]).reset_index(drop=True)
    frame["label"] = frame["class_name"].map(index).astype("int32")
    frame["row_id"] = np.arange(len(frame), dtype=np.int64)
    frame["rank"] = frame["rank"].astype("int32")
    frame["bytes"] = frame["bytes"].astype("int64")
    extra = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    return frame[list(MANIFEST_COLUMNS) + extra]


def manifest_hash(frame: pd.DataFrame) -> str:
    """A short content hash of the columns that define which image carries which label in which split."""
    digest = hashlib.sha256()
    columns = ["row_id", "path", "label", "domain", "split", "rank"]
    digest.update(pd.util.hash_pandas_object(frame[columns], index=False).values.tobytes())
    return digest.hexdigest()[:16]


def select_rows(
    frame: pd.DataFrame, domain: str, split: str, max_per_class: int | None = None, classes: Sequence[int] | None = None
) -> pd.DataFrame:
    """Rows of one (domain, split), optionally capped at ``max_per_class`` (by rank) and restricted to ``classes``."""
    rows = frame[(frame["domain"] == domain) & (frame["split"] == split)]
    if "skipped" in rows.columns:
        rows = rows[~rows["skipped"]]
    if max_per_class is not None:
        rows = rows[rows["rank"] < max_per_class]
    if classes is not None:
        rows = rows[rows["label"].isin(list(classes))]
    return rows.sort_values("row_id")
