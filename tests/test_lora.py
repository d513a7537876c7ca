"""LoRA (Hu et al. 2021): which layers are adapted, that every adapter trains, and that the stored adapters merge
exactly into the state dict WiSE-FT interpolates (tiny conv encoder and tiny open_clip ViT)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from robustft.backbones import build_backbone
from robustft.methods.lora import LoRA, inject_lora, lora_delta, lora_layers
from robustft.training.checkpoint import save_safetensors
from robustft.training.run import build_reference_model, seeded_and_deterministic
from robustft.training.trainer import train

from test_methods import TRAIN, VAL, context, reference_model, run, state_of, train_directly  # noqa: E402
from tiny_backbone import tiny_data  # noqa: E402


class RecordingLoRA(LoRA):
    """LoRA that keeps each adapter tensor as initialised (to check that every one moves)."""

    def prepare(self, model, ctx):
        model = super().prepare(model, ctx)
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def tiny_clip_run(tiny_open_clip, hparams: dict, method_cls=LoRA):
    """Train LoRA on the tiny open_clip ViT (4 steps); returns (method, result, ctx, backbone, head)."""
    spec = {"name": "open_clip", "model": tiny_open_clip["model"], "model_config": tiny_open_clip["model_config"],
            "pretrained": tiny_open_clip["checkpoint"], "templates": "simple"}
    backbone = build_backbone(spec)
    split = tiny_data(2, 0, size=32)
    ctx = context(method_cls, {"select": "last", "epochs": 2, "batch_size": 3, "lr": 1e-2, **hparams},
                  backbone=backbone, train=split, val=split)
    method = method_cls(ctx.hp)
    head = {"head.weight": 0.1 * torch.randn(3, backbone.feature_dim, generator=torch.Generator().manual_seed(0)),
            "head.bias": torch.zeros(3)}
    with seeded_and_deterministic(0):
        result = train(build_reference_model(backbone, head, 3), method, ctx)
    return method, result, ctx, backbone, head


def assert_every_adapter_trained(method: RecordingLoRA, result, ctx) -> None:
    """Every adapter tensor moved from its initial value and receives a non-zero gradient."""
    params = adapter_parameters(result.model)
    assert params and set(params) == set(method.initial)
    for name, p in params.items():
        assert not torch.equal(p.detach(), method.initial[name]), f"{name} never moved"
    result.model.train()
    result.model.zero_grad(set_to_none=True)
    x = ctx.normalize(ctx.train.pixels)
    nn.functional.cross_entropy(result.model(x), ctx.train.labels).backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} receives no gradient"


# ------------------------------------------------------------------------------------------------------ open_clip
def test_lora_adapts_open_clip_attention_by_default_and_every_adapter_trains(tiny_open_clip):
    method, result, ctx, backbone, head = tiny_clip_run(tiny_open_clip, {"rank": 2}, RecordingLoRA)
    assert sorted(k.split("resblocks.")[1] for k in method.layers) == [
        "0.attn.in_proj_weight", "0.attn.out_proj.weight", "1.attn.in_proj_weight", "1.attn.out_proj.weight",
    ]
    assert_every_adapter_trained(method, result, ctx)
    # the base weights (attention included: peft 0.21 rewrites them on every forward) stay bit-identical
    reference = build_reference_model(backbone, head, 3).state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in result.model.state_dict().items() if "lora_" not in k}
    for key, value in reference.items():
        if not key.startswith("head."):
            assert torch.equal(trained[key], value), key


@pytest.mark.parametrize("targets, adapted", [
    ("mlp", ["mlp.c_fc.weight", "mlp.c_proj.weight"]),
    ("attention+mlp", ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]),
])
def test_lora_on_open_clip_stored_adapters_merge_exactly_as_peft(tmp_path, tiny_open_clip, targets, adapted):
    method, result, ctx, backbone, head = tiny_clip_run(tiny_open_clip, {"rank": 2, "targets": targets},
                                                        RecordingLoRA)
    assert sorted(k.split("resblocks.")[1] for k in method.layers) == sorted(
        f"{block}.{name}" for block in (0, 1) for name in adapted
    )
    assert_every_adapter_trained(method, result, ctx)

    save_safetensors(tmp_path / method.checkpoint_file, result.tensors, result.metadata)
    reference = build_reference_model(backbone, head, 3)
    merged_state = LoRA.load_finetuned_state(reference.state_dict(), tmp_path)

    # peft's own merge of the trained model (attention: AttentionLoRA.merge, as peft with huggingface/peft#3774 fixed)
    peft_model = result.model
    for layer in lora_layers(peft_model).values():
        if not layer.merged:
            layer.merge()
    by_peft = {k.replace(".base_layer", ""): v for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert set(by_peft) == set(merged_state)
    for key in merged_state:
        assert torch.equal(merged_state[key], by_peft[key]), key

    merged = build_reference_model(backbone, head, 3)
    merged.load_state_dict(merged_state)
    x = ctx.normalize(ctx.train.pixels)
    with torch.no_grad():
        merged_out, trained_out = merged.eval()(x), result.model.eval()(x)
        assert torch.allclose(merged_out, trained_out, atol=1e-5)
        # the adapters changed the encoder (the trained head alone would also change the logits)
        assert not torch.allclose(merged.encoder(x), reference.eval().encoder(x), atol=1e-4)


def test_attention_adapter_forward_and_merge_equal_attention_with_w_plus_delta():
    """One W + ΔW per projection (peft 0.21's own forward adds out_proj's ΔW twice), base weights untouched."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.encoder = nn.Module()
    holder.encoder.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    w_in = holder.encoder.attn.in_proj_weight.detach().clone()
    w_out = holder.encoder.attn.out_proj.weight.detach().clone()
    model = inject_lora(holder, ["encoder.attn"], rank=2, lora_alpha=4.0, lora_dropout=0.0)
    layers = lora_layers(model)
    assert sorted(layers) == ["encoder.attn.in_proj_weight", "encoder.attn.out_proj.weight"]
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_()
    deltas = {k: lora_delta(l.lora_A["default"].weight, l.lora_B["default"].weight, l.scaling["default"])
              for k, l in layers.items()}
    plain = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        plain.in_proj_weight.copy_(w_in + deltas["encoder.attn.in_proj_weight"])
        plain.out_proj.weight.copy_(w_out + deltas["encoder.attn.out_proj.weight"])
        plain.in_proj_bias.copy_(holder.encoder.attn.in_proj_bias)
        plain.out_proj.bias.copy_(model.encoder.attn.out_proj.bias)
    x = torch.randn(2, 5, 8)
    expected = plain(x, x, x, need_weights=False)[0]
    out = model.encoder.attn(x, x, x, need_weights=False)[0]
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    for name, p in adapter_parameters(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    base = model.encoder.attn.get_base_layer()
    assert torch.equal(base.in_proj_weight, w_in) and torch.equal(base.out_proj.get_base_layer().weight, w_out)
    model.encoder.attn.merge()
    with torch.no_grad():
        assert torch.allclose(model.encoder.attn(x, x, x, need_weights=False)[0], expected, atol=1e-6)


def test_lora_target_choices_and_their_errors(tiny_open_clip):
    with pytest.raises(ValueError, match="targets: expected one of"):
        context(LoRA, {"targets": "qkv"})
    with pytest.raises(ValueError, match="give one of them"):
        context(LoRA, {"targets": "mlp", "target_modules": ["c_fc"]})
    ctx = context(LoRA, {"targets": "attention"})  # the tiny conv encoder has no attention
    with pytest.raises(ValueError, match="targets 'attention' matches no layer of this encoder; it has \\['conv1x1'\\]"):
        LoRA(ctx.hp).prepare(reference_model(), ctx)
    with pytest.raises(ValueError, match="forward bypasses it"):  # out_proj alone would never train
        tiny_clip_run(tiny_open_clip, {"target_modules": ["out_proj"]})
    with pytest.raises(ValueError, match="lora_dropout 0.1: peft's nn.MultiheadAttention adapters have no dropout"):
        tiny_clip_run(tiny_open_clip, {"lora_dropout": 0.1})


# ------------------------------------------------------------------------------------------------ conv encoder
def test_lora_keeps_base_weights_stores_adapters_only_and_merges_exactly(tmp_path):
    method, result, ctx = train_directly("lora", {"rank": 2, "lora_alpha": 4, "select": "last"})
    reference = reference_model().state_dict()
    trained = result.model.state_dict()
    for key, value in reference.items():
        base = key.replace("point.weight", "point.base_layer.weight").replace("point.bias", "point.base_layer.bias")
        if not key.startswith("head."):
            assert torch.equal(trained[base], value), key  # base weights and BatchNorm statistics untouched
    assert sorted(method.layers) == ["encoder.point.weight"]  # the 1x1 conv by default

    run("lora", tmp_path / "run", {"rank": 2, "lora_alpha": 4, "select": "last"})
    stored = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert sorted(stored) == ["encoder.point.weight.lora_A", "encoder.point.weight.lora_B", "head.bias", "head.weight"]

    merged = reference_model()
    merged.load_state_dict(state_of(tmp_path / "run"))
    merged.eval(), result.model.eval()
    x = ctx.normalize(VAL.pixels)
    with torch.no_grad():
        assert torch.allclose(merged(x), result.model(x), atol=1e-5)
        assert not torch.allclose(merged.encoder(x), reference_model().eval().encoder(x), atol=1e-4)


def test_lora_conv_adapters_all_train():
    ctx = context(RecordingLoRA, {"rank": 2, "lora_alpha": 4, "select": "last"}, train=TRAIN)
    method = RecordingLoRA(ctx.hp)
    with seeded_and_deterministic(0):
        result = train(reference_model(), method, ctx)
    assert_every_adapter_trained(method, result, ctx)


def test_lora_delta_matches_the_layers_it_merges():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g)
    assert torch.allclose(lora_delta(a, b, 0.5), 0.5 * b @ a)
    a4, b4 = torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g)
    x = torch.randn(1, 3, 6, 6, generator=g)
    composed = nn.functional.conv2d(nn.functional.conv2d(x, a4), b4)
    assert torch.allclose(nn.functional.conv2d(x, lora_delta(a4, b4, 1.0)), composed, atol=1e-5)
