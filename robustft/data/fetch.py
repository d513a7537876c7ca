"""Fetch PACS from its public GitHub copy (used only where no local copy is configured)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from robustft.data.adapters import PACS_COUNTS, PACS_SOURCE, PacsAdapter
from robustft.data.manifest import DatasetError
from robustft.io.atomic import write_text_atomic


def fetch_pacs(dest: str | Path, marker: str | Path) -> None:
    """Clone the pinned commit of the public PACS copy, check the image counts, move it to ``dest``."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as tmp:
        repo = Path(tmp) / "repo"
        try:
            subprocess.run(["git", "clone", "--quiet", "--filter=blob:none", PACS_SOURCE["repository"], str(repo)],
                           check=True, capture_output=True, text=True, timeout=3600)
            subprocess.run(["git", "-C", str(repo), "checkout", "--quiet", PACS_SOURCE["commit"]],
                           check=True, capture_output=True, text=True, timeout=3600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise DatasetError(
                f"could not fetch PACS from {PACS_SOURCE['repository']} ({detail.strip().splitlines()[-1] if detail.strip() else exc}); "
                "download it by hand and set dataset.root to its folder"
            ) from None
        source = repo / PACS_SOURCE["folder"]
        PacsAdapter().check_counts(PacsAdapter().scan(source, list(PACS_COUNTS)))
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(dest))
    write_text_atomic(marker, f"PACS from {PACS_SOURCE['repository']} at {PACS_SOURCE['commit']}\n")
