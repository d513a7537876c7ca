"""Rule weights: a backbone's checkpoint resolved once on the submit node and recorded (path, size, SHA-256)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from robustft.backbones import build_backbone
from robustft.backbones.base import file_sha256
from robustft.backbones.weights import read_weights_record
from robustft.io.atomic import write_json_atomic

log = logging.getLogger("robustft")


def weights_stage(*, backbone: dict[str, Any], weights_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Resolve ``backbone``'s checkpoint (an open_clip tag is downloaded into ``<weights_dir>/<backbone name>``, a
    file is used in place) and write ``{backbone, source, path, size_bytes, sha256}`` to ``out``; returns it."""
    spec = {k: v for k, v in backbone.items() if k not in ("templates", "weights_record")}
    model = build_backbone({**spec, "cache_dir": str(Path(weights_dir) / spec["name"])})
    path = model.weights_path
    record: dict[str, Any] = {"backbone": spec, "source": model.weights_source, "path": str(path),
                              "size_bytes": path.stat().st_size, "sha256": file_sha256(path)}
    if spec.get("model_config"):
        record["model_config_sha256"] = file_sha256(spec["model_config"])
    write_json_atomic(out, record)
    log.info("weights %s: %s (%d bytes, sha256 %s)", out, path, record["size_bytes"], record["sha256"])
    return record

