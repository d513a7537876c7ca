"""SAFT (Nam et al. 2024): the selection is the top gradient magnitudes, only the selected parameters change (every
other one stays bit-identical), and the stored sparse update rebuilds the trained model; on open_clip over both
towers, with the head from the text tower (tiny conv encoder and tiny open_clip ViT)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustft.backbones import build_backbone
from robustft.backbones.open_clip_backbone import text_head_weights
from robustft.methods.saft import SAFT, SaftClip, top_fraction_masks
from robustft.training.checkpoint import save_safetensors
from robustft.training.run import build_reference_model, seeded_and_deterministic
from robustft.training.trainer import train

from test_methods import TRAIN, context, reference_model, run, state_of, train_directly  # noqa: E402
from tiny_backbone import CLASSES, tiny_data  # noqa: E402


def assert_top_scores(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], fraction: float) -> None:
    """``masks`` select round(fraction * total) entries, none scoring below an unselected one (up to rounding)."""
    total = sum(s.numel() for s in scores.values())
    chosen = torch.cat([masks.get(n, torch.zeros_like(s, dtype=torch.bool)).flatten() for n, s in scores.items()])
    flat = torch.cat([s.flatten() for s in scores.values()])
    assert int(chosen.sum()) == round(fraction * total)
    assert flat[chosen].min() >= flat[~chosen].max() * (1 - 1e-4), (flat[chosen].min(), flat[~chosen].max())
    assert flat[chosen].min() > flat[~chosen].median()  # not a degenerate tie


def assert_only_selected_changed(before: dict, after: dict, masks: dict[str, torch.Tensor]) -> None:
    changed = selected = 0
    for key, value in before.items():
        mask = masks.get(key, torch.zeros_like(value, dtype=torch.bool))
        assert torch.equal(after[key][~mask], value[~mask]), key  # outside the mask: bit-identical (buffers too)
        changed += int((after[key][mask] != value[mask]).sum())
        selected += int(mask.sum())
    assert changed > selected // 2, (changed, selected)


# ------------------------------------------------------------------------------------------------ conv encoder
def test_saft_selects_the_top_gradient_magnitudes_and_changes_only_them(tmp_path):
    fraction = 0.05
    model = reference_model().eval()  # the pre-trained model's scores, independently: one full-batch gradient
    params = dict(model.named_parameters())
    ctx = context(SAFT, {})
    loss = F.cross_entropy(model(ctx.normalize(TRAIN.pixels)), TRAIN.labels)
    scores = {n: g.abs() for n, g in zip(params, torch.autograd.grad(loss, list(params.values())))}

    method, result, _ = train_directly("saft", {"fraction": fraction, "select": "last"})
    assert method.towers == "image"
    assert_top_scores(method.masks, scores, fraction)
    reference, trained = reference_model().state_dict(), result.model.state_dict()
    assert_only_selected_changed(reference, trained, method.masks)

    record = run("saft", tmp_path / "run", {"fraction": fraction, "select": "last"})
    assert record["trainable_parameters"] == round(fraction * sum(s.numel() for s in scores.values()))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json", "sparse_update.safetensors",
                                                                     "train_log.parquet"]
    stored = state_of(tmp_path / "run")
    for key in reference:
        assert torch.equal(stored[key], trained[key]), key  # the sparse file rebuilds the trained model exactly


def test_saft_top_fraction_masks_pick_the_global_largest_scores():
    scores = {"a": torch.tensor([[0.1, 0.9], [0.3, 0.2]]), "b": torch.tensor([0.8, 0.05, 0.7, 0.0])}
    masks = top_fraction_masks(scores, 0.25)  # 8 entries -> 2 largest: 0.9 (a) and 0.8 (b)
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [True, False, False, False]
    assert int(top_fraction_masks(scores, 1e-6)["a"].sum()) == 1  # at least one entry


def test_saft_tower_choices_and_their_errors():
    with pytest.raises(ValueError, match="towers: expected one of"):
        context(SAFT, {"towers": "text"})
    ctx = context(SAFT, {"towers": "both"})
    with pytest.raises(ValueError, match="saft towers 'both' .* needs an open_clip backbone, got TinyBackbone"):
        SAFT(ctx.hp).prepare(reference_model(), ctx)


# ------------------------------------------------------------------------------------------------------ open_clip
def clip_setup(tiny_open_clip, method_cls=SAFT, **hparams):
    """SAFT on the tiny open_clip ViT whose backbone defaults to the 80 templates; the run's templates are "simple"."""
    backbone = build_backbone({"name": "open_clip", "model": tiny_open_clip["model"],
                               "model_config": tiny_open_clip["model_config"],
                               "pretrained": tiny_open_clip["checkpoint"]})
    split = tiny_data(2, 0, size=32)
    ctx = context(method_cls, {"select": "last", "epochs": 2, "batch_size": 4, "lr": 1e-2, **hparams},
                  backbone=backbone, train=split, val=split)
    ctx.templates = "simple"  # the config's backbone.templates, as the finetune stage passes it
    head = {"head.weight": backbone.zeroshot_head_weights(CLASSES, templates="simple", device="cpu"),
            "head.bias": torch.zeros(3)}
    return backbone, ctx, head


