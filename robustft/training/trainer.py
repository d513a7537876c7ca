"""The one training loop every method runs through; methods plug in through the hooks of ``robustft.methods.base``.

AdamW, linear warm-up + cosine lr (wise-ft), gradient clipping with the norm logged, optional label smoothing and
horizontal flips, bf16 autocast on CUDA (fp32 on CPU), per-epoch ID-validation accuracy, best-epoch selection, and
resumable checkpoints. Data are streamed from the caches (:mod:`robustft.training.data`) in an order drawn from
generators seeded by (seed, epoch); flips by (seed, step). The global RNG states are checkpointed, so a resumed run
on CPU is bit-identical to an uninterrupted one.

The pieces, each usable alone: :func:`build_optimization`, :func:`train_epoch` (the step loop),
:func:`optimizer_step`, :class:`BestEpoch` and :func:`kept_weights` (epoch selection),
:class:`~robustft.training.checkpoint.ResumeCheckpoints` (resume and checkpointing); :func:`train` puts them together.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import pandas as pd
import torch
from torch import Tensor, nn

from robustft.io.progress import ProgressLog
from robustft.training.checkpoint import BEST_FILE, RESUME_FILE, ResumeCheckpoints, TrainState
from robustft.training.context import Batch, Split, TrainContext, derive_seed
from robustft.training.data import epoch_order
from robustft.training.schedule import warmup_cosine_scheduler

if TYPE_CHECKING:  # pragma: no cover
    from robustft.methods.base import Method

LOG_COLUMNS = ("step", "epoch", "lr", "loss", "grad_norm", "samples_per_s", "val_accuracy")


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


class Optimization(NamedTuple):
    """What an optimizer step updates: the trainable parameters, AdamW, the lr schedule and the clipping norm."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    clip: float


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def build_optimization(method: "Method", model: nn.Module, hp, total_steps: int) -> Optimization:
    """AdamW over ``method.trainable_parameters`` with the warm-up + cosine schedule over ``total_steps``."""
    params = list(method.trainable_parameters(model).values())
    if not params:
        raise ValueError(f"{method.name}: no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, hp.warmup_steps, total_steps)
    return Optimization(params, optimizer, scheduler, hp.grad_clip if hp.grad_clip > 0 else float("inf"))


def _to_host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` in CPU memory (as a resumed run's best-epoch tensors, read back from disk, already are)."""
    return {k: v.detach().cpu() for k, v in tensors.items()}


@dataclass
class BestEpoch:
    """Epoch selection on ID-validation accuracy: the first epoch with the highest accuracy (a tie keeps the earlier).

    ``tensors`` are the method's checkpoint tensors of that epoch, in host memory (not a second model on the GPU).
    """

    accuracy: float | None = None
    epoch: int | None = None
    tensors: dict[str, Tensor] | None = None

    def offer(self, epoch: int, accuracy: float, tensors: Callable[[], dict[str, Tensor]]) -> bool:
        """Keep ``epoch`` if it beats the best so far (``tensors()`` is called only then); whether it was kept."""
        if self.accuracy is not None and accuracy <= self.accuracy:
            return False
        self.accuracy, self.epoch, self.tensors = accuracy, epoch, _to_host(tensors())
        return True


def kept_weights(method: "Method", model: nn.Module, ctx: TrainContext, best: BestEpoch, last_val: float | None
                 ) -> tuple[dict[str, Tensor], int | None, float | None]:
    """The checkpoint tensors a run keeps, with their epoch and ID-validation accuracy: the best epoch's under
    ``select: best_val``, the final weights under ``select: last`` (and when no epoch ran)."""
    if ctx.hp.select == "best_val" and best.tensors is not None:
        return best.tensors, best.epoch, best.accuracy
    final = _to_host(method.checkpoint_tensors(model, ctx))
    if ctx.hp.select == "best_val":
        return final, None, None
    return final, (ctx.hp.epochs - 1 if ctx.hp.epochs else None), last_val


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


def optimizer_step(model: nn.Module, method: "Method", ctx: TrainContext, opt: Optimization, batch: Batch
                   ) -> dict[str, float]:
    """One step on ``batch`` (loss, finite check, backward, clipping, AdamW, schedule, ``after_step``): its log row."""
    step, epoch = ctx.step + 1, ctx.epoch
    lr = opt.optimizer.param_groups[0]["lr"]
    with ctx.autocast():
        terms = method.loss(model, batch, ctx)
    _check_finite(terms, step, epoch)
    total = sum(terms.values())
    _check_finite({"total": total}, step, epoch)
    opt.optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(opt.params, opt.clip)
    opt.optimizer.step()
    opt.scheduler.step()
    method.after_step(model, ctx)
    row = {"step": step, "epoch": epoch, "lr": lr, "loss": float(total.detach())}
    row.update({f"loss_{k}": float(v.detach()) for k, v in terms.items()})
    row.update(grad_norm=float(grad_norm), val_accuracy=float("nan"))
    return row


def train_epoch(
    model: nn.Module,
    method: "Method",
    ctx: TrainContext,
    opt: Optimization,
    state: TrainState,
    after_step: Callable[[dict[str, float]], None] = lambda row: None,
) -> None:
    """The step loop over epoch ``state.epoch`` from batch ``state.position`` on; ``state`` advances step by step.

    The batches are those of :func:`~robustft.training.data.epoch_order` seeded by (seed, "order", epoch), so a run
    resumed mid-epoch sees the same batches as an uninterrupted one. ``after_step(row)`` follows each step.
    """
    hp = ctx.hp
    order = epoch_order(len(ctx.train), ctx.generator("order", state.epoch))
    flip = method.needs_images and hp.augment == "flip"
    method.set_train_mode(model)
    started = time.perf_counter()
    for loaded in ctx.load(ctx.train, order, hp.batch_size, method.batch_columns(ctx), first_batch=state.position):
        ctx.step, ctx.epoch = state.step, state.epoch
        batch = ctx.to_batch(loaded, images=method.needs_images, flip_step=state.step if flip else None)
        row = optimizer_step(model, method, ctx, opt, batch)
        state.step, state.position = state.step + 1, state.position + 1
        row["samples_per_s"] = len(loaded.rows) / max(time.perf_counter() - started, 1e-9)  # reading included
        state.log.append(row)
        after_step(row)
        started = time.perf_counter()


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
    if ctx.fit is None:
        ctx.fit = train  # for methods that train a stage of their own first (TrainContext.fit_stage)
    model = method.prepare(model.to(ctx.device), ctx).to(ctx.device)
    if len(ctx.train) == 0:
        raise ValueError(f"{method.name}: the training split is empty")
    per_epoch = steps_per_epoch(len(ctx.train), hp.batch_size)
    opt = build_optimization(method, model, hp, hp.epochs * per_epoch)
    select_best, has_val = hp.select == "best_val", len(ctx.val) > 0
    if select_best and not has_val:
        raise ValueError("select: best_val needs a non-empty ID validation split")

    checkpoints = ResumeCheckpoints(checkpoint_dir, fingerprint, ctx.device)
    restored = checkpoints.restore(model, opt.optimizer, opt.scheduler)
    state = restored or TrainState()
    resumed_at = None if restored is None else state.step
    best = BestEpoch(state.best_val, state.best_epoch)
    if select_best and state.best_epoch is not None:
        best.tensors = checkpoints.load_best()
    progress = ProgressLog(f"finetune {method.name}", hp.epochs * per_epoch, "steps", start=state.step)
    if restored is not None:
        progress.note("resumed at step %d (epoch %d, batch %d)", state.step, state.epoch, state.position)

    def after_step(row: dict[str, float]) -> None:
        progress.update(1, loss=row["loss"])
        if hp.checkpoint_every and state.step % hp.checkpoint_every == 0 and state.position < per_epoch:
            checkpoints.save(state, model, opt.optimizer, opt.scheduler)
        if on_step_end is not None:
            on_step_end(state.step)

    last_val: float | None = None
    while state.epoch < hp.epochs:
        train_epoch(model, method, ctx, opt, state, after_step)
        if has_val:
            last_val = state.log[-1]["val_accuracy"] = evaluate_accuracy(method, model, ctx, ctx.val)
            progress.note("epoch %d/%d: ID-validation accuracy %.4f", state.epoch + 1, hp.epochs, last_val)
            if select_best and best.offer(state.epoch, last_val, lambda: method.checkpoint_tensors(model, ctx)):
                checkpoints.save_best(best.tensors)
        state.best_val, state.best_epoch = best.accuracy, best.epoch
        state.epoch, state.position = state.epoch + 1, 0
        checkpoints.save(state, model, opt.optimizer, opt.scheduler)
    progress.finish()

    method.set_train_mode(model)
    model.eval()
    if has_val and last_val is None and state.log:  # resumed after the last epoch had ended
        last_val = state.log[-1]["val_accuracy"]
    tensors, best_epoch, best_val = kept_weights(method, model, ctx, best, last_val)
    return TrainResult(
        model=model, tensors=tensors, metadata=method.checkpoint_metadata(model, ctx), log=log_frame(state.log),
        best_epoch=best_epoch, best_val_accuracy=best_val, last_val_accuracy=last_val, steps=state.step,
        resumed_at_step=resumed_at,
    )


def log_frame(rows: list[dict[str, float]]) -> pd.DataFrame:
    """The per-step log as a table: the fixed columns first, then one ``loss_<term>`` column per loss term."""
    terms = sorted({k for row in rows for k in row if k.startswith("loss_")})
    columns = ["step", "epoch", "lr", *terms, "loss", "grad_norm", "samples_per_s", "val_accuracy"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"step": "int64", "epoch": "int64"}) if len(frame) else frame


__all__ = ["BEST_FILE", "RESUME_FILE", "Batch", "BestEpoch", "Split", "TrainContext", "TrainResult", "derive_seed",
           "evaluate_accuracy", "log_frame", "optimizer_step", "train", "train_epoch"]
