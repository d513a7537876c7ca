"""The fine-tuning stage: load the cached inputs of the ID domain, train one (method, variant, seed), write the run."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from robustft.config import variant_protocol
from robustft.data.pixels import load_pixel_split
from robustft.features import load_features
from robustft.pipeline.stages import read_manifest
from robustft.training.checkpoint import load_safetensors

log = logging.getLogger("robustft")


def pipeline_commit() -> str | None:
    """The git commit of the pipeline's checkout (with ``-dirty`` when it has local changes), if it is one."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def finetune_stage(
    manifest: str, backbone_spec: dict, method: str, variant: str, seed: int, settings: str | dict,
    train_pixels: str, val_pixels: str, train_features: str, val_features: str, reference_head: str,
    run_json: str, device: str, extra_overrides: dict[str, Any] | None = None,
) -> dict:
    """Fine-tune one run; ``settings`` is the variant's resolved JSON (``robustft.config.resolved_variant``)."""
    from robustft.training.run import finetune_run

    _, meta = read_manifest(manifest)
    settings = json.loads(settings) if isinstance(settings, str) else settings
    overrides = {**settings["overrides"], **(extra_overrides or {})}
    train, val = load_pixel_split(train_pixels), load_pixel_split(val_pixels)
    train_feats, val_feats = load_features(train_features), load_features(val_features)
    for name, pixels, feats in (("train", train, train_feats), ("val", val, val_feats)):
        if not bool((pixels.row_ids == feats["row_ids"]).all()):
            raise RuntimeError(f"the {name} pixel and feature caches list different images; rerun the features rule")
    head = load_safetensors(Path(reference_head))
    record = finetune_run(
        backbone_spec=backbone_spec, method=method, hparams=overrides, training=settings["training"], seed=int(seed),
        class_names=meta["class_names"], prompt_names=meta["prompt_names"], train=train, val=val,
        train_features=train_feats["features"], val_features=val_feats["features"],
        reference_head={"head.weight": head["head.weight"], "head.bias": head["head.bias"]},
        run_dir=Path(run_json).parent, device=device, variant=variant,
        extra_record={"pipeline_commit": pipeline_commit(), "manifest_hash": meta["manifest_hash"]},
    )
    log.info("run %s/%s/seed%s: best val accuracy %s, %.1f s", method, variant, seed,
             record.get("best_val_accuracy"), record["wall_time_s"])
    return record


def pcv_fold_classes(class_names: list[str], absent: list[str], n_folds: int, fraction: float, seed: int, fold: int) -> list[str]:
    """The fine-tuning classes made pseudo-absent in PCV fold ``fold`` (seeded by the run's seed)."""
    from robustft.calibration import pseudo_absent_folds

    seen = [i for i, name in enumerate(class_names) if name not in set(absent)]
    folds = pseudo_absent_folds(seen, n_folds, fraction, seed)
    return [class_names[i] for i in folds[fold]]


def pcv_finetune_stage(
    manifest: str, backbone_spec: dict, method: str, variant: str, seed: int, settings: str, fold: int,
    n_folds: int, fraction: float, train_pixels: str, val_pixels: str, train_features: str, val_features: str,
    reference_head: str, run_json: str, device: str,
) -> dict:
    """A PCV fold model: the run's method and settings, fine-tuned without some of its own classes as well."""
    _, meta = read_manifest(manifest)
    resolved = json.loads(settings)
    protocol = variant_protocol(resolved)
    absent = list(protocol.get("absent_classes", []))
    pseudo = pcv_fold_classes(meta["class_names"], absent, n_folds, fraction, int(seed), int(fold))
    log.info("PCV fold %d: pseudo-absent classes %s (absent: %s)", fold, pseudo, absent)
    fold_protocol = {"kind": "class_subset", "absent_classes": absent + pseudo}
    return finetune_stage(manifest, backbone_spec, method, variant, seed, resolved, train_pixels, val_pixels,
                          train_features, val_features, reference_head, run_json, device,
                          extra_overrides={"protocol": fold_protocol})
