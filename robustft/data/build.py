"""Build a dataset manifest: scan, check that every image decodes, split, label; record skipped files."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from robustft.data.adapters import DatasetAdapter
from robustft.data.images import check_image, unreadable_reason
from robustft.data.manifest import DatasetError, manifest_hash
from robustft.io.progress import ProgressLog

log = logging.getLogger("robustft")


#: Files verified per round of the thread pool: bounds the pending futures (1.5 M files for ImageNet) by this.
VERIFY_BATCH = 4096


def image_problems(
    paths: Sequence[Path], sizes: Sequence[int], image_suffix: Sequence[bool], threads: int, what: str,
    stop_at_first: bool = False,
) -> list[str | None]:
    """Per file: ``None`` when it decodes as an image (:func:`check_image`), else a one-line reason.

    A file the scan could not read (``sizes`` -1: a dangling symlink, a vanished file) gets
    :func:`unreadable_reason`, one without an image suffix "not an image file"; neither is opened. Files are checked
    by ``threads`` threads (PIL releases the GIL while decoding), :data:`VERIFY_BATCH` at a time, with progress lines.
    ``stop_at_first``: return after the batch that holds the first problem (the list is then shorter).
    """

    def check(item: tuple[Path, int, bool]) -> str | None:
        path, size, suffix_ok = item
        if size < 0:
            return unreadable_reason(path)
        return check_image(path) if suffix_ok else f"not an image file: {path}"

    reasons: list[str | None] = []
    items = list(zip(paths, sizes, image_suffix))
    with ThreadPoolExecutor(max(1, threads)) as pool, ProgressLog(f"verify {what}", len(items)) as progress:
        for start in range(0, len(items), VERIFY_BATCH):
            part = items[start : start + VERIFY_BATCH]
            reasons.extend(pool.map(check, part))
            progress.update(len(part))
            if stop_at_first and any(r is not None for r in reasons[start:]):
                break
    return reasons


def build_manifest(
    adapter: DatasetAdapter,
    root: str | Path,
    domains: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    on_bad_image: str = "error",
    threads: int = 1,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Scan ``domains`` under ``root``, check that every file decodes (:func:`image_problems`), split and label.

    With ``on_bad_image='error'`` the first bad or unreadable file stops the build with its path; with ``'skip'``
    such files stay in the manifest with ``skipped=True``, ``split='skipped'`` and the reason, and take no split slot.
    """
    root = Path(root)
    started = time.monotonic()
    scanned = adapter.scan(root, domains)
    log.info("scanned %s: %d files in %.1f s", root, len(scanned), time.monotonic() - started)
    adapter.check_counts(scanned)
    scanned = scanned.sort_values(["domain", "class_name", "path"]).reset_index(drop=True)
    paths = [root / p for p in scanned["path"]]
    suffix_ok = scanned.pop("is_image_suffix").tolist() if "is_image_suffix" in scanned.columns else [True] * len(paths)
    reasons = image_problems(paths, scanned["bytes"].tolist(), suffix_ok, threads, adapter.name,
                             stop_at_first=on_bad_image == "error")
    first = next((r for r in reasons if r is not None), None)
    if first is not None and on_bad_image == "error":
        raise DatasetError(f"{first} (set dataset.on_bad_image: skip to record and skip bad files)")
    bad = np.array([r is not None for r in reasons], dtype=bool)
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
