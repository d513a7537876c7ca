"""SAFT, sparse adaptation for fine-tuning (Nam et al. 2024, arXiv 2407.03036): update only ~0.1% of the weights.

Selection as the unofficial code (``ayush939/FineTuneCLIP`` ``saft.py``): gradients of the cross-entropy are summed
over the whole training set (one pass, eval mode, fixed order), divided by N, and their magnitude |ḡ| scored; the
global top ``fraction`` (default 0.001) of all candidate parameters becomes a boolean mask m. During training the
gradients are masked and, after each optimizer step, θ ← m⊙θ + ¬m⊙θ₀ (as the unofficial code) so unselected weights
stay bit-identical (AdamW's weight decay would otherwise move them). BatchNorm running statistics are frozen, so the
buffers stay pre-trained too. The unofficial code uses lr 5e-6, wd 0.1, batch 512, 100 epochs; those are left to
the config.

Candidates (``towers``):

- ``both`` (default on open_clip backbones, as the SAFT code): both CLIP towers. The classifier is the zero-shot head
  computed from the text tower at every step, logits = normalize(image) · Wᵀ with
  W = s · normalize(mean_t normalize(text(t.format(c)))) over the reference head's template set
  (``TrainContext.templates``), s = exp(logit_scale) of the pre-trained model, fixed (the SAFT code: 100 · cosine
  with the one template "a photo of a {c}."; ``logit_scale`` is no candidate). At the start this classifier *is*
  the reference model. Scores of the text tower use one backward pass through it: the text embeddings E depend on
  the text tower only, so Σ_batches ∂L/∂θ_text = (Σ_batches ∂L/∂E)·∂E/∂θ_text. While training, all C·T prompts go
  through the text tower every step in chunks of ``batch_size``, each recomputed in the backward pass (activation
  checkpointing), so memory holds one chunk's activations; the compute is C·T sequences twice forward and once
  backward per step (README "Methods" gives the cost on ImageNet). When no text parameter is selected the text
  tower never runs and the head stays the reference head.
- ``image`` (the only choice for classifier backbones): the image encoder and the linear head.

The run stores a sparse update of the image encoder (and, with ``image``, the head): ``<param>.indices`` (flat
int64 positions) and ``<param>.values`` (the fine-tuned values there: assigning them rebuilds the weights exactly,
which adding a float delta would not). With ``both`` and a selected text parameter it also stores the full
``head.weight`` / ``head.bias`` rebuilt from the fine-tuned text tower (as FLYP), since one text weight moves every
class's head row; WiSE-FT then interpolates heads built from one template set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from robustft.methods.base import Method, TrainingHyperparameters, hyperparameter, load_checkpoint_file
from robustft.methods.clip_towers import (
    build_clip_for,
    class_prompts,
    clip_predictor,
    head_from_text_embeddings,
    reference_templates,
    stored_head,
)

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import TrainContext

TOWERS = ("both", "image")
HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class SAFTHyperparameters(TrainingHyperparameters):
    fraction: float = hyperparameter(
        0.001, "Fraction of parameters updated, by top gradient magnitude (SAFT paper 0.1%).",
        exclusiveMinimum=0, maximum=1)
    towers: str | None = hyperparameter(
        None, "Candidate parameters: both (both CLIP towers, classifier = zero-shot head recomputed from the text "
        "tower over backbone.templates each step, as the SAFT code; open_clip only; C x templates prompts per step) "
        "or image (image encoder and linear head); null = both on open_clip, image otherwise.",
        enum=["both", "image", None])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction: expected a value in (0, 1], got {self.fraction}")
        if self.towers is not None and self.towers not in TOWERS:
            raise ValueError(f"towers: expected one of {list(TOWERS)} or null, got {self.towers!r}")


def pass_size(ctx: "TrainContext") -> int:
    """Examples (or prompts) per forward pass: the micro-batch size when gradients accumulate, else the batch's."""
    return ctx.hp.micro_batch_size or ctx.hp.batch_size // ctx.hp.devices


