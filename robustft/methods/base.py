"""What every fine-tuning method is to the shared trainer: a hyperparameter dataclass and a few hooks.

A method module defines one :class:`Method` subclass and one :class:`TrainingHyperparameters` subclass holding its
own hyperparameters with the paper's defaults. The trainer (:mod:`robustft.training.trainer`) only calls the hooks;
it never asks which method it is running.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.trainer import Batch, TrainContext

PROTOCOL_KINDS = ("full", "kshot", "class_subset")


@dataclass
class TrainingHyperparameters:
    """Settings of the shared trainer (the config's ``training:`` block).

    Defaults follow WiSE-FT end-to-end fine-tuning (``mlfoundations/wise-ft`` ``src/models/finetune.py``, App. D.2):
    AdamW, lr 3e-5, weight decay 0.1, cosine schedule with 500 warm-up steps, gradient clipping at 1.0, 10 epochs,
    batch 512, no label smoothing, no augmentation beyond the preprocessing.
    """

    epochs: int = 10
    batch_size: int = 512
    lr: float = 3e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float | None = 1.0  #: max global gradient norm; 0 or None: no clipping (the norm is still logged)
    label_smoothing: float = 0.0
    augment: str = "none"  #: "none" or "flip" (random horizontal flip); ignored on cached features
    select: str = "best_val"  #: "best_val" (epoch with the best ID-validation accuracy) or "last"
    checkpoint_every: int = 0  #: also write a resumable checkpoint every this many steps (0: epoch ends only)
    eval_batch_size: int = 256
    #: {"kind": "full"} | {"kind": "kshot", "k": 16[, "seed": s]} | {"kind": "class_subset", "absent_classes": [...]}
    protocol: dict = field(default_factory=lambda: {"kind": "full"})

    def __post_init__(self) -> None:
        if self.augment not in ("none", "flip"):
            raise ValueError(f"augment: expected 'none' or 'flip', got {self.augment!r}")
        if self.select not in ("best_val", "last"):
            raise ValueError(f"select: expected 'best_val' or 'last', got {self.select!r}")
        for name in ("epochs", "batch_size", "warmup_steps", "checkpoint_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                setattr(self, name, value := int(value))
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be at least 1")
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


def resolve_hyperparameters(
    method: type["Method"], training: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainingHyperparameters:
    """Shared trainer defaults ⊕ the ``training:`` block ⊕ the method dataclass's own defaults ⊕ variant overrides.

    A method dataclass that re-declares a shared field with another default (e.g. ``weight_decay = 0`` for the
    anchor penalties) wins over the ``training:`` block; the variant's overrides win over everything. An unknown
    key raises ``ValueError`` naming it and the allowed keys.
    """
    cls = method.hyperparameters
    fields = {f.name: f for f in dataclasses.fields(cls)}
    shared = {f.name: _default(f) for f in dataclasses.fields(TrainingHyperparameters)}
    for where, given, allowed in (
        ("training", training or {}, shared),
        (f"methods.{method.name}", overrides or {}, fields),
    ):
        for key in given:
            if key not in allowed:
                raise ValueError(
                    f"{where}: unknown hyperparameter {key!r} for method {method.name!r}; allowed: {sorted(allowed)}"
                )
    values = {name: _default(f) for name, f in fields.items()}
    method_own = {k for k, v in values.items() if k in shared and v != shared[k]}
    values.update({k: v for k, v in (training or {}).items() if k not in method_own})
    values.update(overrides or {})
    return cls(**values)


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
    #: keep BatchNorm running statistics frozen (for methods whose stored file holds no encoder buffers)
    freeze_norm_statistics: ClassVar[bool] = False

    def __init__(self, hp: TrainingHyperparameters) -> None:
        self.hp = hp

    # ------------------------------------------------------------------------------------------------ training
    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        """Set what trains, compute anchors/masks/Fisher; may return another module (adapters, CLIP towers)."""
        model.requires_grad_(True)
        return model

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters handed to the optimizer."""
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def trainable_count(self, model: nn.Module) -> int:
        """How many scalar weights the method may change (SAFT counts its mask, not whole tensors)."""
        return sum(p.numel() for p in self.trainable_parameters(model).values())

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.freeze_norm_statistics:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def loss(self, model: nn.Module, batch: "Batch", ctx: "TrainContext") -> dict[str, Tensor]:
        """Named loss terms; the trainer back-propagates their sum."""
        return {"ce": ctx.cross_entropy(model(batch.inputs), batch.labels)}

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
    "resolve_hyperparameters",
    "shared_field_names",
    "split_encoder_head",
    "detached_copy",
    "check_same_keys",
    "load_checkpoint_file",
]
