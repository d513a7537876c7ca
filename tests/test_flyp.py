"""FLYP (Goyal et al. 2023) on a tiny open_clip model: both towers train, the head comes from the fine-tuned text
tower, and prompts (training and head) come from the reference head's template set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustft.backbones import build_backbone
from robustft.backbones.open_clip_backbone import text_head_weights
from robustft.backbones.templates import get_templates
from robustft.methods.flyp import FLYP, clip_contrastive_loss
from robustft.training.run import build_reference_model, seeded_and_deterministic
from robustft.training.trainer import train

from test_methods import context, run  # noqa: E402
from tiny_backbone import CLASSES, tiny_data  # noqa: E402


def tiny_clip_backbone(tiny_open_clip, **extra):
    return build_backbone({"name": "open_clip", "model": tiny_open_clip["model"],
                           "model_config": tiny_open_clip["model_config"], "pretrained": tiny_open_clip["checkpoint"],
                           **extra})


def train_flyp(backbone, hparams: dict, templates: str | None = None):
    """FLYP on 6 tiny images from the reference model of ``backbone``; ``templates``: the run's TrainContext.templates."""
    train_split, val_split = tiny_data(2, 0, size=32), tiny_data(1, 1, size=32)
    ctx = context(FLYP, {"select": "last", "batch_size": 6, "epochs": 2, "lr": 1e-3, **hparams}, backbone=backbone,
                  train=train_split, val=val_split)
    if templates is not None:
        ctx.templates = templates  # the config's backbone.templates, as the finetune stage passes it
    method = FLYP(ctx.hp)
    head = backbone.zeroshot_head_weights(CLASSES, templates=templates, device="cpu")
    reference = build_reference_model(backbone, {"head.weight": head, "head.bias": torch.zeros(3)}, 3)
    with seeded_and_deterministic(0):
        result = train(reference, method, ctx)
    return method, result, reference, head


def test_flyp_trains_both_towers_and_rebuilds_the_head_from_the_text_tower(tmp_path, tiny_open_clip):
    backbone = tiny_clip_backbone(tiny_open_clip, templates="ensemble7")
    method, result, reference, reference_head = train_flyp(backbone, {})
    pretrained, _ = backbone.build_clip()
    tuned = result.model.clip
    before = dict(pretrained.named_parameters())
    moved = lambda prefix: any(  # noqa: E731
        not torch.equal(p, before[n]) for n, p in tuned.named_parameters() if n.startswith(prefix)
    )
    assert moved("visual.") and moved("transformer.")  # both towers
    assert not torch.equal(tuned.logit_scale, pretrained.logit_scale)
    expected_head = text_head_weights(tuned, method.tokenizer, CLASSES, get_templates("ensemble7"))
    assert torch.equal(result.tensors["head.weight"], expected_head)
    assert not torch.allclose(expected_head, reference_head)
    assert set(result.tensors) == set(reference.state_dict())

    with pytest.raises(ValueError, match="open_clip"):
        run("flyp", tmp_path / "no_clip")


def test_flyp_prompts_and_head_use_the_reference_heads_templates(tiny_open_clip):
    """The pipeline builds the backbone without ``templates`` (80 OpenAI templates by default) and passes the
    config's set as ``TrainContext.templates``: with ``simple``, FLYP must train and rebuild its head on "a photo of
    a {}." as the alpha = 0 head does, not on the 80 templates."""
    backbone = tiny_clip_backbone(tiny_open_clip)
    assert backbone.templates == "openai_imagenet"
    prompts: list[str] = []

    class RecordingFLYP(FLYP):
        def prepare(self, model, ctx):
            model = super().prepare(model, ctx)
            tokenizer = self.tokenizer
            self.tokenizer = lambda texts: (prompts.extend(texts), tokenizer(texts))[1]
            return model

    train_split = tiny_data(2, 0, size=32)
    ctx = context(RecordingFLYP, {"select": "last", "batch_size": 6, "epochs": 1, "lr": 1e-3}, backbone=backbone,
                  train=train_split, val=train_split)
    ctx.templates = "simple"
    method = RecordingFLYP(ctx.hp)
    head = backbone.zeroshot_head_weights(CLASSES, templates="simple", device="cpu")
    with seeded_and_deterministic(0):
        result = train(build_reference_model(backbone, {"head.weight": head, "head.bias": torch.zeros(3)}, 3),
                       method, ctx)
    assert prompts and set(prompts) <= {f"a photo of a {c}." for c in CLASSES}
    tuned, tokenizer = result.model.clip, method.tokenizer
    assert torch.equal(result.tensors["head.weight"], text_head_weights(tuned, tokenizer, CLASSES, ["a photo of a {}."]))
    eighty = text_head_weights(tuned, tokenizer, CLASSES, get_templates("openai_imagenet"))
    assert not torch.allclose(result.tensors["head.weight"], eighty, atol=1e-3)

    # an explicit ``templates`` hyperparameter still wins
    ctx = context(FLYP, {"templates": "ensemble7"}, backbone=backbone, train=train_split, val=train_split)
    ctx.templates = "simple"
    method = FLYP(ctx.hp)
    method.prepare(build_reference_model(backbone, {"head.weight": head, "head.bias": torch.zeros(3)}, 3), ctx)
    assert method.templates == get_templates("ensemble7")


def test_flyp_contrastive_loss_matches_open_clip():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    image = nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    assert torch.allclose(clip_contrastive_loss(image, text, scale), ClipLoss()(image, text, scale), atol=1e-6)
