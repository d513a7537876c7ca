"""The one training loop every method runs through; methods plug in through the hooks of ``robustft.methods.base``.

AdamW, linear warm-up + cosine lr (wise-ft), gradient clipping with the norm logged, optional label smoothing and
horizontal flips, bf16 autocast on CUDA (fp32 on CPU), per-epoch ID-validation accuracy, best-epoch selection, and
resumable checkpoints. Data order and augmentation are drawn from generators seeded by (seed, epoch) and
(seed, step), and the global RNG states are checkpointed, so a resumed run on CPU is bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.features import autocast_for
from robustft.training.checkpoint import (
    load_resume_checkpoint,
    load_safetensors,
    rng_state,
    save_resume_checkpoint,
    save_safetensors,
    set_rng_state,
)
from robustft.training.schedule import warmup_cosine_scheduler

if TYPE_CHECKING:  # pragma: no cover
    from robustft.methods.base import Method, TrainingHyperparameters

RESUME_FILE = "resume.pt"
BEST_FILE = "best.safetensors"
LOG_COLUMNS = ("step", "epoch", "lr", "loss", "grad_norm", "samples_per_s", "val_accuracy")


class Batch(NamedTuple):
    """One training batch: model inputs on the device, labels, and row positions in the training split (CPU)."""

    inputs: Tensor
    labels: Tensor
    indices: Tensor


@dataclass
class Split:
    """Labels with the inputs a method may use: uint8 pixels (N, H, W, 3) and/or cached features (N, D)."""

    labels: Tensor
    pixels: Tensor | None = None
    features: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, indices: np.ndarray | Tensor) -> "Split":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Split(self.labels[idx], pick(self.pixels), pick(self.features))


def _to_host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` in CPU memory (as a resumed run's best-epoch tensors, read back from disk, already are)."""
    return {k: v.detach().cpu() for k, v in tensors.items()}


def derive_seed(seed: int, *tags: str | int) -> int:
    """A 63-bit seed determined by ``seed`` and ``tags`` (independent streams for order, flips, templates...)."""
    codes = [zlib.crc32(t.encode()) if isinstance(t, str) else int(t) for t in tags]
    return int(np.random.SeedSequence([int(seed), *codes]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class TrainContext:
    """What hooks may read: hyperparameters, data, device, backbone, class names, the current step."""

    hp: "TrainingHyperparameters"
    seed: int
    device: torch.device
    train: Split
    val: Split
    normalize: Callable[[Tensor], Tensor] | None = None
    backbone: Any = None
    class_names: list[str] = field(default_factory=list)
    prompt_names: list[str] = field(default_factory=list)
    progress: bool = False
    step: int = 0  #: optimizer steps completed before the current one
    epoch: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    def with_hp(self, hp: "TrainingHyperparameters") -> "TrainContext":
        return dataclasses.replace(self, hp=hp, state={})

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.hp.label_smoothing)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device)

    def generator(self, *tags: str | int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, *tags))

    def make_batch(self, split: Split, rows: Tensor, *, images: bool, flip_step: int | None = None) -> Batch:
        """Inputs for ``rows``: normalised pixels (flipped at random when ``flip_step`` is given) or features."""
        labels = split.labels[rows].to(self.device, torch.long)
        if images:
            if split.pixels is None or self.normalize is None:
                raise ValueError("this method trains on images but no pixels were given")
            x = self.normalize(split.pixels[rows].to(self.device))
            if flip_step is not None:
                flip = torch.rand(len(rows), generator=self.generator("flip", flip_step)) < 0.5
                x = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x.flip(3), x)
        else:
            if split.features is None:
                raise ValueError("this method trains on cached features but none were given")
            x = split.features[rows].to(self.device, torch.float32)
        return Batch(x, labels, rows)

    def batches(
        self, split: Split | None = None, *, images: bool = True, batch_size: int | None = None, shuffle: str | None = None
    ) -> Iterator[Batch]:
        """Deterministic passes for ``prepare`` hooks and evaluation: in row order, or shuffled by tag ``shuffle``."""
        split = self.train if split is None else split
        n = len(split)
        size = batch_size or self.hp.eval_batch_size
        order = torch.arange(n) if shuffle is None else torch.randperm(n, generator=self.generator(shuffle))
        for start in range(0, n, size):
            yield self.make_batch(split, order[start : start + size], images=images)


@dataclass
class TrainResult:
    model: nn.Module
    tensors: dict[str, Tensor]  #: the method's checkpoint tensors of the selected epoch
    metadata: dict[str, str]
    log: pd.DataFrame
    best_epoch: int | None
    best_val_accuracy: float | None
    last_val_accuracy: float | None
    steps: int
    resumed_at_step: int | None


@torch.no_grad()
def evaluate_accuracy(method: "Method", model: nn.Module, ctx: TrainContext, split: Split) -> float:
    """Top-1 accuracy of ``method.predictor`` on ``split`` (model in eval mode; train mode restored by the caller)."""
    model.eval()
    predict = method.predictor(model, ctx)
    correct = 0
    for batch in ctx.batches(split, images=method.needs_images):
        with ctx.autocast():
            logits = predict(batch.inputs)
        correct += int((logits.float().argmax(-1) == batch.labels).sum())
    return correct / max(1, len(split))


def _check_finite(terms: dict[str, Tensor], step: int, epoch: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value.detach()).all():
            raise FloatingPointError(
                f"non-finite loss at step {step} (epoch {epoch}): term {name!r} = {value.detach().float().item()}"
            )


