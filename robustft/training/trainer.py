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

import contextlib
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
from robustft.training.context import Batch, Split, StepBatches, TrainContext, derive_seed
from robustft.training.data import Loaded, epoch_order
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
    """Top-1 accuracy of ``method.predictor`` on ``split`` (model in eval mode; train mode restored by the caller).

    With several ranks each evaluates its share of the rows and the counts are summed."""
    model.eval()
    predict = method.predictor(model, ctx)
    correct = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for batch in ctx.batches(split, images=method.needs_images, shard=True):
        with ctx.autocast():
            logits = predict(batch.inputs)
        correct += (logits.float().argmax(-1) == batch.labels).sum()
    ctx.group.all_reduce_([correct])
    return int(correct.item()) / max(1, len(split))


def _check_finite(terms: dict[str, float], step: int, epoch: int) -> None:
    for name, value in terms.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}): term {name!r} = {value}")


def step_batches(ctx: TrainContext, method: "Method", loaded: Loaded | None, total: int,
                 flip_step: int | None) -> StepBatches:
    """This rank's ``loaded`` rows of a step of ``total`` examples, cut into micro-batches of ``micro_batch_size``.

    Flips are drawn for the whole step (seeded by (seed, "flip", step)), so each example gets the same flip whatever
    the micro-batches and ranks. ``loaded`` None: this rank holds no example of the step.
    """
    group = ctx.group
    positions = torch.arange(group.rank, total, group.world_size)  # this rank's rows' places in the whole batch
    if loaded is None:
        return StepBatches([], [], total, group)
    if len(loaded.rows) != len(positions):
        raise RuntimeError(f"rank {group.rank}: {len(loaded.rows)} rows read for a step that gives it {len(positions)}")
    flips = None
    if flip_step is not None:
        flips = (torch.rand(total, generator=ctx.generator("flip", flip_step)) < 0.5)[positions]
    size = ctx.hp.micro_batch_size or len(positions)
    micro, places = [], []
    for s in range(0, len(positions), size):
        part = Loaded(loaded.rows[s : s + size], loaded.labels[s : s + size],
                      {c: t[s : s + size] for c, t in loaded.columns.items()})
        micro.append(ctx.to_batch(part, images=method.needs_images,
                                  flip=None if flips is None else flips[s : s + size]))
        places.append(positions[s : s + size])
    return StepBatches(micro, places, total, group)


def optimizer_step(model: nn.Module, method: "Method", ctx: TrainContext, opt: Optimization, step: StepBatches
                   ) -> dict[str, float]:
    """One optimizer step on ``step`` (gradients accumulated over its micro-batches and summed over the ranks, finite
    check, clipping, AdamW, schedule, ``after_step``): its log row."""
    number, epoch = ctx.step + 1, ctx.epoch
    lr = opt.optimizer.param_groups[0]["lr"]
    opt.optimizer.zero_grad(set_to_none=True)
    local = method.accumulate_gradients(model, step, ctx)
    terms = ctx.group.sum_scalars({k: float(v) for k, v in local.items()})
    _check_finite(terms, number, epoch)  # every rank sees the same sums, so all of them stop together
    total = sum(terms.values())
    _check_finite({"total": total}, number, epoch)
    ctx.group.reduce_gradients(opt.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(opt.params, opt.clip)
    opt.optimizer.step()
    opt.scheduler.step()
    method.after_step(model, ctx)
    row = {"step": number, "epoch": epoch, "lr": lr, "loss": total}
    row.update({f"loss_{k}": v for k, v in terms.items()})
    row.update(grad_norm=float(grad_norm), val_accuracy=float("nan"))
    return row


def norm_buffers(model: nn.Module) -> list[Tensor]:
    """BatchNorm running statistics: rank 0's are copied to every rank after each step (as DDP's broadcast_buffers)."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


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
    resumed mid-epoch sees the same batches as an uninterrupted one. Step i's batch is positions
    [i * batch_size, (i + 1) * batch_size) of that order; with k ranks rank r reads every k-th of them from the r-th
    on (``batch_size / k`` rows). ``after_step(row)`` follows each step.
    """
    hp, group = ctx.hp, ctx.group
    n = len(ctx.train)
    order = epoch_order(n, ctx.generator("order", state.epoch), group.rank, group.world_size)
    flip = method.needs_images and hp.augment == "flip"
    buffers = norm_buffers(model) if group.parallel else []
    method.set_train_mode(model)
    started = time.perf_counter()
    reads = ctx.load(ctx.train, order, hp.batch_size // group.world_size, method.batch_columns(ctx),
                     first_batch=state.position)
    with contextlib.closing(reads):
        for position in range(state.position, steps_per_epoch(n, hp.batch_size)):
            loaded = next(reads, None)  # None: no row of this (short, last) batch falls to this rank
            total = min(hp.batch_size, n - position * hp.batch_size)
            ctx.step, ctx.epoch = state.step, state.epoch
            step = step_batches(ctx, method, loaded, total, state.step if flip else None)
            row = optimizer_step(model, method, ctx, opt, step)
            group.broadcast_(buffers)
            state.step, state.position = state.step + 1, state.position + 1
            row["samples_per_s"] = total / max(time.perf_counter() - started, 1e-9)  # reading included
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

    With several ranks (``ctx.group``) every rank calls this; they read their shares of each batch, sum their
    gradients and stay identical; only rank 0 writes checkpoints, and every rank resumes from them.

    ``on_step_end(step)`` is called after every optimizer step (and after that step's checkpoint, if any); tests
    raise from it to simulate a killed job.
    """
    hp = ctx.hp
    if ctx.fit is None:
        ctx.fit = train  # for methods that train a stage of their own first (TrainContext.fit_stage)
    model = method.prepare(model.to(ctx.device), ctx).to(ctx.device)
    ctx.group.broadcast_([*model.parameters(), *model.buffers()])  # every rank starts from rank 0's weights
    if len(ctx.train) == 0:
        raise ValueError(f"{method.name}: the training split is empty")
    per_epoch = steps_per_epoch(len(ctx.train), hp.batch_size)
    opt = build_optimization(method, model, hp, hp.epochs * per_epoch)
    select_best, has_val = hp.select == "best_val", len(ctx.val) > 0
    if select_best and not has_val:
        raise ValueError("select: best_val needs a non-empty ID validation split")

    checkpoints = ResumeCheckpoints(checkpoint_dir, fingerprint, ctx.device, write=ctx.group.is_main)
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


__all__ = ["BEST_FILE", "RESUME_FILE", "Batch", "BestEpoch", "Split", "StepBatches", "TrainContext", "TrainResult",
           "derive_seed", "evaluate_accuracy", "log_frame", "optimizer_step", "step_batches", "train", "train_epoch"]
