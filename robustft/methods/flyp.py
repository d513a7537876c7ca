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
    from robustft.training.context import Batch, StepBatches, TrainContext

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


def embedding_dim(clip: nn.Module) -> int:
    """The width of CLIP's joint embedding."""
    projection = getattr(clip, "text_projection", None)
    return int(projection.shape[-1]) if isinstance(projection, Tensor) else int(clip.visual.output_dim)


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

    def texts(self, batch: "Batch", choice: list[int]) -> list[str]:
        """The batch's training prompts: template ``choice[i]`` of class ``labels[i]``."""
        return [self.templates[t].format(self.prompt_names[y]) for t, y in zip(choice, batch.labels.tolist())]

    def template_choice(self, ctx: "TrainContext", total: int) -> Tensor:
        """A template per example of the step's whole batch (seeded by the step: the same whatever the split)."""
        return torch.randint(len(self.templates), (total,), generator=ctx.generator("flyp-templates", ctx.step))

    def features(self, clip: nn.Module, batch: "Batch", choice: list[int], ctx: "TrainContext") -> tuple[Tensor, Tensor]:
        """L2-normalised (image, text) features of the batch's pairs, in fp32."""
        tokens = self.tokenizer(self.texts(batch, choice)).to(ctx.device)
        with ctx.autocast():
            image, text = clip.encode_image(batch.inputs), clip.encode_text(tokens)
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def loss(self, model: nn.Module, batch: "Batch", ctx: "TrainContext") -> dict[str, Tensor]:
        """The contrastive loss of ``batch`` taken as a whole step."""
        choice = self.template_choice(ctx, len(batch.labels)).tolist()
        image, text = self.features(model.clip, batch, choice, ctx)
        return {"clip": clip_contrastive_loss(image, text, model.clip.logit_scale.exp().float())}

    def accumulate_gradients(self, model: nn.Module, step: "StepBatches", ctx: "TrainContext") -> dict[str, Tensor]:
        """The contrastive loss of the whole step, over every micro-batch and rank (GradCache, Gao et al. 2021).

        The loss pairs every image of the step with every text, so it is no mean over micro-batches. One batch on
        one rank: the plain loss and backward pass. Otherwise: (1) every micro-batch's features without gradients,
        (2) the features of all ranks gathered and the loss computed on them, with its gradients with respect to the
        features and to the logit scale (each rank computes the same; the scale's gradient is divided by the ranks,
        whose gradients the trainer sums), (3) each micro-batch's features again with gradients, back-propagated
        from this rank's rows of the feature gradients. The result equals one pass over the whole batch (the
        encoders must be deterministic: open_clip's have no dropout by default).
        """
        clip, group = model.clip, step.group
        choice = self.template_choice(ctx, step.total)
        choices = [choice[p].tolist() for p in step.positions]
        if len(step.micro) == 1 and step.size == step.total:
            image, text = self.features(clip, step.micro[0], choices[0], ctx)
            loss = clip_contrastive_loss(image, text, clip.logit_scale.exp().float())
            loss.backward()
            return {"clip": loss.detach()}
        with torch.no_grad():
            pairs = [self.features(clip, b, c, ctx) for b, c in zip(step.micro, choices)]
        empty = torch.zeros((0, embedding_dim(clip)), device=ctx.device)  # a rank without rows in a short batch
        image = torch.cat([p[0] for p in pairs]) if pairs else empty
        text = torch.cat([p[1] for p in pairs]) if pairs else empty
        counts = group.counts(step.total)
        every_image = group.all_gather_rows(image, counts).requires_grad_(True)
        every_text = group.all_gather_rows(text, counts).requires_grad_(True)
        loss = clip_contrastive_loss(every_image, every_text, clip.logit_scale.exp().float())
        grad_image, grad_text, grad_scale = torch.autograd.grad(loss, [every_image, every_text, clip.logit_scale])
        grad_scale = grad_scale / group.world_size
        clip.logit_scale.grad = grad_scale if clip.logit_scale.grad is None else clip.logit_scale.grad + grad_scale
        start = sum(counts[: group.rank])
        for batch, c in zip(step.micro, choices):
            stop = start + len(c)
            image, text = self.features(clip, batch, c, ctx)
            ((image * grad_image[start:stop]).sum() + (text * grad_text[start:stop]).sum()).backward()
            start = stop
        return {"clip": loss.detach() / group.world_size}

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
        return {"templates": len(self.templates), "logit_scale": float(model.clip.logit_scale.detach().exp())}
