"""The classifier every method trains and every analysis evaluates: an image encoder and a linear head."""

from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Linear):
    """Linear head; with ``normalize`` the input features are L2-normalised first (CLIP zero-shot head)."""

    def __init__(self, in_features: int, num_classes: int, normalize: bool = False) -> None:
        super().__init__(in_features, num_classes, bias=True)
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return super().forward(features)


class ImageClassifier(nn.Module):
    """``head(encoder(pixels))``; ``encoder`` maps normalised pixels (N, 3, H, W) to features (N, D).

    The state dict has keys ``encoder.*`` and ``head.weight`` / ``head.bias``: WiSE-FT interpolates every entry.
    """

    def __init__(self, encoder: nn.Module, head: ClassificationHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels))
