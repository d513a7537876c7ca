"""FLYP, "Finetune Like You Pretrain" (Goyal et al. 2023; ``locuslab/FLYP`` ``src/models/flyp_loss.py``).

Contrastive fine-tuning of both CLIP towers and the logit scale: each training image is paired with the prompt
``template.format(class name)`` for a template drawn at random per example (FLYP samples one (image, template) row
per draw), and the loss is the symmetric CLIP InfoNCE with diagonal labels, so same-class pairs in a batch count as
negatives, as in FLYP. After each step the logit scale is clamped to [0, ln 100] (open_clip ``train.py``).
Validation, and the stored classifier, use the head rebuilt from the fine-tuned text tower with
:func:`text_head_weights` (the wise-ft zero-shot recipe with the backbone's templates). The run stores the image
encoder and that head as an ``ImageClassifier`` state (``model.safetensors``). FLYP's paper setting is AdamW lr 1e-5,
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
from robustft.models import ClassificationHead

if TYPE_CHECKING:  # pragma: no cover
    from robustft.training.trainer import Batch, TrainContext

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class FLYPHyperparameters(TrainingHyperparameters):
    templates: str | None = hyperparameter(
        None, "Prompt template set of the training pairs (null = backbone.templates, the reference head's).")


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

        if not callable(getattr(ctx.backbone, "build_clip", None)):
            raise ValueError(
                f"flyp fine-tunes CLIP's text tower too: it needs an open_clip backbone, got "
                f"{type(ctx.backbone).__name__}"
            )
        clip, self.tokenizer = ctx.backbone.build_clip()
        self.templates = list(get_templates(self.hp.templates or ctx.backbone.templates))
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

    def head_weights(self, model: nn.Module) -> Tensor:
        from robustft.backbones.open_clip_backbone import text_head_weights

        return text_head_weights(model.clip, self.tokenizer, self.prompt_names, self.templates)

    def predictor(self, model: nn.Module, ctx: "TrainContext") -> Callable[[Tensor], Tensor]:
        weights = self.head_weights(model)
        head = ClassificationHead(weights.shape[1], weights.shape[0], normalize=True).to(ctx.device)
        with torch.no_grad():
            head.weight.copy_(weights)
            head.bias.zero_()
        return lambda pixels: head(model.clip.encode_image(pixels).float())

    def checkpoint_tensors(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Tensor]:
        from robustft.backbones.open_clip_backbone import encoder_from_clip

        encoder = encoder_from_clip(model.clip)
        state = {f"encoder.{k}": v.detach().clone() for k, v in encoder.state_dict().items()}
        weights = self.head_weights(model)
        state["head.weight"] = weights
        state["head.bias"] = torch.zeros(weights.shape[0], dtype=weights.dtype)
        return state

    def summary(self, model: nn.Module, ctx: "TrainContext") -> dict[str, Any]:
        return {"templates": len(self.templates), "logit_scale": float(model.clip.logit_scale.exp())}
