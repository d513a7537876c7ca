"""One test of each method's defining property, on a tiny conv encoder (and a tiny open_clip model for FLYP)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from robustft.backbones import build_backbone
from robustft.backbones.base import Backbone
from robustft.data.pixels import PixelSplit
from robustft.interpolation import state_dict_distance
from robustft.methods import get_method
from robustft.methods.base import resolve_hyperparameters
from robustft.methods.ewc import EWC
from robustft.methods.lora import lora_delta
from robustft.models import ImageClassifier
from robustft.training.protocols import select_class_subset, select_kshot, select_protocol
from robustft.training.run import build_reference_model, finetune_run, load_run_state, seeded_and_deterministic
from robustft.training.trainer import Split, TrainContext, train

from tiny_backbone import CLASSES, TinyBackbone, tiny_data  # noqa: E402
TRAINING = {"epochs": 2, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1}


TRAIN, VAL = tiny_data(8, 0), tiny_data(4, 1)


def features_of(split: PixelSplit) -> torch.Tensor:
    backbone = TinyBackbone()
    with torch.no_grad():
        return backbone.build_encoder().eval()(backbone.preprocessing.normalize(split.pixels))


TRAIN_FEATURES, VAL_FEATURES = features_of(TRAIN), features_of(VAL)


def reference_head() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"head.weight": 0.1 * torch.randn(len(CLASSES), 12, generator=g), "head.bias": torch.zeros(len(CLASSES))}


def reference_model() -> ImageClassifier:
    return build_reference_model(TinyBackbone(), reference_head(), len(CLASSES))


def run(method: str, run_dir, hparams: dict | None = None, backbone: Backbone | None = None, **kwargs) -> dict:
    return finetune_run(
        backbone_spec=backbone or TinyBackbone(), method=method, hparams=hparams or {}, seed=0, class_names=CLASSES,
        prompt_names=CLASSES, train=kwargs.pop("train", TRAIN), val=VAL, train_features=TRAIN_FEATURES,
        val_features=VAL_FEATURES, reference_head=reference_head(), run_dir=run_dir, device="cpu", progress=False,
        training=TRAINING, **kwargs,
    )


def state_of(run_dir) -> dict[str, torch.Tensor]:
    return load_run_state(run_dir, reference_model().state_dict())


def context(method_cls, hparams: dict, backbone: Backbone | None = None, train: PixelSplit = TRAIN,
            val: PixelSplit = VAL, class_names=CLASSES) -> TrainContext:
    backbone = backbone or TinyBackbone()
    hp = resolve_hyperparameters(method_cls, TRAINING, hparams)
    return TrainContext(
        hp=hp, seed=0, device=torch.device("cpu"), train=Split(train.labels, train.pixels),
        val=Split(val.labels, val.pixels), normalize=backbone.preprocessing.normalize, backbone=backbone,
        class_names=list(class_names), prompt_names=list(class_names),
    )


def train_directly(name: str, hparams: dict):
    """Train in memory (the trained module is returned, unlike ``finetune_run``); returns (method, result)."""
    method_cls = get_method(name)
    ctx = context(method_cls, hparams)
    method = method_cls(ctx.hp)
    with seeded_and_deterministic(0):
        result = train(reference_model(), method, ctx)
    return method, result, ctx


def params_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {n for n, _ in reference_model().named_parameters()}
    return {k: v for k, v in state.items() if k in names}


# ------------------------------------------------------------------------------------------------------ tests
def test_zeroshot_trains_nothing(tmp_path):
    record = run("zeroshot", tmp_path / "run")
    assert record["trainable_parameters"] == 0 and record["steps"] == 0
    assert record["checkpoint"] == {"file": None, "size_bytes": 0}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json", "train_log.parquet"]
    reference = reference_model().state_dict()
    for key, value in state_of(tmp_path / "run").items():
        assert torch.equal(value, reference[key])
    head = reference_model().head
    expected = (head(VAL_FEATURES).argmax(-1) == VAL.labels).float().mean().item()
    assert record["best_val_accuracy"] == pytest.approx(expected)


def test_linear_probe_never_runs_the_encoder_and_leaves_it_untouched(tmp_path):
    record = run("linear_probe", tmp_path / "run", backbone=TinyBackbone(explode=True))
    assert (tmp_path / "run" / "head.safetensors").is_file()
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "run" / "head.safetensors"))) == {"head.weight", "head.bias"}
    state, reference = state_of(tmp_path / "run"), reference_model().state_dict()
    for key in reference:
        if key.startswith("encoder."):
            assert torch.equal(state[key], reference[key]), key
    assert not torch.equal(state["head.weight"], reference["head.weight"])
    assert record["trainable_parameters"] == 12 * 3 + 3


def test_lp_ft_first_stage_equals_a_linear_probe(tmp_path):
    run("linear_probe", tmp_path / "lp", {"epochs": 3, "lr": 5e-2, "warmup_steps": 0})
    # epochs 0: the run's weights are exactly the stage-1 (linear-probe) model
    record = run("lp_ft", tmp_path / "lpft", {"lp_epochs": 3, "lp_lr": 5e-2, "lp_warmup_steps": 0, "epochs": 0})
    lp, lpft = state_of(tmp_path / "lp"), state_of(tmp_path / "lpft")
    for key in lp:
        assert torch.equal(lp[key], lpft[key]), key
    assert record["method_info"]["lp_steps"] == 9
    # with epochs, stage 2 then moves the encoder too
    run("lp_ft", tmp_path / "lpft2", {"lp_epochs": 3, "lp_lr": 5e-2, "lp_warmup_steps": 0})
    moved = state_of(tmp_path / "lpft2")
    assert not torch.equal(moved["encoder.conv.weight"], lp["encoder.conv.weight"])


def test_full_ft_moves_every_tensor(tmp_path):
    run("full_ft", tmp_path / "run")
    state, reference = state_of(tmp_path / "run"), reference_model().state_dict()
    for key in params_only(reference):
        assert not torch.equal(state[key], reference[key]), key


@pytest.mark.parametrize("method", ["l2sp", "l1sp"])
def test_anchor_penalty_with_huge_strength_stays_near_pretrained(tmp_path, method):
    settings = {"epochs": 4, "lr": 1e-2}
    run("full_ft", tmp_path / "full", settings)
    run(method, tmp_path / "sp", {**settings, "encoder_strength": 1e4, "head_strength": 1e4})
    reference = params_only(reference_model().state_dict())
    far = state_dict_distance(reference, params_only(state_of(tmp_path / "full")))
    near = state_dict_distance(reference, params_only(state_of(tmp_path / "sp")))
    assert near < 0.25 * far, (near, far)


@pytest.mark.parametrize("augment", ["none", "flip"])
def test_kd_with_weight_zero_is_plain_cross_entropy(tmp_path, augment):
    run("full_ft", tmp_path / "full", {"augment": augment})
    run("kd", tmp_path / "kd", {"augment": augment, "kd_weight": 0.0})
    full, kd = state_of(tmp_path / "full"), state_of(tmp_path / "kd")
    for key in full:
        assert torch.equal(full[key], kd[key]), key
    import pandas as pd

    log_full = pd.read_parquet(tmp_path / "full" / "train_log.parquet")
    log_kd = pd.read_parquet(tmp_path / "kd" / "train_log.parquet")
    assert (log_kd["loss_kd"] == 0).all()
    assert log_full["loss_ce"].tolist() == log_kd["loss_ce"].tolist() == log_kd["loss"].tolist()


def test_kd_teacher_logits_looked_up_equal_the_teacher():
    from robustft.methods.kd import KnowledgeDistillation

    ctx = context(KnowledgeDistillation, {})
    method = KnowledgeDistillation(ctx.hp)
    model = method.prepare(reference_model(), ctx)
    teacher = reference_model().eval()
    with torch.no_grad():
        expected = teacher(ctx.normalize(TRAIN.pixels))
    assert torch.allclose(method.teacher_logits, expected, atol=1e-6)
    # with the run's cached features the teacher needs no image pass: reference head on features, same logits
    ctx = context(KnowledgeDistillation, {})
    ctx.train = Split(TRAIN.labels, TRAIN.pixels, TRAIN_FEATURES)
    method = KnowledgeDistillation(ctx.hp)
    passes = []
    model = reference_model()
    model.encoder.register_forward_hook(lambda *_: passes.append(1))
    method.prepare(model, ctx)
    assert passes == [] and torch.allclose(method.teacher_logits, expected, atol=1e-5)


def test_ewc_penalty_is_zero_at_pretrained_and_its_gradient_is_lambda_f_delta():
    ctx = context(EWC, {"strength": 3.0, "fisher_examples": 10})
    method = EWC(ctx.hp)
    model = method.prepare(reference_model(), ctx)
    assert method.penalty(model).item() == 0.0
    assert method.fisher_count == 10 and sum(f.sum() for f in method.fisher.values()) > 0
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(method.penalty(model), list(params.values()))
    for (name, p), grad in zip(params.items(), grads):
        expected = 3.0 * method.fisher[name] * (p.detach() - method.anchor[name])
        assert torch.allclose(grad, expected, atol=1e-7), name


def test_saft_changes_only_its_mask_of_the_configured_fraction(tmp_path):
    fraction = 0.05
    method, result, _ = train_directly("saft", {"fraction": fraction, "select": "last"})
    reference = reference_model().state_dict()
    trained = result.model.state_dict()
    total = sum(p.numel() for p in reference_model().parameters())
    assert sum(int(m.sum()) for m in method.masks.values()) == round(fraction * total)
    changed = 0
    for key, value in reference.items():
        mask = method.masks.get(key, torch.zeros_like(value, dtype=torch.bool))
        assert torch.equal(trained[key][~mask], value[~mask]), key  # outside the mask: bit-identical (buffers too)
        changed += int((trained[key][mask] != value[mask]).sum())
    assert changed > 0

    record = run("saft", tmp_path / "run", {"fraction": fraction, "select": "last"})
    assert record["trainable_parameters"] == round(fraction * total)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json", "sparse_update.safetensors",
                                                                     "train_log.parquet"]
    stored = state_of(tmp_path / "run")
    for key in reference:
        assert torch.equal(stored[key], trained[key]), key  # the sparse file rebuilds the trained model exactly


def test_lora_keeps_base_weights_stores_adapters_only_and_merges_exactly(tmp_path):
    method, result, ctx = train_directly("lora", {"rank": 2, "lora_alpha": 4, "select": "last"})
    reference = reference_model().state_dict()
    trained = result.model.state_dict()
    for key, value in reference.items():
        base = key.replace("point.weight", "point.base_layer.weight").replace("point.bias", "point.base_layer.bias")
        if not key.startswith("head."):
            assert torch.equal(trained[base], value), key  # base weights and BatchNorm statistics untouched
    assert sorted(k[: -len(".weight")] for k in method.layers) == ["encoder.point"]  # the 1x1 conv by default

    run("lora", tmp_path / "run", {"rank": 2, "lora_alpha": 4, "select": "last"})
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert sorted(stored) == ["encoder.point.weight.lora_A", "encoder.point.weight.lora_B", "head.bias", "head.weight"]
    assert stored["encoder.point.weight.lora_B"].abs().sum() > 0  # B starts at zero; it trained

    merged = reference_model()
    merged.load_state_dict(state_of(tmp_path / "run"))
    merged.eval(), result.model.eval()
    x = ctx.normalize(VAL.pixels)
    with torch.no_grad():
        assert torch.allclose(merged(x), result.model(x), atol=1e-5)
        assert not torch.allclose(reference_model().eval()(x), result.model(x), atol=1e-3)


def test_lora_on_open_clip_adapts_the_mlp_linears_and_merges_exactly(tmp_path, tiny_open_clip):
    from robustft.training.checkpoint import save_safetensors

    spec = {"name": "open_clip", "model": tiny_open_clip["model"], "model_config": tiny_open_clip["model_config"],
            "pretrained": tiny_open_clip["checkpoint"], "templates": "simple"}
    backbone = build_backbone(spec)
    train_split = tiny_data(2, 0, size=32)
    method_cls = get_method("lora")
    ctx = context(method_cls, {"select": "last", "epochs": 1, "batch_size": 3, "lr": 1e-2}, backbone=backbone,
                  train=train_split, val=train_split)
    method = method_cls(ctx.hp)
    head = {"head.weight": 0.1 * torch.randn(3, backbone.feature_dim), "head.bias": torch.zeros(3)}
    with seeded_and_deterministic(0):
        result = train(build_reference_model(backbone, head, 3), method, ctx)
    adapted = sorted(k.split("resblocks.")[1] for k in method.layers)
    assert adapted == ["0.mlp.c_fc.weight", "0.mlp.c_proj.weight", "1.mlp.c_fc.weight", "1.mlp.c_proj.weight"]

    save_safetensors(tmp_path / method.checkpoint_file, result.tensors, result.metadata)
    merged = build_reference_model(backbone, head, 3)
    merged.load_state_dict(method_cls.load_finetuned_state(merged.state_dict(), tmp_path))
    x = ctx.normalize(train_split.pixels)
    with torch.no_grad():
        assert torch.allclose(merged.eval()(x), result.model.eval()(x), atol=1e-5)


def test_lora_delta_matches_the_layers_it_merges():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g)
    assert torch.allclose(lora_delta(a, b, 0.5), 0.5 * b @ a)
    a4, b4 = torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g)
    x = torch.randn(1, 3, 6, 6, generator=g)
    composed = nn.functional.conv2d(nn.functional.conv2d(x, a4), b4)
    assert torch.allclose(nn.functional.conv2d(x, lora_delta(a4, b4, 1.0)), composed, atol=1e-5)


def test_flyp_trains_both_towers_and_rebuilds_the_head_from_the_text_tower(tmp_path, tiny_open_clip):
    from robustft.backbones.open_clip_backbone import text_head_weights
    from robustft.backbones.templates import get_templates

    spec = {"name": "open_clip", "model": tiny_open_clip["model"], "model_config": tiny_open_clip["model_config"],
            "pretrained": tiny_open_clip["checkpoint"], "templates": "ensemble7"}
    backbone = build_backbone(spec)
    train_split, val_split = tiny_data(2, 0, size=32), tiny_data(1, 1, size=32)
    method_cls = get_method("flyp")
    ctx = context(method_cls, {"select": "last", "batch_size": 6, "epochs": 2, "lr": 1e-3}, backbone=backbone,
                  train=train_split, val=val_split)
    method = method_cls(ctx.hp)
    reference_head_weights = backbone.zeroshot_head_weights(CLASSES, device="cpu")
    reference = build_reference_model(backbone, {"head.weight": reference_head_weights,
                                                 "head.bias": torch.zeros(3)}, 3)
    with seeded_and_deterministic(0):
        result = train(reference, method, ctx)
    pretrained, _ = backbone.build_clip()
    tuned = result.model.clip
    moved = lambda prefix: any(  # noqa: E731
        not torch.equal(p, dict(pretrained.named_parameters())[n]) for n, p in tuned.named_parameters() if n.startswith(prefix)
    )
    assert moved("visual.") and moved("transformer.")  # both towers
    assert not torch.equal(tuned.logit_scale, pretrained.logit_scale)
    expected_head = text_head_weights(tuned, method.tokenizer, CLASSES, get_templates("ensemble7"))
    assert torch.equal(result.tensors["head.weight"], expected_head)
    assert not torch.allclose(expected_head, reference_head_weights)
    assert set(result.tensors) == set(reference.state_dict())

    with pytest.raises(ValueError, match="open_clip"):
        run("flyp", tmp_path / "no_clip")


def test_kshot_selection_is_seeded_with_k_per_class_and_names_a_short_class():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 4)
    chosen = select_kshot(labels, CLASSES, 3, seed=0)
    assert np.bincount(labels[chosen], minlength=3).tolist() == [3, 3, 3]
    assert np.array_equal(chosen, select_kshot(labels, CLASSES, 3, seed=0))
    assert any(not np.array_equal(chosen, select_kshot(labels, CLASSES, 3, seed=s)) for s in range(1, 5))
    with pytest.raises(ValueError, match="class 'cat' has 3 training examples, fewer than k=4"):
        select_kshot(labels, CLASSES, 4, seed=0)
    with pytest.raises(ValueError, match="class 'bird' has 0"):
        select_kshot(np.array([0, 1]), CLASSES, 1, seed=0)
    picked = select_protocol({"kind": "kshot", "k": 2}, labels, CLASSES, seed=7)
    assert picked.params == {"k": 2, "seed": 7} and len(picked.train_indices) == 6


def test_class_subset_selection_and_run_record(tmp_path):
    labels = np.array([0, 0, 1, 2, 2, 1])
    assert select_class_subset(labels, CLASSES, ["cat"]).tolist() == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="seen class 'bird' has no training examples"):
        select_class_subset(np.array([0, 1]), CLASSES, ["cat"])
    with pytest.raises(ValueError, match="unknown absent classes"):
        select_class_subset(labels, CLASSES, ["horse"])
    with pytest.raises(ValueError, match="unknown keys"):
        select_protocol({"kind": "kshot", "k": 1, "shots": 2}, labels, CLASSES, 0)

    record = run("full_ft", tmp_path / "run", {"protocol": {"kind": "class_subset", "absent_classes": ["cat"]}})
    assert record["absent_classes"] == ["cat"]
    assert record["protocol"]["n_train"] == 16 and record["n_val"] == 8  # validation restricted to seen classes
    state = state_of(tmp_path / "run")
    assert state["head.weight"].shape[0] == 3  # the head keeps every class
    on_disk = json.loads((tmp_path / "run" / "run.json").read_text())
    assert on_disk["protocol"]["absent_classes"] == ["cat"]


def test_saft_top_fraction_masks_pick_the_global_largest_scores():
    from robustft.methods.saft import top_fraction_masks

    scores = {"a": torch.tensor([[0.1, 0.9], [0.3, 0.2]]), "b": torch.tensor([0.8, 0.05, 0.7, 0.0])}
    masks = top_fraction_masks(scores, 0.25)  # 8 entries -> 2 largest: 0.9 (a) and 0.8 (b)
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [True, False, False, False]
    assert int(top_fraction_masks(scores, 1e-6)["a"].sum()) == 1  # at least one entry


def test_flyp_contrastive_loss_matches_open_clip():
    from open_clip.loss import ClipLoss

    from robustft.methods.flyp import clip_contrastive_loss

    g = torch.Generator().manual_seed(0)
    image = nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    assert torch.allclose(clip_contrastive_loss(image, text, scale), ClipLoss()(image, text, scale), atol=1e-6)
