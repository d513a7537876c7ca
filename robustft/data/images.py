"""Image decoding: any PIL-readable file resized and centre-cropped once into uint8 RGB arrays, as open_clip does."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class BadImageError(ValueError):
    """An image file is truncated, corrupt, unreadable or not an image; the message names the file."""


def unreadable_reason(path: str | Path, error: OSError | None = None) -> str:
    """One line saying why a file the scan listed cannot be read (dangling symlink, vanished, permission...)."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"unreadable file {path}: dangling symlink to {os.readlink(path)}"
    if not os.path.lexists(path):
        return f"unreadable file {path}: it vanished after the folder scan"
    detail = f"{type(error).__name__}: {error}" if error is not None else "cannot be opened"
    return f"unreadable file {path}: {detail}"


def open_image(path: str | Path, draft: bool = False) -> Image.Image:
    """Decode ``path`` fully in its own mode (no conversion); ``draft``: JPEGs at 1/8 scale (see :func:`check_image`).

    A truncated or corrupt file, a file that is not an image or a decompression bomb raises :class:`BadImageError`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if draft and image.format == "JPEG":
                    image.draft(None, (1, 1))
                image.load()  # the file is closed on leaving the block; the decoded image stays usable
                return image
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise BadImageError(unreadable_reason(path, exc)) from None
    except Exception as exc:
        raise BadImageError(f"bad image {path}: {type(exc).__name__}: {exc}") from None


def to_rgb(image: Image.Image, path: str | Path) -> Image.Image:
    """``image`` converted to RGB (grayscale, palette, RGBA and CMYK are converted, not rejected)."""
    try:
        return image.convert("RGB")
    except Exception as exc:
        raise BadImageError(f"bad image {path}: mode {image.mode} does not convert to RGB ({exc})") from None


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size``, as torchvision's ``Resize(size)`` computes it.

    The longer side is truncated, not rounded: ``int(size * long / short)`` (500 x 375 at 224 -> 298 x 224).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_center_crop(image: Image.Image, size: int, interpolation: str) -> np.ndarray:
    """open_clip's eval transform before ``ToTensor``: ``Resize(size)``, ``CenterCrop(size)``, then ``convert("RGB")``.

    The image is resized in its own mode, as torchvision does with a PIL image: PIL resizes palette images with
    NEAREST and RGBA/LA with premultiplied alpha, so converting to RGB first would give other pixels.
    """
    width, height = image.size
    new_size = resized_size(width, height, size)
    if new_size != (width, height):
        image = image.resize(new_size, _RESAMPLE[interpolation])
    new_w, new_h = new_size
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_for_cache(path: str | Path, size: int, interpolation: str, border: int = 0) -> np.ndarray:
    """Decode one file into a (size, size, 3) uint8 array, first cutting ``border`` pixels from every side."""
    image = open_image(path)
    if border:
        width, height = image.size
        image = image.crop((border, border, width - border, height - border))
    try:
        return resize_center_crop(image, size, interpolation)
    except Exception as exc:
        raise BadImageError(f"bad image {path}: {type(exc).__name__}: {exc}") from None


def check_image(path: str | Path) -> str | None:
    """``None`` when the file decodes as an image that converts to RGB, else a one-line reason.

    JPEGs are decoded in draft mode: libjpeg scales the DCT down 8x, skipping most of the inverse transform and the
    colour conversion, but still reads and entropy-decodes every scan, so a truncated or broken stream fails as in a
    full decode (tests cut files at many points). Other formats are decoded fully.
    """
    try:
        to_rgb(open_image(path, draft=True), path)
    except BadImageError as exc:
        return str(exc)
    return None