def train(
    model: nn.Module,
    method: "Method",
    ctx: TrainContext,
    *,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    on_step_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Prepare ``model`` with ``method`` and train it on ``ctx.train``; resumes from ``checkpoint_dir`` if possible.

    ``on_step_end(step)`` is called after every optimizer step (and after that step's checkpoint, if any); tests
    raise from it to simulate a killed job.
    """
    hp = ctx.hp
    model = method.prepare(model.to(ctx.device), ctx).to(ctx.device)
    params = method.trainable_parameters(model)
    if not params:
        raise ValueError(f"{method.name}: no trainable parameters")
    n = len(ctx.train)
    if n == 0:
        raise ValueError(f"{method.name}: the training split is empty")
    steps_per_epoch = math.ceil(n / hp.batch_size)
    total_steps = hp.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(list(params.values()), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, hp.warmup_steps, total_steps)
    select_best = hp.select == "best_val"
    has_val = len(ctx.val) > 0
    if select_best and not has_val:
        raise ValueError("select: best_val needs a non-empty ID validation split")

    log: list[dict[str, float]] = []
    step, epoch, position = 0, 0, 0
    best_val: float | None = None
    best_epoch: int | None = None
    best_tensors: dict[str, Tensor] | None = None
    resumed_at: int | None = None
    resume_path = checkpoint_dir / RESUME_FILE if checkpoint_dir else None
    best_path = checkpoint_dir / BEST_FILE if checkpoint_dir else None
    if resume_path is not None and (saved := load_resume_checkpoint(resume_path, fingerprint)) is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"], ctx.device)
        step, epoch, position = saved["step"], saved["epoch"], saved["position"]
        log = list(saved["log"])
        best_val, best_epoch = saved["best_val"], saved["best_epoch"]
        if select_best and best_epoch is not None:
            best_tensors = load_safetensors(best_path)
        resumed_at = step

    def checkpoint(next_epoch: int, next_position: int) -> None:
        save_resume_checkpoint(
            resume_path,
            {
                "fingerprint": fingerprint,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(ctx.device),
                "step": step,
                "epoch": next_epoch,
                "position": next_position,
                "log": log,
                "best_val": best_val,
                "best_epoch": best_epoch,
            },
        )

    clip = hp.grad_clip if hp.grad_clip > 0 else float("inf")
    flip = method.needs_images and hp.augment == "flip"
    progress = _progress_bar(total_steps, step, method.name, ctx.progress)
    last_val: float | None = None
    try:
        while epoch < hp.epochs:
            order = torch.randperm(n, generator=ctx.generator("order", epoch))
            method.set_train_mode(model)
            for b in range(position, steps_per_epoch):
                start = time.perf_counter()
                ctx.step, ctx.epoch = step, epoch
                rows = order[b * hp.batch_size : (b + 1) * hp.batch_size]
                batch = ctx.make_batch(ctx.train, rows, images=method.needs_images, flip_step=step if flip else None)
                lr = optimizer.param_groups[0]["lr"]
                with ctx.autocast():
                    terms = method.loss(model, batch, ctx)
                _check_finite(terms, step + 1, epoch)
                total = sum(terms.values())
                _check_finite({"total": total}, step + 1, epoch)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
                optimizer.step()
                scheduler.step()
                method.after_step(model, ctx)
                step += 1
                row = {"step": step, "epoch": epoch, "lr": lr, "loss": float(total.detach())}
                row.update({f"loss_{k}": float(v.detach()) for k, v in terms.items()})
                row.update(grad_norm=float(grad_norm), val_accuracy=float("nan"))
                row["samples_per_s"] = len(rows) / max(time.perf_counter() - start, 1e-9)
                log.append(row)
                progress.update(1)
                progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                if resume_path and hp.checkpoint_every and step % hp.checkpoint_every == 0 and b + 1 < steps_per_epoch:
                    checkpoint(epoch, b + 1)
                if on_step_end is not None:
                    on_step_end(step)
            if has_val:
                last_val = evaluate_accuracy(method, model, ctx, ctx.val)
                log[-1]["val_accuracy"] = last_val
                if select_best and (best_val is None or last_val > best_val):
                    best_val, best_epoch = last_val, epoch
                    best_tensors = _to_host(method.checkpoint_tensors(model, ctx))  # not a second model on the GPU
                    if best_path is not None:
                        save_safetensors(best_path, best_tensors)
            epoch, position = epoch + 1, 0
            if resume_path:
                checkpoint(epoch, 0)
    finally:
        progress.close()

    method.set_train_mode(model)
    model.eval()
    tensors = best_tensors if select_best and best_tensors is not None else _to_host(method.checkpoint_tensors(model, ctx))
    if has_val and last_val is None and log:  # resumed after the last epoch had ended
        last_val = log[-1]["val_accuracy"]
    if not select_best:
        best_epoch = hp.epochs - 1 if hp.epochs else None
        best_val = last_val
    return TrainResult(
        model=model,
        tensors=tensors,
        metadata=method.checkpoint_metadata(model, ctx),
        log=log_frame(log),
        best_epoch=best_epoch,
        best_val_accuracy=best_val,
        last_val_accuracy=last_val,
        steps=step,
        resumed_at_step=resumed_at,
    )


def log_frame(rows: list[dict[str, float]]) -> pd.DataFrame:
    """The per-step log as a table: the fixed columns first, then one ``loss_<term>`` column per loss term."""
    terms = sorted({k for row in rows for k in row if k.startswith("loss_")})
    columns = ["step", "epoch", "lr", *terms, "loss", "grad_norm", "samples_per_s", "val_accuracy"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"step": "int64", "epoch": "int64"}) if len(frame) else frame


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, disable=not enabled, dynamic_ncols=True)
