"""Build a dataset manifest: scan, verify every image, split, label; record skipped files."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from robustft.data.adapters import DatasetAdapter
from robustft.data.images import check_image
from robustft.data.manifest import DatasetError, assign_splits, finalize_manifest, manifest_hash


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
    if "split" in good.columns:  # official splits: only the rank within each (domain, class, split) is seeded
        good = adapter_official_ranks(good, seed)
    else:
        good = assign_splits(good, val_fraction, test_fraction, seed)
    skipped = scanned[bad].copy()
    skipped["split"] = "skipped"
    skipped["rank"] = -1
    frame = pd.concat([good, skipped], ignore_index=True)
    frame = finalize_manifest(frame, adapter.class_names(scanned))
    for domain in domains:
        for class_name in adapter.class_names(scanned):
            usable = frame[(frame["domain"] == domain) & (frame["class_name"] == class_name) & ~frame["skipped"]]
            if len(usable) == 0 and class_name in set(scanned.loc[scanned["domain"] == domain, "class_name"]):
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


def adapter_official_ranks(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Seeded ranks within each (domain, class, split) for datasets that ship their own splits."""
    frame = frame.sort_values(["domain", "class_name", "split", "path"]).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    keys = rng.random(len(frame))
    frame["_key"] = keys
    frame["rank"] = frame.groupby(["domain", "class_name", "split"])["_key"].rank(method="first").astype(int) - 1
    return frame.drop(columns="_key")


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
