"""FLYP, "Finetune Like You Pretrain" (Goyal et al. 2023; ``locuslab/FLYP`` ``src/models/flyp_loss.py``).

Contrastive fine-tuning of both CLIP towers and the logit scale: each training image is paired with the prompt
``template.format(class name)`` for a template drawn at random per example (FLYP samples one (image, template) row
per draw), and the loss is the symmetric CLIP InfoNCE with diagonal labels, so same-class pairs in a batch count as
negatives, as in FLYP. After each step the logit scale is clamped to [0, ln 100] (open_clip ``train.py``).
Training prompts, validation, and the stored classifier use the template set ``templates``, by default the
reference head's (``TrainContext.templates``, the config's ``backbone.templates``), so that the alpha = 0 head and
FLYP's head come from the same prompts; the head is rebuilt from the fine-tuned text tower with
:func:`text_head_weights` (the wise-ft zero-shot recipe). The run stores the image encoder and that head as an
``ImageClassifier`` state (``model.safetensors``). FLYP's paper setting is AdamW lr 1e-5,
wd 0.1, batch 512, 10 epochs; the lr is left to the config. open_clip backbones only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.methods.base import Method, TrainingHyperparameters, hyperparameter
from robustft.methods.clip_towers import build_clip_for, clip_predictor, reference_templates, stored_head

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.context import Batch, TrainContext

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class FLYPHyperparameters(TrainingHyperparameters):
    templates: str | None = hyperparameter(
        None, "Prompt template set for the training pairs and the rebuilt head (null = backbone.templates, the "
        "alpha = 0 head's; another set makes WiSE-FT mix two prompt sets).")


class FlypModel(nn.Module):
    """The whole CLIP model being fine-tuned (both towers and ``logit_scale``)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip


def clip_contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of CLIP with diagonal labels on L2-normalised features (open_clip ``ClipLoss``)."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class FLYP(Method):
    name = "flyp"
    hyperparameters = FLYPHyperparameters

    def prepare(self, model: nn.Module, ctx: "TrainContext") -> nn.Module:
        from robustft.backbones.templates import get_templates

        clip, self.tokenizer = build_clip_for(ctx, "flyp fine-tunes CLIP's text tower too")
        self.templates = list(get_templates(self.hp.templates or reference_templates(ctx)))
        self.prompt_names = list(ctx.prompt_names or ctx.class_names)
        model.cpu()  # not trained (the image encoder is the CLIP model's visual tower): off the GPU
        flyp = FlypModel(clip).to(ctx.device)
        flyp.requires_grad_(True)
        return flyp

    def loss(self, model: nn.Module, batch: "Batch", ctx: "TrainContext") -> dict[str, Tensor]:
        clip = model.clip
        generator = ctx.generator("flyp-templates", ctx.step)
        choice = torch.randint(len(self.templates), (len(batch.labels),), generator=generator).tolist()
        labels = batch.labels.tolist()
        texts = [self.templates[t].format(self.prompt_names[y]) for t, y in zip(choice, labels)]
        tokens = self.tokenizer(texts).to(ctx.device)
        image = F.normalize(clip.encode_image(batch.inputs).float(), dim=-1)
        text = F.normalize(clip.encode_text(tokens).float(), dim=-1)
        return {"clip": clip_contrastive_loss(image, text, clip.logit_scale.exp().float())}

    @torch.no_grad()
    def after_step(self, model: nn.Module, ctx: "TrainContext") -> None:
        model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def predictor(self, model: nn.Module, ctx: "TrainContext") -> Callable[[Tensor], Tensor]:
        return clip_predictor(model.clip, stored_head(model.clip, self.tokenizer, self.prompt_names, self.templates))

    def checkpoint_tensors(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        from robustft.backbones.open_clip_backbone import encoder_from_clip

        encoder = encoder_from_clip(model.clip)
        state = {f"encoder.{k}": v.detach().clone() for k, v in encoder.state_dict().items()}
        return {**state, **stored_head(model.clip, self.tokenizer, self.prompt_names, self.templates)}

    def summary(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Any]:
        return {"templates": len(self.templates), "logit_scale": float(model.clip.logit_scale.exp())}