def clip_scores(clip, tokenizer, ctx) -> dict[str, torch.Tensor]:
    """|∇ mean CE| of 100-cos-style logits (pre-trained scale) over both towers, with the whole graph at once."""
    clip.eval()
    params = {f"clip.{n}": p for n, p in clip.named_parameters() if n != "logit_scale"}
    text = clip.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES]))
    weights = F.normalize(text, dim=-1) * clip.logit_scale.exp().detach()  # one template: no average
    image = F.normalize(clip.encode_image(ctx.normalize(ctx.train.pixels)), dim=-1)
    loss = F.cross_entropy(image @ weights.T, ctx.train.labels)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g.abs()) for (n, p), g in zip(params.items(), grads)}


def test_saft_on_open_clip_selects_over_both_towers_and_stores_the_text_tower_head(tmp_path, tiny_open_clip):
    fraction = 0.01
    backbone, ctx, head = clip_setup(tiny_open_clip, fraction=fraction)
    clip, tokenizer = backbone.build_clip()
    scores = clip_scores(clip, tokenizer, ctx)
    reference = build_reference_model(backbone, head, 3)

    # before training, the two-tower classifier is the reference model
    method = SAFT(ctx.hp)
    prepared = method.prepare(build_reference_model(backbone, head, 3), ctx)
    assert isinstance(prepared, SaftClip) and method.towers == "both" and method.templates == ["a photo of a {}."]
    x = ctx.normalize(ctx.train.pixels)
    with torch.no_grad():
        assert torch.allclose(prepared.eval()(x), reference.eval()(x), atol=1e-4)

    method = SAFT(ctx.hp)
    with seeded_and_deterministic(0):
        result = train(build_reference_model(backbone, head, 3), method, ctx)
    assert_top_scores(method.masks, scores, fraction)
    text_selected = [n for n in method.masks if not n.startswith("clip.visual.")]
    assert text_selected and any(n.startswith("clip.visual.") for n in method.masks)  # both towers
    assert "clip.logit_scale" not in method.masks
    pretrained = {f"clip.{k}": v for k, v in backbone.build_clip()[0].state_dict().items()}
    tuned = {k: v for k, v in result.model.state_dict().items() if k.startswith("clip.")}
    assert_only_selected_changed(pretrained, tuned, method.masks)

    save_safetensors(tmp_path / SAFT.checkpoint_file, result.tensors, result.metadata)
    assert {k for k in result.tensors if not k.endswith((".indices", ".values"))} == {"head.weight", "head.bias"}
    state = SAFT.load_finetuned_state(reference.state_dict(), tmp_path)
    for key, value in reference.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(state[key], tuned[f"clip.{key.removeprefix('encoder.')}"]), key
    expected = text_head_weights(result.model.clip, tokenizer, CLASSES, ["a photo of a {}."])
    assert torch.equal(state["head.weight"], expected)
    assert not torch.allclose(state["head.weight"], head["head.weight"], atol=1e-4)  # the text tower moved


def test_saft_on_open_clip_without_text_selection_keeps_the_reference_head(tmp_path, tiny_open_clip):
    calls = []

    class ImageOnlyScores(SAFT):
        def clip_gradient_scores(self, model, ctx):
            scores = super().clip_gradient_scores(model, ctx)
            return {n: s if n.startswith("clip.visual.") else torch.zeros_like(s) for n, s in scores.items()}

        def prepare(self, model, ctx):
            model = super().prepare(model, ctx)
            encode_text = model.clip.encode_text
            model.clip.encode_text = lambda *a, **k: (calls.append(1), encode_text(*a, **k))[1]
            return model

    backbone, ctx, head = clip_setup(tiny_open_clip, ImageOnlyScores, fraction=0.001)
    method = ImageOnlyScores(ctx.hp)
    with seeded_and_deterministic(0):
        result = train(build_reference_model(backbone, head, 3), method, ctx)
    assert all(n.startswith("clip.visual.") for n in method.masks) and not result.model.text_trains
    assert calls == []  # the text tower never ran while training
    assert not any(k.startswith("head.") for k in result.tensors)
    save_safetensors(tmp_path / SAFT.checkpoint_file, result.tensors, result.metadata)
    reference = build_reference_model(backbone, head, 3).state_dict()
    state = SAFT.load_finetuned_state(reference, tmp_path)
    assert torch.equal(state["head.weight"], reference["head.weight"])
    assert sum(not torch.equal(state[k], reference[k]) for k in reference) > 0
