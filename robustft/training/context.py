"""What a method's hooks see: the training context (settings, data, device, backbone) and its batches.

Both sides import this module: the trainer (:mod:`robustft.training.trainer`) builds a :class:`TrainContext`, the
methods (:mod:`robustft.methods`) read it. It imports neither of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.devices import autocast_for
from robustft.distributed import SINGLE, Group
from robustft.training.data import READ_BLOCK_BYTES, Loaded, Split, read_batches


class Batch(NamedTuple):
    """One batch: model inputs on the device, labels, the rows' positions in their split (CPU), and, for a method
    that asks for them (:meth:`robustft.methods.base.Method.batch_columns`), the rows' cached features on the device."""

    inputs: Tensor
    labels: Tensor
    indices: Tensor
    features: Tensor | None = None


@dataclass
class StepBatches:
    """This rank's share of one optimizer step: its micro-batches (of ``micro_batch_size`` examples), the positions
    of their rows in the step's whole batch (over every rank), and that batch's size ``total``.

    A method's loss of the step is a function of the whole batch; :meth:`robustft.methods.base.Method.accumulate_gradients`
    back-propagates this rank's part of it, which the trainer then sums over the ranks.
    """

    micro: list[Batch]
    positions: list[Tensor]
    total: int
    group: Group = SINGLE

    @property
    def size(self) -> int:
        """Examples this rank holds."""
        return sum(len(b.labels) for b in self.micro)


def derive_seed(seed: int, *tags: str | int) -> int:
    """A 63-bit seed determined by ``seed`` and ``tags`` (independent streams for order, flips, templates...)."""
    codes = [zlib.crc32(t.encode()) if isinstance(t, str) else int(t) for t in tags]
    return int(np.random.SeedSequence([int(seed), *codes]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class TrainContext:
    """What hooks may read: hyperparameters, data, device, backbone, class names, the current step.

    ``hp`` is the method's ``TrainingHyperparameters`` (:mod:`robustft.methods.base`). ``group``: this process's
    rank among the run's data-parallel ranks (:data:`robustft.distributed.SINGLE` for one process). ``templates``: the
    backbone's prompt-template set (``backbone.templates`` in the config; FLYP and SAFT read it). ``fit``: the
    trainer, set by it, for a method that trains a stage of its own first (LP-FT's linear probe, :meth:`fit_stage`).
    """

    hp: Any
    seed: int
    device: torch.device
    train: Split
    val: Split
    normalize: Callable[[Tensor], Tensor] | None = None
    backbone: Any = None
    class_names: list[str] = field(default_factory=list)
    prompt_names: list[str] = field(default_factory=list)
    templates: str | None = None
    step: int = 0  #: optimizer steps completed before the current one
    epoch: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    read_block_bytes: int = READ_BLOCK_BYTES
    fit: Callable[..., Any] | None = None
    group: Group = SINGLE  #: the data-parallel ranks of this run (:mod:`robustft.distributed`)

    def with_hp(self, hp: Any) -> "TrainContext":
        return dataclasses.replace(self, hp=hp, state={}, step=0, epoch=0)

    def fit_stage(self, model: nn.Module, method: Any, hp: Any) -> Any:
        """Train ``model`` with ``method`` and settings ``hp`` through the same trainer (no checkpoints); its result."""
        if self.fit is None:
            raise RuntimeError("TrainContext.fit is unset: train through robustft.training.trainer.train")
        return self.fit(model, method, self.with_hp(hp))

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.hp.label_smoothing)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device)

    def generator(self, *tags: str | int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, *tags))

    def load(self, split: Split, order: Tensor, batch_size: int, columns: Sequence[str], first_batch: int = 0
             ) -> Iterator[Loaded]:
        """Batches of ``order`` as read from ``split`` (:func:`robustft.training.data.read_batches`), pinned on CUDA."""
        return read_batches(split, order, batch_size, columns, first_batch=first_batch,
                            block_bytes=self.read_block_bytes, pin=self.device.type == "cuda")

    def to_batch(self, loaded: Loaded, *, images: bool, flip_step: int | None = None, flip: Tensor | None = None
                 ) -> Batch:
        """The :class:`Batch` of ``loaded``: normalised pixels (flipped at random when ``flip_step`` is given, or
        where the boolean ``flip`` says) or features as inputs, and the features too when they were read beside the
        pixels."""
        move = lambda t: t.to(self.device, non_blocking=t.is_pinned())  # noqa: E731
        labels = move(loaded.labels).long()
        features = loaded.columns.get("features")
        features = None if features is None else move(features).float()
        if not images:
            return Batch(features, labels, loaded.rows)
        if self.normalize is None:
            raise ValueError("this method trains on images but no normalisation was given")
        x = self.normalize(move(loaded.columns["pixels"]))
        if flip is None and flip_step is not None:
            flip = torch.rand(len(loaded.rows), generator=self.generator("flip", flip_step)) < 0.5
        if flip is not None:
            x = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x.flip(3), x)
        return Batch(x, labels, loaded.rows, features)

    def batches(
        self,
        split: Split | None = None,
        *,
        images: bool = True,
        batch_size: int | None = None,
        shuffle: str | None = None,
        limit: int | None = None,
        shard: bool = False,
    ) -> Iterator[Batch]:
        """Deterministic passes for ``prepare`` hooks and evaluation, streamed from the split's readers: in row
        order, or in a permutation seeded by tag ``shuffle``; ``limit``: the first ``limit`` rows of that order only;
        ``shard``: this rank's share of those rows only (:meth:`robustft.distributed.Group.shard`; the caller sums
        its result over the ranks)."""
        split = self.train if split is None else split
        n = len(split)
        order = torch.arange(n) if shuffle is None else torch.randperm(n, generator=self.generator(shuffle))
        if limit is not None:
            order = order[:limit]
        if shard:
            order = self.group.shard(order)
        column = "pixels" if images else "features"
        for loaded in self.load(split, order, batch_size or self.hp.eval_batch_size, (column,)):
            yield self.to_batch(loaded, images=images)


__all__ = ["Batch", "Split", "StepBatches", "TrainContext", "derive_seed"]
