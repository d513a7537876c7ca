"""OpenClipBackbone on a tiny random open_clip model: weights loading, zero-shot head, classifier, templates."""

from __future__ import annotations

import pickle
import time
import urllib.error
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from robustft.backbones import WeightsError, build_backbone
from robustft.backbones.base import file_sha256
from robustft.backbones.open_clip_backbone import OpenClipBackbone, encoder_from_clip, text_head_weights
from robustft.backbones.templates import (
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_TEMPLATE,
    TEMPLATE_SETS,
    TIP_ADAPTER_7,
    get_templates,
)
from robustft.models import ClassificationHead, ImageClassifier

CLASSES = ["dog", "cat", "oak tree", "sports car"]


def spec_of(tiny: dict, **extra) -> dict:
    return {
        "name": "open_clip",
        "model": tiny["model"],
        "model_config": tiny["model_config"],
        "pretrained": tiny["checkpoint"],
        **extra,
    }


def make_backbone(tiny: dict, **extra) -> OpenClipBackbone:
    spec = spec_of(tiny, **extra)
    spec.pop("name")
    return OpenClipBackbone(**spec)


def reference_clip(tiny: dict):
    """The tiny model built and loaded directly with open_clip / safetensors, independently of the backbone."""
    model = open_clip.create_model(tiny["model"], pretrained=None)
    model.load_state_dict(load_file(tiny["checkpoint"]), strict=True)
    return model.eval(), open_clip.get_tokenizer(tiny["model"])


