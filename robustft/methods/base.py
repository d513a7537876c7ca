"""What every fine-tuning method is to the shared trainer: a hyperparameter dataclass and a few hooks.

A method module defines one :class:`Method` subclass and one :class:`TrainingHyperparameters` subclass holding its
own hyperparameters with the paper's defaults, each declared with :func:`hyperparameter` (default, description,
bounds): the config schema's ``training`` and ``$defs.method_hyperparameters`` entries are generated from these
fields (``python -m robustft.methods.schema --write-schema``). The trainer (:mod:`robustft.training.trainer`) only
calls the hooks; it never asks which method it is running. Methods see the run through
:class:`robustft.training.context.TrainContext` and never import the trainer.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import Batch, StepBatches, TrainContext

PROTOCOL_KINDS = ("full", "kshot", "class_subset")
#: JSON-schema keywords a hyperparameter may declare besides its description
SCHEMA_KEYWORDS = ("enum", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
#: Where a resolved hyperparameter's value came from, highest precedence first (recorded in run.json): the variant's
#: overrides, the config's ``training:`` block (for ``protocol``: its top-level ``protocol:`` block), the method
#: dataclass's own default, the :class:`TrainingHyperparameters` default
SOURCES = ("variant", "training", "method default", "shared default")


def hyperparameter(default: Any, description: str, **schema: Any) -> Any:
    """A hyperparameter field: its default, a one-line description and JSON-schema bounds (``minimum``, ``enum``...).

    A list or dict default is copied for each instance. The config schema's entry is generated from the three.
    """
    unknown = sorted(set(schema) - set(SCHEMA_KEYWORDS))
    if unknown:
        raise TypeError(f"hyperparameter: unknown schema keywords {unknown}; allowed: {list(SCHEMA_KEYWORDS)}")
    if not description or "\n" in description:
        raise ValueError(f"hyperparameter: the description must be one non-empty line, got {description!r}")
    metadata = {"description": description, "schema": schema}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainingHyperparameters:
    """Settings of the shared trainer (the config's ``training:`` block).

    Defaults follow WiSE-FT end-to-end fine-tuning (``mlfoundations/wise-ft`` ``src/models/finetune.py``, App. D.2):
    AdamW, lr 3e-5, weight decay 0.1, cosine schedule with 500 warm-up steps, gradient clipping at 1.0, 10 epochs,
    batch 512, no label smoothing, no augmentation beyond the preprocessing. These are the shared defaults: a method's
    dataclass may re-declare one with its paper's value, and the config's values beat both
    (:func:`resolve_hyperparameters`). ``checkpoint_every`` (200 steps) is not WiSE-FT's: it bounds what a kill loses.
    """

    epochs: int = hyperparameter(10, "Passes over the training data (WiSE-FT 10).", minimum=1)
    batch_size: int = hyperparameter(512, "Examples per optimizer step (WiSE-FT 512).", minimum=1)
    lr: float = hyperparameter(3e-5, "Peak AdamW learning rate (WiSE-FT 3e-5).", exclusiveMinimum=0)
    weight_decay: float = hyperparameter(0.1, "AdamW weight decay (WiSE-FT 0.1).", minimum=0)
    warmup_steps: int = hyperparameter(
        500, "Linear warm-up steps before the cosine decay (WiSE-FT 500).", minimum=0)
    grad_clip: float | None = hyperparameter(
        1.0, "Maximum global gradient norm (0 or null: no clipping; the norm is still logged).", minimum=0)
    label_smoothing: float = hyperparameter(0.0, "Label smoothing of the cross-entropy.", minimum=0, maximum=0.99)
    augment: str = hyperparameter(
        "none", "Training augmentation on cached pixels (flip: random horizontal flip; ignored on cached features).",
        enum=["none", "flip"])
    norm_statistics: str = hyperparameter(
        "train", "BatchNorm running statistics while training: train (updated, torch's default) or frozen (kept at the "
        "pre-trained values, as small-batch fine-tuning of BatchNorm networks does); no effect on LayerNorm models.",
        enum=["train", "frozen"])
    select: str = hyperparameter(
        "best_val", "Which epoch's weights a run keeps: the best ID-validation accuracy (best_val) or the last.",
        enum=["best_val", "last"])
    checkpoint_every: int = hyperparameter(
        200, "Also write a resumable checkpoint every this many optimizer steps (0: at epoch ends only).", minimum=0)
    eval_batch_size: int = hyperparameter(256, "Examples per forward pass of the per-epoch validation.", minimum=1)
    micro_batch_size: int | None = hyperparameter(
        None, "Examples per forward/backward pass on one device; gradients accumulate over the micro-batches of a "
        "step, which still updates on batch_size examples (null: the whole batch of the device at once).", minimum=1)
    devices: int = hyperparameter(
        1, "Data-parallel ranks of a run (torch.distributed: NCCL, one GPU each, on CUDA; gloo processes on CPU); "
        "batch_size is the global batch and must be a multiple of it.", minimum=1)
    #: {"kind": "full"} | {"kind": "kshot", "k": 16[, "seed": s]} | {"kind": "class_subset", "absent_classes": [...]}
    #: (the config's top-level ``protocol:`` block, not a ``training:`` key)
    protocol: dict = field(default_factory=lambda: {"kind": "full"})

    def __post_init__(self) -> None:
        if self.augment not in ("none", "flip"):
            raise ValueError(f"augment: expected 'none' or 'flip', got {self.augment!r}")
        if self.norm_statistics not in ("train", "frozen"):
            raise ValueError(f"norm_statistics: expected 'train' or 'frozen', got {self.norm_statistics!r}")
        if self.select not in ("best_val", "last"):
            raise ValueError(f"select: expected 'best_val' or 'last', got {self.select!r}")
        for name in ("epochs", "batch_size", "warmup_steps", "checkpoint_every", "eval_batch_size", "devices"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                setattr(self, name, value := int(value))
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be at least 1")
        if self.devices < 1:
            raise ValueError(f"devices: expected a positive integer, got {self.devices!r}")
        if self.batch_size % self.devices:
            raise ValueError(f"batch_size: {self.batch_size} is not a multiple of devices ({self.devices})")
        if self.micro_batch_size is not None:
            if isinstance(self.micro_batch_size, float) and self.micro_batch_size.is_integer():
                self.micro_batch_size = int(self.micro_batch_size)
            if not isinstance(self.micro_batch_size, int) or isinstance(self.micro_batch_size, bool) \
                    or self.micro_batch_size < 1:
                raise ValueError(f"micro_batch_size: expected a positive integer or null, got {self.micro_batch_size!r}")
        if self.grad_clip is None:
            self.grad_clip = 0.0
        for name in ("lr", "weight_decay", "grad_clip", "label_smoothing"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
            setattr(self, name, float(value))
        if not isinstance(self.protocol, Mapping) or self.protocol.get("kind", "full") not in PROTOCOL_KINDS:
            raise ValueError(f"protocol: expected a mapping with kind in {list(PROTOCOL_KINDS)}, got {self.protocol!r}")
        self.protocol = {"kind": "full", **dict(self.protocol)}


def shared_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainingHyperparameters)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise TypeError(f"hyperparameter {f.name!r} has no default")


def _resolve(
    method: type["Method"], training: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """(value, source) of every field of ``method``'s dataclass; ``ValueError`` naming an unknown key."""
    cls = method.hyperparameters
    fields = {f.name: f for f in dataclasses.fields(cls)}
    shared = {f.name: f for f in dataclasses.fields(TrainingHyperparameters)}
    training, overrides = dict(training or {}), dict(overrides or {})
    for where, given, allowed in (("training", training, shared), (f"methods.{method.name}", overrides, fields)):
        for key in given:
            if key not in allowed:
                raise ValueError(
                    f"{where}: unknown hyperparameter {key!r} for method {method.name!r}; allowed: {sorted(allowed)}"
                )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, f in fields.items():
        if name in overrides:
            values[name], sources[name] = copy.deepcopy(overrides[name]), "variant"
        elif name in training:
            values[name], sources[name] = copy.deepcopy(training[name]), "training"
        else:  # a field the method (re-)declares holds its paper's default
            values[name], sources[name] = _default(f), "shared default" if shared.get(name) is f else "method default"
    return values, sources


def resolve_hyperparameters(
    method: type["Method"], training: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainingHyperparameters:
    """The method's hyperparameters: what the user wrote beats the method's paper default, which beats the shared one.

    Each value comes from, in order: the variant's ``overrides``, the config's ``training:`` block, the method
    dataclass's own default (e.g. L2-SP's ``weight_decay = 0``), the :class:`TrainingHyperparameters` default.
    An unknown key raises ``ValueError`` naming it and the allowed keys.
    """
    values, _ = _resolve(method, training, overrides)
    return method.hyperparameters(**values)


def hyperparameter_sources(
    method: type["Method"], training: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Where each of :func:`resolve_hyperparameters`'s values came from: one of :data:`SOURCES` per field."""
    return _resolve(method, training, overrides)[1]


class Method:
    """A fine-tuning method: hooks the shared trainer calls, in this order.

    ``prepare`` (once, before training and again on resume: it must be deterministic) -> per step ``loss`` then
    ``after_step`` -> ``predictor`` for validation -> ``checkpoint_tensors`` for what the run stores.
    ``load_finetuned_state`` turns the stored file back into a full ``ImageClassifier`` state dict.
    """

    name: ClassVar[str] = "full_ft"
    hyperparameters: ClassVar[type[TrainingHyperparameters]] = TrainingHyperparameters
    #: False: the method trains on cached features and never runs the image encoder
    needs_images: ClassVar[bool] = True
    #: True: the method needs the cached features of the train (and validation) split
    needs_features: ClassVar[bool] = False
    #: False: nothing is trained (the reference model itself)
    trains: ClassVar[bool] = True
    #: the file the run directory stores (what ``checkpoint_tensors`` returns); None: nothing stored
    checkpoint_file: ClassVar[str | None] = "model.safetensors"
    #: always keep BatchNorm running statistics frozen (for methods whose stored file holds no encoder buffers);
    #: otherwise the ``norm_statistics`` hyperparameter decides
    freeze_norm_statistics: ClassVar[bool] = False

    def __init__(self, hp: TrainingHyperparameters) -> None:
        self.hp = hp

    # ------------------------------------------------------------------------------------------------ training
    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        """Set what trains, compute anchors/masks/Fisher; may return another module (adapters, CLIP towers)."""
        model.requires_grad_(True)
        return model

    def batch_columns(self, ctx: "TrainContext") -> tuple[str, ...]:
        """What each training batch reads from the caches: ``("pixels",)`` for methods on images, ``("features",)``
        for methods on cached features; ``("pixels", "features")`` puts the rows' features in ``Batch.features``."""
        return ("pixels",) if self.needs_images else ("features",)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters handed to the optimizer."""
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def trainable_count(self, model: nn.Module) -> int:
        """How many scalar weights the method may change (SAFT counts its mask, not whole tensors)."""
        return sum(p.numel() for p in self.trainable_parameters(model).values())

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.freeze_norm_statistics or self.hp.norm_statistics == "frozen":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def loss(self, model: nn.Module, batch: "Batch", ctx: "TrainContext") -> dict[str, Tensor]:
        """Named loss terms, each a mean over the examples of ``batch`` (a micro-batch under accumulation)."""
        return {"ce": ctx.cross_entropy(model(batch.inputs), batch.labels)}

    def step_penalties(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        """Named terms of the weights alone (L2-SP, EWC...): added once per optimizer step, not per micro-batch."""
        return {}

    def accumulate_gradients(self, model: nn.Module, step: "StepBatches", ctx: "TrainContext") -> dict[str, Tensor]:
        """Back-propagate this rank's part of the step's loss; returns that part of each term (detached).

        The step's loss is the mean over its ``step.total`` examples (on every rank) of :meth:`loss` plus
        :meth:`step_penalties`: each micro-batch's mean is weighted by its share of the step, and the penalties by
        1 / ranks, so that the gradients and terms summed over micro-batches and ranks equal one pass over the whole
        batch. A method whose loss is not a mean over examples (FLYP's contrastive loss) overrides this.
        """
        terms: dict[str, Tensor] = {}

        def scaled(parts: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
            return parts if weight == 1.0 else {k: v * weight for k, v in parts.items()}

        def backward(parts: dict[str, Tensor]) -> None:
            if parts:
                sum(parts.values()).backward()
            for k, v in parts.items():
                terms[k] = terms[k] + v.detach() if k in terms else v.detach()

        share = 1.0 / step.group.world_size
        for i, batch in enumerate(step.micro):
            with ctx.autocast():
                parts = scaled(self.loss(model, batch, ctx), len(batch.labels) / step.total)
            if i == len(step.micro) - 1:  # the penalties join the last micro-batch's backward pass
                parts.update(scaled(self.step_penalties(model, ctx), share))
            backward(parts)
        if not step.micro:  # no example on this rank in the step's (short, last) batch
            backward(scaled(self.step_penalties(model, ctx), share))
        return terms

    def after_step(self, model: nn.Module, ctx: "TrainContext") -> None:
        """Called after each optimizer step (e.g. SAFT resets unselected weights)."""

    def predictor(self, model: nn.Module, ctx: "TrainContext") -> Callable[[Tensor], Tensor]:
        """Inputs (normalised pixels, or cached features when ``needs_images`` is False) -> logits, for validation."""
        return model if self.needs_images else model.head

    def summary(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Any]:
        """Method-specific facts recorded in run.json."""
        return {}

    # ------------------------------------------------------------------------------------------------ storage
    def checkpoint_tensors(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        """What the run directory stores (default: the full ``ImageClassifier`` state dict)."""
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def checkpoint_metadata(self, model: nn.Module, ctx: "TrainContext") -> dict[str, str]:
        """String metadata stored in the safetensors header next to ``checkpoint_tensors``."""
        return {}

    @classmethod
    def load_finetuned_state(cls, reference_state: Mapping[str, Tensor], run_dir: str | Path) -> dict[str, Tensor]:
        """The full ``ImageClassifier`` state dict of the fine-tuned model (WiSE-FT interpolates it)."""
        state = load_checkpoint_file(Path(run_dir) / cls.checkpoint_file)
        check_same_keys(reference_state, state, Path(run_dir) / cls.checkpoint_file)
        return state


def load_checkpoint_file(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run's checkpoint is missing (is the run complete?)")
    return load_file(str(path))


def check_same_keys(reference: Mapping[str, Tensor], state: Mapping[str, Tensor], where: Path | str) -> None:
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        raise ValueError(f"{where}: keys differ from the reference model (missing {missing[:3]}, extra {extra[:3]})")


def split_encoder_head(params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(encoder.*, head.*) parts of a named-parameter mapping of an ``ImageClassifier``."""
    encoder = {k: v for k, v in params.items() if k.startswith("encoder.")}
    head = {k: v for k, v in params.items() if k.startswith("head.")}
    return encoder, head


def detached_copy(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


__all__ = [
    "Method",
    "TrainingHyperparameters",
    "SOURCES",
    "hyperparameter",
    "hyperparameter_sources",
    "resolve_hyperparameters",
    "shared_field_names",
    "split_encoder_head",
    "detached_copy",
    "check_same_keys",
    "load_checkpoint_file",
]
