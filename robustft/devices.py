"""The one place that decides where tensors run: ``resolve_device`` (cpu / cuda) and ``autocast_for`` (bf16 on CUDA)."""

from __future__ import annotations

import contextlib

import torch

DEVICE_NAMES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. Asking for CUDA where there is none is an error, not a silent CPU run.

    Also accepts ``cuda:N`` and a ``torch.device``; any other name raises ``ValueError`` naming the allowed ones.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device: unknown device {device!r}; allowed: {list(DEVICE_NAMES)} (or cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA device is available")
    return torch.device(device)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, a no-op context on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


__all__ = ["DEVICE_NAMES", "autocast_for", "resolve_device"]