def wiseft_head(model, tokenizer, class_names, templates) -> torch.Tensor:
    """wise-ft ``get_zeroshot_classifier``, one class at a time."""
    rows = []
    with torch.no_grad():
        for name in class_names:
            emb = model.encode_text(tokenizer([t.format(name) for t in templates]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0)
            rows.append(emb / emb.norm())
        return torch.stack(rows) * model.logit_scale.exp()


# ------------------------------------------------------------------------------------------------ zero-shot head
def test_zeroshot_head_matches_wiseft_recipe(tiny_open_clip):
    backbone = make_backbone(tiny_open_clip)
    head = backbone.zeroshot_head_weights(CLASSES, TIP_ADAPTER_7, device="cpu")
    ref_model, tokenizer = reference_clip(tiny_open_clip)
    expected = wiseft_head(ref_model, tokenizer, CLASSES, TIP_ADAPTER_7)
    assert head.shape == (len(CLASSES), backbone.feature_dim) == (4, 16)
    assert head.dtype == torch.float32 and head.device.type == "cpu"
    torch.testing.assert_close(head, expected, rtol=1e-5, atol=1e-5)
    # batching the texts across classes (batch smaller than C x T) gives the same head
    chunked = text_head_weights(ref_model, tokenizer, CLASSES, TIP_ADAPTER_7, batch_size=5)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    # a template-set name, and the backbone's default set
    by_name = backbone.zeroshot_head_weights(CLASSES, "ensemble7", device="cpu")
    torch.testing.assert_close(by_name, head)
    simple = make_backbone(tiny_open_clip, templates="simple").zeroshot_head_weights(CLASSES, device="cpu")
    expected_simple = wiseft_head(ref_model, tokenizer, CLASSES, SIMPLE_TEMPLATE)
    torch.testing.assert_close(simple, expected_simple, rtol=1e-5, atol=1e-5)


def test_head_rows_have_norm_logit_scale(tiny_open_clip):
    backbone = make_backbone(tiny_open_clip)
    head = backbone.zeroshot_head_weights(CLASSES, SIMPLE_TEMPLATE, device="cpu")
    scale = load_file(tiny_open_clip["checkpoint"])["logit_scale"].exp().item()
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init
    torch.testing.assert_close(head.norm(dim=-1), torch.full((len(CLASSES),), scale), rtol=1e-5, atol=1e-5)


def test_text_head_weights_for_flyp_restores_mode_and_is_trainable(tiny_open_clip):
    clip_model, tokenizer = make_backbone(tiny_open_clip).build_clip()
    clip_model.train()
    weights = text_head_weights(clip_model, tokenizer, CLASSES, SIMPLE_TEMPLATE)
    assert clip_model.training
    assert not weights.is_inference()
    param = torch.nn.Parameter(weights)
    (param * 2).sum().backward()
    assert param.grad is not None
    with pytest.raises(TypeError):
        text_head_weights(clip_model, tokenizer, CLASSES, "a photo of a {}.")


# ------------------------------------------------------------------------------------------------- classifier
def test_image_classifier_logits_equal_scaled_cosine(tiny_open_clip):
    backbone = make_backbone(tiny_open_clip)
    weights = backbone.zeroshot_head_weights(CLASSES, TIP_ADAPTER_7, device="cpu")
    head = ClassificationHead(backbone.feature_dim, len(CLASSES), normalize=backbone.features_normalized)
    with torch.no_grad():
        head.weight.copy_(weights)
        head.bias.zero_()
    classifier = ImageClassifier(backbone.build_encoder(), head).eval()

    size = backbone.preprocessing.image_size
    pixels = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = backbone.preprocessing.normalize(pixels)
    ref_model, tokenizer = reference_clip(tiny_open_clip)
    with torch.no_grad():
        logits = classifier(x)
        img = F.normalize(ref_model.encode_image(x), dim=-1)
        rows = []
        for c in CLASSES:
            per_template = F.normalize(ref_model.encode_text(tokenizer([t.format(c) for t in TIP_ADAPTER_7])), dim=-1)
            rows.append(F.normalize(per_template.mean(0), dim=0))
        text = torch.stack(rows)
        expected = ref_model.logit_scale.exp() * img @ text.T
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_encoder_is_visual_tower_with_stable_keys(tiny_open_clip):
    backbone = make_backbone(tiny_open_clip)
    encoder = backbone.build_encoder()
    clip_model, _ = backbone.build_clip()
    from_clip = encoder_from_clip(clip_model)
    assert list(encoder.state_dict()) == list(from_clip.state_dict())
    assert all(k.startswith("visual.") for k in encoder.state_dict())
    assert not any(k.startswith(("visual.token_embedding", "token_embedding", "text")) for k in encoder.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(x), clip_model.encode_image(x))
        torch.testing.assert_close(from_clip(x), clip_model.encode_image(x))
    assert encoder(x).shape == (2, backbone.feature_dim)
    # fresh copies: training one encoder leaves the next one untouched
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    fresh = backbone.build_encoder()
    torch.testing.assert_close(fresh.state_dict(), from_clip.state_dict())


def test_preprocessing_and_image_size_override(tiny_open_clip):
    pre = make_backbone(tiny_open_clip).preprocessing
    assert (pre.image_size, pre.interpolation) == (32, "bicubic")
    assert pre.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert pre.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    big = make_backbone(tiny_open_clip, image_size=48)
    assert big.preprocessing.image_size == 48 and big.preprocessing.pixel_key == "48px_bicubic"
    with torch.no_grad():
        assert big.build_encoder()(torch.randn(1, 3, 48, 48)).shape == (1, 16)


def test_module_prefixed_checkpoint_loads(tiny_open_clip, tmp_path):
    state = load_file(tiny_open_clip["checkpoint"])
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    encoder = make_backbone(tiny_open_clip, pretrained=str(path)).build_encoder()
    ref = make_backbone(tiny_open_clip).build_encoder()
    torch.testing.assert_close(encoder.state_dict(), ref.state_dict())


# ------------------------------------------------------------------------------------------------------ errors
def test_unavailable_tag_fails_fast_with_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    backbone = OpenClipBackbone(model="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    assert backbone.feature_dim == 512 and backbone.preprocessing.image_size == 224  # no weights needed
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        backbone.build_encoder()
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "ViT-B-32" in message and "'openai'" in message and "backbone.pretrained" in message
    assert "local file" in message and "\n" not in message


def test_unknown_model_lists_valid_names():
    with pytest.raises(WeightsError, match=r"unknown open_clip model 'ViT-B-33'.*ViT-B-32"):
        OpenClipBackbone(model="ViT-B-33", pretrained="openai")


def test_unknown_tag_or_missing_file(tiny_open_clip, tmp_path):
    with pytest.raises(WeightsError, match="neither a pretrained tag"):
        make_backbone(tiny_open_clip, pretrained=str(tmp_path / "missing.safetensors")).build_encoder()


def test_wrong_architecture_names_file(tiny_open_clip, tmp_path):
    import copy
    import json

    cfg = copy.deepcopy(json.loads(Path(tiny_open_clip["model_config"]).read_text()))
    cfg["embed_dim"] = 8
    cfg["vision_cfg"]["layers"] = 3
    torch.manual_seed(0)
    other = open_clip.CLIP(**cfg)
    path = tmp_path / "other_arch.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(WeightsError) as info:
        make_backbone(tiny_open_clip, pretrained=str(path)).build_encoder()
    message = str(info.value)
    assert str(path) in message and "does not match open_clip model robustft-tiny-clip" in message
    assert "unexpected keys" in message and "visual.transformer.resblocks.2" in message
    assert "shape mismatches" in message and "\n" not in message


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_objects_is_refused(tiny_open_clip, tmp_path, writer):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    payload = {"visual.proj": torch.zeros(1), "evil": _Payload(str(marker))}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(WeightsError, match="refused") as info:
        make_backbone(tiny_open_clip, pretrained=str(path)).build_encoder()
    assert str(path) in str(info.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ registry
def test_build_backbone_through_registry(tiny_open_clip):
    backbone = build_backbone(spec_of(tiny_open_clip, templates="simple", unused_key=1))
    assert isinstance(backbone, OpenClipBackbone)
    assert backbone.reference_head_kind == "zeroshot" and backbone.features_normalized
    assert backbone.feature_dim == 16
    ident = backbone.identity()
    assert ident == {
        "backbone": "open_clip",
        "model": "robustft-tiny-clip",
        "pretrained": Path(tiny_open_clip["checkpoint"]).name,
        "weights_sha256": file_sha256(tiny_open_clip["checkpoint"]),
        "preprocessing": "32px_bicubic",
        "templates": "simple",
        "model_config_sha256": file_sha256(tiny_open_clip["model_config"])[:16],
    }
    with pytest.raises(ValueError, match="ensemble7"):
        build_backbone(spec_of(tiny_open_clip, templates="nope"))


# ----------------------------------------------------------------------------------------------------- templates
def test_templates():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(OPENAI_IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for sets in TEMPLATE_SETS.values() for t in sets)
    # same list, same order as open_clip's copy of the OpenAI templates (wise-ft order)
    assert OPENAI_IMAGENET_TEMPLATES == [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert SIMPLE_TEMPLATE == ["a photo of a {}."]
    assert TIP_ADAPTER_7 == [t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]
    assert len(TIP_ADAPTER_7) == 7 and set(TIP_ADAPTER_7) <= set(OPENAI_IMAGENET_TEMPLATES)
    assert get_templates("simple") == SIMPLE_TEMPLATE
    assert get_templates("openai_imagenet") is not OPENAI_IMAGENET_TEMPLATES  # a copy
    with pytest.raises(ValueError, match=r"allowed: \['ensemble7', 'openai_imagenet', 'simple'\]"):
        get_templates("openai")
