"""A tiny conv backbone and colour-coded images, shared by the trainer and method tests."""

from __future__ import annotations

import torch
from torch import nn

from robustft.backbones.base import Backbone, Preprocessing
from robustft.data.pixels import PixelSplit

CLASSES = ["dog", "cat", "bird"]


class TinyEncoder(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU -> conv1x1 -> ReLU -> global mean: (N, 3, 8, 8) -> (N, 12)."""

    def __init__(self, explode: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 12, 1)
        self.explode = explode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explode:
            raise AssertionError("the image encoder ran")
        return torch.relu(self.point(torch.relu(self.bn(self.conv(x))))).mean(dim=(2, 3))


class TinyBackbone(Backbone):
    def __init__(self, explode: bool = False) -> None:
        self.explode = explode
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self._state = TinyEncoder().state_dict()

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(8, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    @property
    def feature_dim(self) -> int:
        return 12

    def build_encoder(self) -> nn.Module:
        encoder = TinyEncoder(self.explode)
        encoder.load_state_dict(self._state)
        return encoder

    def identity(self) -> dict:
        return {"backbone": "tiny"}


def tiny_data(per_class: int = 8, seed: int = 0, size: int = 8) -> PixelSplit:
    """Images whose mean colour depends on the class, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    base = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=torch.float32)[labels]
    noise = torch.randint(-40, 40, (len(labels), size, size, 3), generator=g).float()
    pixels = (base[:, None, None, :] + noise).clamp(0, 255).to(torch.uint8)
    return PixelSplit(pixels, labels, torch.arange(len(labels)))


class NormFreeBackbone(TinyBackbone):
    """:class:`TinyBackbone` without its BatchNorm (an identity instead): a training step's result does not depend on
    how its batch is cut into micro-batches or ranks (batch statistics would)."""

    def build_encoder(self) -> nn.Module:
        encoder = super().build_encoder()
        encoder.bn = nn.Identity()
        return encoder