def top_fraction_masks(scores: Mapping[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """Boolean masks selecting the global top ``fraction`` of all entries of ``scores`` (at least one entry)."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float() for n in names])
    k = max(1, round(fraction * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = chosen[start : start + size].view_as(scores[n])
        start += size
    return masks


class SaftClip(nn.Module):
    """Both CLIP towers as a classifier: logits = normalize(image) · W(text)ᵀ, W the zero-shot head of ``tokens``
    (class-major prompts, T per class) at the pre-trained scale; ``head`` (the reference head) replaces W while
    ``text_trains`` is False."""

    def __init__(self, clip: nn.Module, tokens: Tensor, num_classes: int, head: nn.Module, chunk: int) -> None:
        super().__init__()
        self.clip = clip
        self.head = head
        self.register_buffer("tokens", tokens, persistent=False)
        self.num_classes = num_classes
        self.scale = float(clip.logit_scale.detach().exp())
        self.chunk = chunk
        self.text_trains = True

    def text_embeddings(self) -> Tensor:
        """(C·T, D) embeddings of every prompt, in chunks; each recomputed in backward when gradients are on."""
        encode = self.clip.encode_text
        grad = torch.is_grad_enabled()
        chunks = [
            checkpoint(encode, self.tokens[s : s + self.chunk], use_reentrant=False) if grad
            else encode(self.tokens[s : s + self.chunk])
            for s in range(0, len(self.tokens), self.chunk)
        ]
        return torch.cat(chunks)

    def logits(self, image: Tensor, embeddings: Tensor) -> Tensor:
        weights = head_from_text_embeddings(embeddings, self.num_classes, self.scale)
        return F.normalize(image.float(), dim=-1) @ weights.T

    def forward(self, pixels: Tensor) -> Tensor:
        image = self.clip.encode_image(pixels)
        if not self.text_trains:
            return self.head(image.float())
        return self.logits(image, self.text_embeddings())


class SAFT(Method):
    name = "saft"
    hyperparameters = SAFTHyperparameters
    checkpoint_file = "sparse_update.safetensors"
    freeze_norm_statistics = True

    def gradient_scores(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        """|Σ_batches ∇ CE_sum / N| per parameter of an ``ImageClassifier`` (pre-trained model in eval mode)."""
        params = dict(model.named_parameters())
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = model.training
        model.eval()
        try:
            for batch in ctx.batches(images=True, batch_size=pass_size(ctx), shard=True):
                with ctx.autocast():
                    logits = model(batch.inputs)
                loss = F.cross_entropy(logits.float(), batch.labels, reduction="sum")
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        sums[n].add_(g)
        finally:
            model.train(was_training)
        ctx.group.all_reduce_(list(sums.values()))  # each rank scored its share of the rows
        return {n: (s / len(ctx.train)).abs() for n, s in sums.items()}

    def clip_gradient_scores(self, model: SaftClip, ctx: "TrainContext") -> dict[str, Tensor]:
        """As :meth:`gradient_scores` over both towers of ``model``; the text tower's through one backward pass."""
        params = {n: p for n, p in model.named_parameters() if n.startswith("clip.") and n != "clip.logit_scale"}
        image_params = {n: p for n, p in params.items() if n.startswith("clip.visual.")}
        text_params = {n: p for n, p in params.items() if n not in image_params}
        sums = {n: torch.zeros_like(p) for n, p in params.items()}

        def accumulate(names, grads) -> None:
            for n, g in zip(names, grads):
                if g is not None:
                    sums[n].add_(g)

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), ctx.autocast():
                embeddings = model.text_embeddings().float()
            embeddings.requires_grad_(True)
            embedding_grad = torch.zeros_like(embeddings)
            for batch in ctx.batches(images=True, batch_size=pass_size(ctx), shard=True):
                with ctx.autocast():
                    image = model.clip.encode_image(batch.inputs)
                loss = F.cross_entropy(model.logits(image, embeddings), batch.labels, reduction="sum")
                *grads, grad_e = torch.autograd.grad(loss, [*image_params.values(), embeddings], allow_unused=True)
                accumulate(image_params, grads)
                embedding_grad.add_(grad_e)
            # each rank scored its share of the rows; every rank then runs the (same) text backward pass
            ctx.group.all_reduce_([embedding_grad, *(sums[n] for n in image_params)])
            for s in range(0, len(model.tokens), model.chunk):
                with ctx.autocast():
                    chunk = model.clip.encode_text(model.tokens[s : s + model.chunk]).float()
                grads = torch.autograd.grad(chunk, list(text_params.values()),
                                            grad_outputs=embedding_grad[s : s + model.chunk], allow_unused=True)
                accumulate(text_params, grads)
        finally:
            model.train(was_training)
        return {n: (s / len(ctx.train)).abs() for n, s in sums.items()}

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        from robustft.backbones.templates import get_templates

        has_text = callable(getattr(ctx.backbone, "build_clip", None))
        self.towers = self.hp.towers or ("both" if has_text else "image")
        model.requires_grad_(True)
        if self.towers == "both":
            clip, self.tokenizer = build_clip_for(ctx, "saft towers 'both' selects over CLIP's text tower too")
            self.templates = get_templates(reference_templates(ctx))
            self.prompt_names = list(ctx.prompt_names or ctx.class_names)
            tokens = self.tokenizer(class_prompts(self.prompt_names, self.templates))
            head = model.head
            model.cpu()  # the ImageClassifier's encoder is not trained (the CLIP model's visual tower is): off the GPU
            model = SaftClip(clip, tokens, len(self.prompt_names), head, pass_size(ctx)).to(ctx.device)
            model.requires_grad_(True)
            scores = self.clip_gradient_scores(model, ctx)
        else:
            scores = self.gradient_scores(model, ctx)
        masks = top_fraction_masks(scores, self.hp.fraction)
        self.masks = {n: m for n, m in masks.items() if bool(m.any())}
        self.anchor: dict[str, Tensor] = {}
        self.total = sum(m.numel() for m in masks.values())
        for name, p in model.named_parameters():
            if name in self.masks:
                mask = self.masks[name]
                self.anchor[name] = p.detach().clone()
                p.register_hook(lambda grad, mask=mask: grad.masked_fill(~mask, 0))
            else:
                p.requires_grad_(False)
        if isinstance(model, SaftClip):
            model.text_trains = any(not n.startswith("clip.visual.") for n in self.masks)
        return model

    def trainable_count(self, model: nn.Module) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @torch.no_grad()
    def after_step(self, model: nn.Module, ctx: "TrainContext") -> None:
        for name, p in model.named_parameters():
            if name in self.masks:
                p.copy_(torch.where(self.masks[name], p, self.anchor[name]))

    def _text_head(self, model: SaftClip) -> dict[str, Tensor]:
        return stored_head(model.clip, self.tokenizer, self.prompt_names, self.templates)

    def predictor(self, model: nn.Module, ctx: "TrainContext") -> Callable[[Tensor], Tensor]:
        if isinstance(model, SaftClip) and model.text_trains:
            return clip_predictor(model.clip, self._text_head(model))  # the head once, not per batch
        return model

    def checkpoint_tensors(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        params = dict(model.named_parameters())
        out = {}
        for name, mask in self.masks.items():
            if isinstance(model, SaftClip):
                if not name.startswith("clip.visual."):
                    continue
                key = f"encoder.{name.removeprefix('clip.')}"  # clip.visual.* -> the ImageClassifier's encoder.visual.*
            else:
                key = name
            indices = mask.flatten().nonzero().flatten()
            out[f"{key}.indices"] = indices.to(torch.int64)
            out[f"{key}.values"] = params[name].detach().flatten()[indices].clone()
        if isinstance(model, SaftClip) and model.text_trains:
            out.update(self._text_head(model))
        return out

    def summary(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Any]:
        selected = self.trainable_count(model)
        info = {"towers": self.towers, "selected_parameters": selected, "selected_fraction": selected / self.total,
                "tensors_with_selection": len(self.masks)}
        if isinstance(model, SaftClip):
            info["selected_text_parameters"] = sum(
                int(m.sum()) for n, m in self.masks.items() if not n.startswith("clip.visual.")
            )
            info["templates"] = len(self.templates)
        return info

    @classmethod
    def load_finetuned_state(cls, reference_state: Mapping[str, Tensor], run_dir: str | Path) -> dict[str, Tensor]:
        path = Path(run_dir) / cls.checkpoint_file
        stored = load_checkpoint_file(path)
        state = {k: v.clone() for k, v in reference_state.items()}
        for key, value in stored.items():
            if key in HEAD_KEYS:
                if key not in state or value.shape != state[key].shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the reference model "
                                     f"{tuple(state[key].shape) if key in state else 'none'}")
                state[key] = value.to(state[key].dtype)
            elif key.endswith(".indices"):
                name = key.removesuffix(".indices")
                if name not in state:
                    raise ValueError(f"{path}: {name!r} is not a key of the reference model")
                state[name].view(-1)[value] = stored[f"{name}.values"].to(state[name].dtype)
            elif not key.endswith(".values"):
                raise ValueError(f"{path}: unexpected entry {key!r} (expected <param>.indices/.values or head.*)")
        return state
