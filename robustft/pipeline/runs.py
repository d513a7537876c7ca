"""The fine-tuning stage: stream the ID domain's cached inputs, train one (method, variant, seed), write the run."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustft.config import variant_protocol
from robustft.distributed import SINGLE, Group, spawn
from robustft.io.arrays import ColumnReader, load_arrays
from robustft.pipeline.stages import read_manifest
from robustft.training.checkpoint import load_safetensors
from robustft.training.data import Split

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


def open_split(name: str, pixels: str | Path, features: str | Path, stack: contextlib.ExitStack) -> Split:
    """A split streamed from its pixel and feature caches: labels in memory, pixels and features read by rows.

    Raises ``RuntimeError`` when the two caches list different images (row ids compared, 8 bytes a row).
    """
    rows = load_arrays(pixels, ("labels", "row_ids"))
    if not np.array_equal(rows["row_ids"], load_arrays(features, ("row_ids",))["row_ids"]):
        raise RuntimeError(f"the {name} pixel and feature caches list different images ({pixels}, {features}); "
                           f"rerun the features rule")
    return Split(torch.from_numpy(rows["labels"]), stack.enter_context(ColumnReader(pixels, "pixels")),
                 stack.enter_context(ColumnReader(features, "features")))


def finetune_stage(
    manifest: str, backbone_spec: dict, method: str, variant: str, seed: int, settings: str | dict,
    train_pixels: str, val_pixels: str, train_features: str, val_features: str, reference_head: str,
    run_json: str, device: str, extra_overrides: dict[str, Any] | None = None, *, templates: str | None = None,
) -> dict:
    """Fine-tune one run, streaming its inputs from the caches; ``settings`` is the variant's resolved JSON
    (``robustft.config.resolved_variant``), ``templates`` the backbone's prompt-template set."""
    from robustft.training.run import RunSpec

    settings = json.loads(settings) if isinstance(settings, str) else settings
    spec = RunSpec(method=method, seed=int(seed), variant=variant,
                   hparams={**settings["overrides"], **(extra_overrides or {})}, training=settings["training"],
                   templates=templates)
    stage = {"manifest": manifest, "backbone_spec": backbone_spec, "spec": spec, "train_pixels": train_pixels,
             "val_pixels": val_pixels, "train_features": train_features, "val_features": val_features,
             "reference_head": reference_head, "run_json": run_json, "device": device}
    ranks = spec.hyperparameters().devices
    if ranks == 1:
        record = _stage_rank(SINGLE, stage)
    else:  # one process a device, each streaming its share from the caches (robustft.distributed)
        from robustft.training.run import read_run_record

        dev = spec.device(device)
        log.info("run %s/%s/seed%s: %d data-parallel ranks on %s", method, variant, seed, ranks, dev.type)
        spawn(_stage_rank, ranks, (stage,), device=dev,
              threads=max(1, torch.get_num_threads() // ranks) if dev.type == "cpu" else None)
        record = read_run_record(Path(run_json).parent)
    log.info("run %s/%s/seed%s: best val accuracy %s, %.1f s", method, variant, seed,
             record.get("best_val_accuracy"), record["wall_time_s"])
    return record


def _stage_rank(group: Group, stage: dict[str, Any]) -> dict:
    """One rank of :func:`finetune_stage`: open the caches and train (rank 0 writes the run directory)."""
    from robustft.training.run import RunData, finetune_run

    _, meta = read_manifest(stage["manifest"])
    head = load_safetensors(Path(stage["reference_head"]))
    with contextlib.ExitStack() as stack:
        data = RunData(class_names=meta["class_names"], prompt_names=meta["prompt_names"],
                       train=open_split("train", stage["train_pixels"], stage["train_features"], stack),
                       val=open_split("val", stage["val_pixels"], stage["val_features"], stack))
        return finetune_run(
            stage["spec"], data, backbone=stage["backbone_spec"],
            reference_head={"head.weight": head["head.weight"], "head.bias": head["head.bias"]},
            run_dir=Path(stage["run_json"]).parent, device=stage["device"], group=group,
            extra_record={"pipeline_commit": pipeline_commit(), "manifest_hash": meta["manifest_hash"]},
        )


def pcv_fold_classes(class_names: list[str], absent: list[str], n_folds: int, fraction: float, seed: int, fold: int) -> list[str]:
    """The fine-tuning classes made pseudo-absent in PCV fold ``fold`` (seeded by the run's seed)."""
    from robustft.calibration import pseudo_absent_folds

    seen = [i for i, name in enumerate(class_names) if name not in set(absent)]
    folds = pseudo_absent_folds(seen, n_folds, fraction, seed)
    return [class_names[i] for i in folds[fold]]


def pcv_finetune_stage(
    manifest: str, backbone_spec: dict, method: str, variant: str, seed: int, settings: str, fold: int,
    n_folds: int, fraction: float, train_pixels: str, val_pixels: str, train_features: str, val_features: str,
    reference_head: str, run_json: str, device: str, *, templates: str | None = None,
) -> dict:
    """A PCV fold model: the run's method and settings, fine-tuned without some of its own classes as well."""
    _, meta = read_manifest(manifest)
    resolved = json.loads(settings)
    protocol = variant_protocol(resolved)
    absent = list(protocol.get("absent_classes", []))
    pseudo = pcv_fold_classes(meta["class_names"], absent, n_folds, fraction, int(seed), int(fold))
    log.info("PCV fold %d: pseudo-absent classes %s (absent: %s)", fold, pseudo, absent)
    fold_protocol = {"kind": "class_subset", "absent_classes": absent + pseudo}
    return finetune_stage(
        manifest=manifest, backbone_spec=backbone_spec, method=method, variant=variant, seed=seed, settings=resolved,
        train_pixels=train_pixels, val_pixels=val_pixels, train_features=train_features, val_features=val_features,
        reference_head=reference_head, run_json=run_json, device=device,
        extra_overrides={"protocol": fold_protocol}, templates=templates,
    )
