"""What FLYP and SAFT share when they fine-tune a whole open_clip model (both towers) and store an image classifier.

The stored classifier is the fine-tuned image tower plus the head rebuilt from the fine-tuned text tower with the
wise-ft zero-shot recipe (:func:`robustft.backbones.open_clip_backbone.text_head_weights`) over the *same* prompt
templates as the reference head, so that WiSE-FT interpolates two heads built from one prompt set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import TrainContext


def reference_templates(ctx: "TrainContext") -> str:
    """The template-set name of the run's reference head: ``TrainContext.templates`` (the config's
    ``backbone.templates``), else the backbone's own ``templates``."""
    return getattr(ctx, "templates", None) or ctx.backbone.templates


def build_clip_for(ctx: "TrainContext", why: str) -> tuple[nn.Module, Callable[[list[str]], Tensor]]:
    """The pre-trained open_clip model (both towers) and its tokenizer; ``ValueError`` for other backbones."""
    if not callable(getattr(ctx.backbone, "build_clip", None)):
        raise ValueError(f"{why}: it needs an open_clip backbone, got {type(ctx.backbone).__name__}")
    return ctx.backbone.build_clip()


def class_prompts(prompt_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every ``template.format(name)``, class-major (the order of ``text_head_weights``)."""
    return [t.format(name) for name in prompt_names for t in templates]


def head_from_text_embeddings(embeddings: Tensor, num_classes: int, scale: float | Tensor) -> Tensor:
    """(C, D) zero-shot head from class-major (C·T, D) text embeddings, differentiably: normalise each, average over
    templates, re-normalise, multiply by ``scale`` (wise-ft ``zeroshot.py``, as ``text_head_weights``)."""
    emb = embeddings.float()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    weights = emb.view(num_classes, -1, emb.shape[-1]).mean(dim=1)
    return weights / weights.norm(dim=-1, keepdim=True) * scale


def stored_head(
    clip: nn.Module, tokenizer: Callable[[list[str]], Tensor], prompt_names: Sequence[str], templates: Sequence[str]
) -> dict[str, Tensor]:
    """``head.weight`` / ``head.bias`` of the classifier rebuilt from ``clip``'s (fine-tuned) text tower."""
    from robustft.backbones.open_clip_backbone import text_head_weights

    weights = text_head_weights(clip, tokenizer, list(prompt_names), list(templates))
    return {"head.weight": weights, "head.bias": torch.zeros(weights.shape[0], dtype=weights.dtype)}


def clip_predictor(clip: nn.Module, head: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """Pixels -> logits of ``clip``'s image tower under ``head`` (features L2-normalised, as the reference model)."""
    from robustft.models import ClassificationHead

    weight = head["head.weight"]
    linear = ClassificationHead(weight.shape[1], weight.shape[0], normalize=True)
    linear.load_state_dict({"weight": weight, "bias": head["head.bias"]})
    linear.to(next(clip.parameters()).device)
    return lambda pixels: linear(clip.encode_image(pixels).float())


__all__ = ["build_clip_for", "class_prompts", "clip_predictor", "head_from_text_embeddings", "reference_templates", "stored_head"]
