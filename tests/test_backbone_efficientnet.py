"""EfficientNet-Lite0: real packaged ImageNet weights offline, correct preprocessing, refused checkpoints."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustft.backbones import build_backbone
from robustft.backbones.base import WeightsError, load_weights_file
from robustft.backbones.efficientnet import FEATURE_DIM, EfficientNetLite0, packaged_weights_path
from robustft.data.images import decode_for_cache

PHOTO = Path("/work/shared/data/PACS/photo")
DOG_CLASSES = set(range(151, 269))  # ImageNet-1k dog breeds
ELEPHANT_CLASSES = {101, 385, 386}  # tusker, Indian elephant, African elephant
N_IMAGES = 8


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def packaged_state() -> dict[str, torch.Tensor]:
    return load_weights_file(packaged_weights_path())


def test_packaged_weights_load_offline(offline):
    backbone = build_backbone({"name": "efficientnet_lite0", "image_size": 64, "weights": None})
    assert isinstance(backbone, EfficientNetLite0)
    assert backbone.weights_path == packaged_weights_path() and backbone.weights_path.is_file()
    encoder = backbone.build_encoder().eval()
    with torch.inference_mode():
        features = encoder(backbone.preprocessing.normalize(torch.zeros(2, 64, 64, 3, dtype=torch.uint8)))
    assert tuple(features.shape) == (2, FEATURE_DIM) == (2, backbone.feature_dim)
    assert torch.isfinite(features).all()
    identity = backbone.identity()
    assert identity["backbone"] == "efficientnet_lite0"
    assert identity["preprocessing"] == "64px_bilinear"
    assert len(identity["weights_sha256"]) == 64  # the whole SHA-256 (issue #20: caches and run.json record it)
    # the encoder carries the pre-trained trunk, not a fresh initialisation
    state = load_weights_file(backbone.weights_path)
    torch.testing.assert_close(encoder.net._conv_stem.weight, state["_conv_stem.weight"])


def test_preprocessing_scales_as_efficientnet_lite_expects():
    pre = EfficientNetLite0(224).preprocessing
    # a 1 x 3 image whose pixels are grey levels 0, 127, 255 (same value in R, G, B)
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 1, 3, 1).expand(1, 1, 3, 3).contiguous()
    x = pre.normalize(pixels)  # (1, 3, 1, 3): (x - 127) / 128 in every channel
    for channel in range(3):
        torch.testing.assert_close(x[0, channel, 0], torch.tensor([-127 / 128, 0.0, 128 / 128]))
    assert pre.image_size == 224 and pre.interpolation == "bilinear"


def _first_images(class_name: str) -> list[Path]:
    return sorted((PHOTO / class_name).glob("*.jpg"))[:N_IMAGES]


@pytest.mark.skipif(not (PHOTO / "dog").is_dir() or not (PHOTO / "elephant").is_dir(), reason="PACS photos absent")
def test_imagenet_classifier_recognises_pacs_dogs_and_elephants(offline, packaged_state):
    """Encoder + the checkpoint's own ``_fc`` layer = the ImageNet classifier; right answers prove the weights and
    the preprocessing (resize, crop, normalisation) are right."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    backbone = EfficientNetLite0(224)
    encoder = backbone.build_encoder().eval()
    weight, bias = packaged_state["_fc.weight"], packaged_state["_fc.bias"]
    assert tuple(weight.shape) == (1000, FEATURE_DIM)
    pre = backbone.preprocessing
    for class_name, allowed in (("dog", DOG_CLASSES), ("elephant", ELEPHANT_CLASSES)):
        files = _first_images(class_name)
        assert len(files) == N_IMAGES
        pixels = torch.from_numpy(np.stack([decode_for_cache(f, pre.image_size, pre.interpolation) for f in files]))
        with torch.inference_mode():
            predictions = (encoder(pre.normalize(pixels)) @ weight.T + bias).argmax(1).tolist()
        hits = sum(p in allowed for p in predictions)
        assert hits >= 6, f"{class_name}: ImageNet predictions {predictions}, only {hits}/{N_IMAGES} in {sorted(allowed)[:5]}..."


def test_checkpoint_of_the_wrong_architecture_is_refused(tmp_path):
    tiny = nn.Linear(4, 2)
    path = tmp_path / "tiny_linear.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    with pytest.raises(WeightsError) as info:
        EfficientNetLite0(32, weights=str(path)).build_encoder()
    message = str(info.value)
    assert str(path) in message and "not an EfficientNet-Lite0 checkpoint" in message


def test_checkpoint_with_mismatched_shapes_is_refused(tmp_path, packaged_state):
    state = {k: v.contiguous() for k, v in packaged_state.items()}
    state["_conv_head.weight"] = torch.zeros(1000, *state["_conv_head.weight"].shape[1:])
    path = tmp_path / "wrong_width.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as info:
        EfficientNetLite0(32, weights=str(path)).build_encoder()
    assert str(path) in str(info.value)


def test_missing_and_invalid_weights_files(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        EfficientNetLite0(32, weights=str(tmp_path / "absent.safetensors")).build_encoder()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a valid safetensors file") as info:
        load_weights_file(broken)
    assert str(broken) in str(info.value)


class _Payload:
    """Unpickling this object opens (creates) the marker file: what a malicious checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_with_arbitrary_objects_is_never_unpickled(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {"_conv_stem.weight": torch.zeros(1), "payload": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(state, handle, protocol=2)
    with pytest.raises(WeightsError) as info:
        load_weights_file(path)
    assert str(path) in str(info.value) and "refused" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsError):
        EfficientNetLite0(32, weights=str(path)).build_encoder()
    assert not marker.exists()

    # control: the payload is real, an ordinary unpickler does create the marker
    if writer == "pickle.dump":
        with open(path, "rb") as handle:
            pickle.load(handle)
        assert marker.exists()


def test_weights_only_torch_file_with_a_state_dict_loads(tmp_path, packaged_state):
    path = tmp_path / "lite0.pt"
    torch.save({"state_dict": packaged_state}, path)
    state = load_weights_file(path)
    assert set(state) == set(packaged_state)
    encoder = EfficientNetLite0(32, weights=str(path)).build_encoder()
    torch.testing.assert_close(encoder.net._conv_stem.weight, packaged_state["_conv_stem.weight"])
