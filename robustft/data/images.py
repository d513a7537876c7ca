"""Image decoding: any PIL-readable file to RGB, resized and centre-cropped once into uint8 arrays."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class BadImageError(ValueError):
    """An image file is truncated, corrupt or not an image; the message names the file."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully and convert it to RGB (grayscale, palette, RGBA and CMYK are converted, not rejected)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
    except Exception as exc:
        raise BadImageError(f"bad image {path}: {type(exc).__name__}: {exc}") from None


def resize_center_crop(image: Image.Image, size: int, interpolation: str) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop to ``size`` x ``size`` (torchvision's semantics)."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), _RESAMPLE[interpolation])
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_for_cache(path: str | Path, size: int, interpolation: str, border: int = 0) -> np.ndarray:
    """Decode one file into a (size, size, 3) uint8 array, first cutting ``border`` pixels from every side."""
    image = load_rgb(path)
    if border:
        width, height = image.size
        image = image.crop((border, border, width - border, height - border))
    return resize_center_crop(image, size, interpolation)


def check_image(path: str | Path) -> str | None:
    """``None`` when the file decodes as an image, else a one-line reason."""
    try:
        load_rgb(path)
    except BadImageError as exc:
        return str(exc)
    return None
