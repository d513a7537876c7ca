"""One fine-tuning run, start to finish: the function the Snakemake ``finetune`` script calls.

A run directory holds the method's checkpoint file (``model.safetensors``, ``head.safetensors``,
``adapter.safetensors`` or ``sparse_update.safetensors``; none for ``zeroshot``), ``train_log.parquet`` and, written
last so that its presence marks a complete run, ``run.json``. Resumable checkpoints live beside it in
``<run_dir>.resume/`` (outside the run directory, so that a workflow manager deleting an incomplete output does not
delete them) and are removed when the run completes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from robustft.backbones import Backbone, build_backbone
from robustft.data.pixels import PixelSplit
from robustft.io.atomic import write_json_atomic
from robustft.io.tables import write_table
from robustft.methods import get_method
from robustft.methods.base import hyperparameter_sources, resolve_hyperparameters
from robustft.models import ClassificationHead, ImageClassifier
from robustft.training.checkpoint import save_safetensors
from robustft.training.protocols import select_protocol
from robustft.training.trainer import Split, TrainContext, evaluate_accuracy, log_frame
from robustft.training.trainer import train as train_model

RUN_FILE = "run.json"
LOG_FILE = "train_log.parquet"
#: The keys finetune_run writes into run.json.
RUN_RECORD_KEYS = frozenset({
    "method", "variant", "seed", "hyperparameters", "protocol", "absent_classes", "class_names", "backbone", "device",
    "n_train", "n_val", "total_parameters", "trainable_parameters", "trained_module_parameters", "best_epoch",
    "best_val_accuracy", "last_val_accuracy", "steps", "resumed_at_step", "method_info", "checkpoint", "select",
    "wall_time_s", "versions", "hyperparameter_sources",
})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def seeded_and_deterministic(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch; use deterministic algorithms where torch has them (restored afterwards).

    Also sets ``CUBLAS_WORKSPACE_CONFIG`` (if unset), which deterministic cuBLAS needs before its first use.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


def build_reference_model(backbone: Backbone, reference_head: Mapping[str, Tensor], num_classes: int) -> ImageClassifier:
    """``ImageClassifier(pre-trained encoder, reference head)``; ``reference_head`` keys ``head.weight``/``head.bias``."""
    head = ClassificationHead(backbone.feature_dim, num_classes, normalize=backbone.features_normalized)
    weights = {k.removeprefix("head."): v for k, v in reference_head.items()}
    if set(weights) != {"weight", "bias"}:
        raise ValueError(f"reference_head: expected keys head.weight and head.bias, got {sorted(reference_head)}")
    if tuple(weights["weight"].shape) != (num_classes, backbone.feature_dim):
        raise ValueError(
            f"reference_head: head.weight has shape {tuple(weights['weight'].shape)}, "
            f"expected ({num_classes}, {backbone.feature_dim})"
        )
    head.load_state_dict({k: v.float() for k, v in weights.items()})
    return ImageClassifier(backbone.build_encoder(), head)


def library_versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": version("open_clip_torch"),
            "peft": version("peft"), "numpy": np.__version__}


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def finetune_run(
    *,
    backbone_spec: dict | Backbone,
    method: str,
    hparams: dict,
    seed: int,
    class_names: list[str],
    prompt_names: list[str],
    train: PixelSplit,
    val: PixelSplit,
    train_features: Tensor | None,
    val_features: Tensor | None,
    reference_head: dict[str, Tensor],
    run_dir: Path,
    device: str = "auto",
    progress: bool = True,
    variant: str = "default",
    training: dict | None = None,
    checkpoint_dir: Path | None = None,
    on_step_end: Callable[[int], None] | None = None,
    extra_record: dict | None = None,
) -> dict:
    """Fine-tune the reference model with ``method`` and write the run directory; returns the run.json record.

    ``hparams``: the variant's overrides (``methods.<method>.<variant>``); ``training``: the config's ``training:``
    block (its ``device`` key is used when ``device`` is "auto"; add the config's top-level ``protocol`` to it, a
    variant's own ``protocol`` then overrides it). Resolution (``resolve_hyperparameters``): ``hparams`` beats
    ``training``, which beats the method dataclass's own defaults (e.g. L2-SP's weight decay 0), which beat the
    trainer's; run.json's ``hyperparameter_sources`` says which gave each value; an unknown key raises
    ``ValueError``. ``train_features`` / ``val_features`` are
    the cached encoder features aligned with ``train`` / ``val`` rows (needed by linear_probe and lp_ft).
    ``backbone_spec`` may also be a :class:`Backbone` instance. ``checkpoint_dir`` (default ``<run_dir>.resume``)
    holds the resumable state; ``on_step_end(step)`` runs after each optimizer step. ``extra_record``: further
    top-level run.json entries (provenance such as the pipeline commit); they may not replace the run's own keys.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    method_cls = get_method(method)
    clashes = sorted(set(extra_record or {}) & RUN_RECORD_KEYS)
    if clashes:
        raise ValueError(f"extra_record may not replace run.json keys {clashes}")
    training = dict(training or {})
    configured_device = training.pop("device", None)  # the config keeps it in training:, it is not a hyperparameter
    if device == "auto" and configured_device:
        device = configured_device
    hp = resolve_hyperparameters(method_cls, training, hparams)
    backbone = backbone_spec if isinstance(backbone_spec, Backbone) else build_backbone(backbone_spec)
    dev = resolve_device(device)
    class_names, prompt_names = list(class_names), list(prompt_names or class_names)
    if len(prompt_names) != len(class_names):
        raise ValueError(f"prompt_names has {len(prompt_names)} names, class_names {len(class_names)}")
    for name, features, split in (("train", train_features, train), ("val", val_features, val)):
        if features is not None and len(features) != len(split):
            raise ValueError(f"{name}_features has {len(features)} rows, the {name} split {len(split)}")
    if method_cls.needs_features and train_features is None:
        raise ValueError(f"method {method!r} trains on cached features: train_features is required")
    if method_cls.needs_features and hp.select == "best_val" and val_features is None:
        raise ValueError(f"method {method!r} selects its epoch on cached validation features: val_features is required")

    selection = select_protocol(hp.protocol, train.labels.numpy(), class_names, seed)
    train_split = Split(train.labels.long(), train.pixels, train_features).rows(selection.train_indices)
    val_split = Split(val.labels.long(), val.pixels, val_features)
    if selection.absent_classes:  # model selection may only see the classes fine-tuning sees
        seen = torch.from_numpy(selection.seen_class_mask(class_names))
        val_split = val_split.rows(np.flatnonzero(seen[val_split.labels].numpy()))

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else run_dir.with_name(run_dir.name + ".resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = backbone.identity()
    with seeded_and_deterministic(seed):
        model = build_reference_model(backbone, reference_head, len(class_names))
        total_parameters = sum(p.numel() for p in model.parameters())
        runner = method_cls(hp)
        ctx = TrainContext(
            hp=hp, seed=seed, device=dev, train=train_split, val=val_split,
            normalize=backbone.preprocessing.normalize, backbone=backbone, class_names=class_names,
            prompt_names=prompt_names, progress=progress,
        )
        record: dict[str, Any] = {}
        if runner.trains:
            fingerprint = _fingerprint(
                method=method, variant=variant, hp=dataclasses.asdict(hp), seed=seed, backbone=identity,
                classes=class_names, n_val=len(val_split),
                rows=hashlib.sha256(np.ascontiguousarray(selection.train_indices).tobytes()).hexdigest(),
            )
            result = train_model(model, runner, ctx, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                           on_step_end=on_step_end)
            size = save_safetensors(run_dir / runner.checkpoint_file, result.tensors, result.metadata)
            log = result.log
            record.update(
                trainable_parameters=runner.trainable_count(result.model),
                trained_module_parameters=sum(p.numel() for p in result.model.parameters()),
                best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
                last_val_accuracy=result.last_val_accuracy, steps=result.steps,
                resumed_at_step=result.resumed_at_step, method_info=runner.summary(result.model, ctx),
            )
        else:
            size = 0
            log = log_frame([])
            val_accuracy = None
            if len(val_split) and (val_features is not None or runner.needs_images):
                model.to(dev)
                val_accuracy = evaluate_accuracy(runner, model, ctx, val_split)
            record.update(trainable_parameters=0, trained_module_parameters=total_parameters, best_epoch=None,
                          best_val_accuracy=val_accuracy, last_val_accuracy=val_accuracy, steps=0,
                          resumed_at_step=None, method_info={})

    write_table(run_dir / LOG_FILE, log, metadata={"method": method, "variant": variant, "seed": seed})
    record = {
        "method": method,
        "variant": variant,
        "seed": int(seed),
        "hyperparameters": dataclasses.asdict(hp),
        "hyperparameter_sources": hyperparameter_sources(method_cls, training, hparams),
        "protocol": selection.record(),
        "absent_classes": list(selection.absent_classes),
        "class_names": class_names,
        "backbone": identity,
        "device": str(dev),
        "n_train": len(train_split),
        "n_val": len(val_split),
        "total_parameters": int(total_parameters),
        **record,
        "checkpoint": {"file": runner.checkpoint_file, "size_bytes": int(size)},
        "select": hp.select,
        "wall_time_s": time.perf_counter() - started,
        "versions": library_versions(),
        **(extra_record or {}),
    }
    write_json_atomic(run_dir / RUN_FILE, record)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return record


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the run in {run_dir} is not complete")
    return json.loads(path.read_text())


def load_run_state(run_dir: str | Path, reference_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Full ``ImageClassifier`` state dict of a finished run (the method's ``load_finetuned_state``)."""
    record = read_run_record(run_dir)
    return get_method(record["method"]).load_finetuned_state(reference_state, run_dir)


def read_train_log(run_dir: str | Path) -> pd.DataFrame:
    from robustft.io.tables import read_table

    return read_table(Path(run_dir) / LOG_FILE, required_columns=("step", "epoch", "lr", "loss"))
