"""One fine-tuning run, start to finish: ``finetune_run(RunSpec, RunData, ...)``, which the ``finetune`` stage calls.

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
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from robustft.backbones import Backbone, build_backbone
from robustft.devices import resolve_device
from robustft.distributed import SINGLE, Group, rank_device
from robustft.io.atomic import write_json_atomic
from robustft.io.tables import write_table
from robustft.methods import get_method
from robustft.methods.base import (
    Method,
    TrainingHyperparameters,
    hyperparameter_sources,
    resolve_hyperparameters,
)
from robustft.models import ClassificationHead, ImageClassifier
from robustft.training.checkpoint import save_safetensors
from robustft.training.context import Split, TrainContext
from robustft.training.protocols import ProtocolSelection, select_protocol
from robustft.training.trainer import TrainResult, evaluate_accuracy, log_frame
from robustft.training.trainer import train as train_model

#: hyperparameters that change how a step is computed, not what it computes (to fp32 rounding)
HOW_COMPUTED = ("devices", "micro_batch_size")
RUN_FILE = "run.json"
LOG_FILE = "train_log.parquet"
#: The keys finetune_run writes into run.json.
RUN_RECORD_KEYS = frozenset({
    "method", "variant", "seed", "hyperparameters", "protocol", "absent_classes", "class_names", "backbone", "device",
    "n_train", "n_val", "total_parameters", "trainable_parameters", "trained_module_parameters", "best_epoch",
    "best_val_accuracy", "last_val_accuracy", "steps", "resumed_at_step", "method_info", "checkpoint", "select",
    "wall_time_s", "versions", "hyperparameter_sources",
})


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


@dataclass(frozen=True)
class RunSpec:
    """Which run: method, variant and seed, and the settings its hyperparameters resolve from.

    ``hparams``: the variant's overrides (``methods.<method>.<variant>``). ``training``: the config's ``training:``
    block, with the config's top-level ``protocol`` added (a variant's own ``protocol`` overrides it); its ``device``
    key is not a hyperparameter and only chooses the device when ``finetune_run`` gets ``device="auto"``.
    Precedence (:func:`robustft.methods.base.resolve_hyperparameters`): ``hparams`` beats ``training``, which beats
    the method dataclass's own defaults (e.g. L2-SP's weight decay 0), which beat the trainer's; run.json's
    ``hyperparameter_sources`` says which gave each value. ``templates``: the backbone's prompt-template set, which
    methods read as ``TrainContext.templates`` (FLYP, SAFT).
    """

    method: str
    seed: int
    variant: str = "default"
    hparams: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] | None = None
    templates: str | None = None

    def _training_block(self) -> dict[str, Any]:
        return {k: v for k, v in (self.training or {}).items() if k != "device"}

    def hyperparameters(self) -> TrainingHyperparameters:
        """The resolved settings; an unknown key raises ``ValueError`` naming it and the allowed ones."""
        return resolve_hyperparameters(get_method(self.method), self._training_block(), dict(self.hparams))

    def hyperparameter_sources(self) -> dict[str, str]:
        """Where each resolved value came from (variant, training, method default, shared default)."""
        return hyperparameter_sources(get_method(self.method), self._training_block(), dict(self.hparams))

    def device(self, device: str) -> torch.device:
        """``device``, or the ``training.device`` of the config where ``device`` is ``auto``."""
        configured = (self.training or {}).get("device")
        return resolve_device(configured if device == "auto" and configured else device)


@dataclass
class RunData:
    """On what a run trains: the class names (and the names prompts use), the ID train and validation splits.

    The splits' ``features`` are the cached encoder features of the same rows; linear_probe and lp_ft train on them,
    KD's teacher and the zero-shot run's validation read them. In the pipeline the splits stream from the caches.
    """

    class_names: list[str]
    train: Split
    val: Split
    prompt_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.class_names = list(self.class_names)
        self.prompt_names = list(self.prompt_names or self.class_names)
        if len(self.prompt_names) != len(self.class_names):
            raise ValueError(f"prompt_names has {len(self.prompt_names)} names, class_names {len(self.class_names)}")

    def check_for(self, method: type[Method], hp: TrainingHyperparameters) -> None:
        """``ValueError`` when ``method`` needs cached features that are missing."""
        if method.needs_features and self.train.features is None:
            raise ValueError(f"method {method.name!r} trains on cached features: train features are required")
        if method.needs_features and hp.select == "best_val" and self.val.features is None:
            raise ValueError(f"method {method.name!r} selects its epoch on cached validation features: val features "
                             f"are required")


def select_splits(hp: TrainingHyperparameters, data: RunData, seed: int) -> tuple[ProtocolSelection, Split, Split]:
    """The protocol's training rows, and the validation rows of the classes fine-tuning sees (model selection may
    only see those)."""
    selection = select_protocol(hp.protocol, data.train.labels.numpy(), data.class_names, seed)
    val = data.val
    if selection.absent_classes:
        seen = torch.from_numpy(selection.seen_class_mask(data.class_names))
        val = val.rows(np.flatnonzero(seen[val.labels].numpy()))
    return selection, data.train.rows(selection.train_indices), val


def run_fingerprint(spec: RunSpec, hp: TrainingHyperparameters, backbone: dict, data: RunData,
                    selection: ProtocolSelection, n_val: int) -> str:
    """What a resume checkpoint must match: the run, its settings, backbone, classes and training rows (not how the
    steps are computed: a run may resume with other ``devices`` or ``micro_batch_size``)."""
    settings = {k: v for k, v in dataclasses.asdict(hp).items() if k not in HOW_COMPUTED}
    return _fingerprint(
        method=spec.method, variant=spec.variant, hp=settings, seed=spec.seed, backbone=backbone,
        classes=data.class_names, n_val=n_val,
        rows=hashlib.sha256(np.ascontiguousarray(selection.train_indices).tobytes()).hexdigest(),
    )


def finetune_run(
    spec: RunSpec,
    data: RunData,
    *,
    backbone: dict | Backbone,
    reference_head: Mapping[str, Tensor],
    run_dir: str | Path,
    device: str = "auto",
    checkpoint_dir: Path | None = None,
    on_step_end: Callable[[int], None] | None = None,
    extra_record: Mapping[str, Any] | None = None,
    group: Group = SINGLE,
) -> dict:
    """Fine-tune the reference model (``backbone``'s encoder + ``reference_head``) as ``spec`` says on ``data``;
    write the run directory and return its run.json record.

    ``group``: this process's rank when the run trains on several (:func:`finetune_ranks` starts them); every rank
    trains, rank 0 alone writes the run directory (the others return the same record).

    ``backbone``: a backbone spec or a :class:`Backbone`. ``checkpoint_dir`` (default ``<run_dir>.resume``) holds
    the resumable state; ``on_step_end(step)`` runs after each optimizer step. ``extra_record``: further top-level
    run.json entries (provenance such as the pipeline commit); they may not replace the run's own keys.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    method_cls = get_method(spec.method)
    clashes = sorted(set(extra_record or {}) & RUN_RECORD_KEYS)
    if clashes:
        raise ValueError(f"extra_record may not replace run.json keys {clashes}")
    hp = spec.hyperparameters()
    backbone = backbone if isinstance(backbone, Backbone) else build_backbone(backbone)
    dev = rank_device(spec.device(device), group.rank) if group.parallel else spec.device(device)
    if hp.devices != group.world_size:
        raise ValueError(f"devices: the run asks for {hp.devices} ranks but runs in {group.world_size}; start it "
                         f"with finetune_ranks")
    data.check_for(method_cls, hp)
    selection, train_split, val_split = select_splits(hp, data, spec.seed)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else run_dir.with_name(run_dir.name + ".resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = backbone.identity()
    with seeded_and_deterministic(spec.seed):
        model = build_reference_model(backbone, reference_head, len(data.class_names))
        total_parameters = sum(p.numel() for p in model.parameters())
        runner = method_cls(hp)
        ctx = TrainContext(
            hp=hp, seed=spec.seed, device=dev, train=train_split, val=val_split,
            normalize=backbone.preprocessing.normalize, backbone=backbone, class_names=data.class_names,
            prompt_names=data.prompt_names, templates=spec.templates, group=group,
        )
        if runner.trains:
            fingerprint = run_fingerprint(spec, hp, identity, data, selection, len(val_split))
            result = train_model(model, runner, ctx, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                                 on_step_end=on_step_end)
            size = save_safetensors(run_dir / runner.checkpoint_file, result.tensors, result.metadata) \
                if group.is_main else 0
            log, outcome = result.log, trained_record(runner, result, ctx)
        else:
            size, log, outcome = 0, log_frame([]), reference_record(runner, model, ctx, total_parameters)

    if not group.is_main:
        group.barrier()  # rank 0 writes the run directory and removes the resume folder
        return {"method": spec.method, "variant": spec.variant, "seed": int(spec.seed), **outcome}
    write_table(run_dir / LOG_FILE, log, metadata={"method": spec.method, "variant": spec.variant, "seed": spec.seed})
    record = {
        "method": spec.method,
        "variant": spec.variant,
        "seed": int(spec.seed),
        "hyperparameters": dataclasses.asdict(hp),
        "hyperparameter_sources": spec.hyperparameter_sources(),
        "protocol": selection.record(),
        "absent_classes": list(selection.absent_classes),
        "class_names": data.class_names,
        "backbone": identity,
        "device": str(dev),
        "n_train": len(train_split),
        "n_val": len(val_split),
        "total_parameters": int(total_parameters),
        **outcome,
        "checkpoint": {"file": runner.checkpoint_file, "size_bytes": int(size)},
        "select": hp.select,
        "wall_time_s": time.perf_counter() - started,
        "versions": library_versions(),
        **(extra_record or {}),
    }
    write_json_atomic(run_dir / RUN_FILE, record)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    group.barrier()
    return record


def _finetune_rank(group: Group, kwargs: dict[str, Any]) -> None:
    finetune_run(group=group, **kwargs)


def finetune_ranks(spec: RunSpec, data: RunData, *, device: str = "auto", threads: int | None = None,
                   **kwargs: Any) -> dict:
    """:func:`finetune_run` on ``spec``'s ``devices`` ranks (one process each, :func:`robustft.distributed.spawn`):
    gloo on CPU, NCCL with one GPU a rank on CUDA; the record rank 0 wrote. One device: in this process.

    ``data``, the backbone and ``on_step_end`` must pickle (in-memory splits; the pipeline opens the caches in each
    rank instead, :func:`robustft.pipeline.runs.finetune_stage`). ``threads``: torch CPU threads of each rank.
    """
    from robustft.distributed import spawn

    ranks = spec.hyperparameters().devices
    if ranks == 1:
        return finetune_run(spec, data, device=device, **kwargs)
    spawn(_finetune_rank, ranks, ({"spec": spec, "data": data, "device": device, **kwargs},),
          device=spec.device(device), threads=threads)
    return read_run_record(kwargs["run_dir"])


def trained_record(method: Method, result: TrainResult, ctx: TrainContext) -> dict[str, Any]:
    """The run.json entries of a trained run."""
    return {
        "trainable_parameters": method.trainable_count(result.model),
        "trained_module_parameters": sum(p.numel() for p in result.model.parameters()),
        "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
        "last_val_accuracy": result.last_val_accuracy, "steps": result.steps,
        "resumed_at_step": result.resumed_at_step, "method_info": method.summary(result.model, ctx),
    }


def reference_record(method: Method, model: nn.Module, ctx: TrainContext, total_parameters: int) -> dict[str, Any]:
    """The run.json entries of a method that trains nothing: the reference model's ID-validation accuracy."""
    val_accuracy = None
    if len(ctx.val) and (ctx.val.features is not None or method.needs_images):
        model.to(ctx.device)
        val_accuracy = evaluate_accuracy(method, model, ctx, ctx.val)
    return {"trainable_parameters": 0, "trained_module_parameters": total_parameters, "best_epoch": None,
            "best_val_accuracy": val_accuracy, "last_val_accuracy": val_accuracy, "steps": 0,
            "resumed_at_step": None, "method_info": {}}


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
