"""Build a dataset manifest: scan, verify every image, split, label; record skipped files."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from robustft.data.adapters import DatasetAdapter
from robustft.data.images import check_image
from robustft.data.manifest import DatasetError, manifest_hash


def build_manifest(
    adapter: DatasetAdapter,
    root: str | Path,
    domains: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    on_bad_image: str = "error",
    workers: int = 2,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Scan ``domains`` under ``root``, decode every file once to verify it, split and label.

    With ``on_bad_image='error'`` the first bad file stops the build with its path; with ``'skip'`` bad files
    stay in the manifest with ``skipped=True``, ``split='skipped'`` and the reason, and take no split slot.
    """
    root = Path(root)
    scanned = adapter.scan(root, domains)
    adapter.check_counts(scanned)
    scanned = scanned.sort_values(["domain", "class_name", "path"]).reset_index(drop=True)
    paths = [root / p for p in scanned["path"]]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(check_image, paths))
    if "is_image_suffix" in scanned.columns:
        reasons = [
            r if ok else (r or f"not an image file: {p}")
            for r, ok, p in zip(reasons, scanned["is_image_suffix"], paths)
        ]
        scanned = scanned.drop(columns="is_image_suffix")
    bad = np.array([r is not None for r in reasons], dtype=bool)
    if bad.any() and on_bad_image == "error":
        first = next(r for r in reasons if r is not None)
        raise DatasetError(f"{first} (set dataset.on_bad_image: skip to record and skip bad files)")
    scanned["skipped"] = bad
    scanned["skip_reason"] = [r or "" for r in reasons]
    good = scanned[~bad].copy()
    good = adapter.assign_splits(good, val_fraction, seed, test_fraction=test_fraction)
    skipped = scanned[bad].copy()
    skipped["split"] = "skipped"
    skipped["rank"] = -1
    frame = pd.concat([good, skipped], ignore_index=True)
    frame = adapter.finalize(frame)
    usable = frame[~frame["skipped"]].groupby(["domain", "class_name"]).size()
    for domain, class_name in scanned[["domain", "class_name"]].drop_duplicates().itertuples(index=False):
        if (domain, class_name) not in usable.index:
            raise DatasetError(f"class folder {root / domain / class_name} has no readable image")
    meta = {
        "dataset": adapter.name,
        "root": str(root.resolve()),
        "domains": list(domains),
        "class_names": adapter.class_names(scanned),
        "prompt_names": adapter.prompt_names(adapter.class_names(scanned)),
        "manifest_hash": manifest_hash(frame),
        "split": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
        "skipped": frame.loc[frame["skipped"], "path"].tolist(),
    }
    return frame, meta


def verify_manifest_files(frame: pd.DataFrame, root: str | Path, limit: int | None = None) -> None:
    """Check that the manifest still matches the files on disk (existence and byte size); name the first mismatch."""
    root = Path(root)
    rows = frame[~frame["skipped"]] if "skipped" in frame.columns else frame
    for path, size in zip(rows["path"][:limit], rows["bytes"][:limit]):
        file = root / path
        if not file.is_file():
            raise DatasetError(f"manifest no longer matches the files on disk: {file} is missing (rebuild the manifest)")
        if file.stat().st_size != size:
            raise DatasetError(f"manifest no longer matches the files on disk: {file} changed size (rebuild the manifest)")
