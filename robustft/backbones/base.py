"""The small interface every backbone implements: preprocessing, a pre-trained image encoder, a reference head."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn


class WeightsError(RuntimeError):
    """Pre-trained weights could not be loaded (offline, missing file, wrong architecture, unsafe format)."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``image_size`` with ``interpolation``, centre-crop, then normalise."""

    image_size: int
    interpolation: str  # "bicubic" or "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def pixel_key(self) -> str:
        """Names the uint8 pixel cache: normalisation is applied on the fly, so it is not part of the key."""
        return f"{self.image_size}px_{self.interpolation}"

    def normalize(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float normalised, channels-last memory format."""
        x = pixels_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


class Backbone(ABC):
    """A pre-trained image encoder with its preprocessing and its reference-head recipe."""

    #: "zeroshot" (head from class-name prompts) or "linear_probe" (head fitted on cached ID-train features)
    reference_head_kind: str = "linear_probe"

    @property
    @abstractmethod
    def preprocessing(self) -> Preprocessing: ...

    @property
    @abstractmethod
    def feature_dim(self) -> int: ...

    @abstractmethod
    def build_encoder(self) -> nn.Module:
        """A fresh copy of the pre-trained image encoder: pixels (N, 3, H, W) -> features (N, D)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What the encoder's outputs depend on (model, weights id, preprocessing): stored with every cache."""

    @property
    def features_normalized(self) -> bool:
        """Whether the reference head L2-normalises features (True for CLIP heads)."""
        return False

    def zeroshot_head_weights(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """(C, D) zero-shot head weights; only backbones with a text tower implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower: its reference head is a linear probe")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a safetensors file or a weights-only torch file; never unpickle arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: refused: not a safetensors or weights-only torch file ({first})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    return state
