"""Checkpoints: resumable training state (weights-only torch files) and the final safetensors file, both atomic."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from robustft.io.atomic import atomic_path

RESUME_FORMAT = 1
RESUME_FILE = "resume.pt"
BEST_FILE = "best.safetensors"


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy and torch CPU generator states, and on a CUDA ``device`` that device's, in types a weights-only
    ``torch.load`` accepts. One device only: a job requeued on a node that shows fewer GPUs must still resume."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).copy()), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_resume_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a resumable training state atomically (a crash mid-write leaves the previous one intact)."""
    with atomic_path(path) as tmp:
        torch.save({"format": RESUME_FORMAT, **state}, tmp)


def load_resume_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved state, or None when there is none or it belongs to another configuration (then training restarts)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: start again rather than fail the job
        import warnings

        warnings.warn(f"{path}: unreadable resume checkpoint ignored ({type(exc).__name__}: {exc})")
        return None
    if state.get("format") != RESUME_FORMAT or state.get("fingerprint") != fingerprint:
        import warnings

        warnings.warn(f"{path}: resume checkpoint from another configuration ignored; training starts afresh")
        return None
    return state


def save_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` (made contiguous, unshared, on CPU) to a safetensors file atomically; returns its size."""
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=dict(metadata or {}))
    return path.stat().st_size


def load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@dataclass
class TrainState:
    """Where training stands, all a resume needs besides weights, optimizer and RNGs: ``step`` optimizer steps done,
    ``position`` batches of epoch ``epoch`` done, the log so far, and the best ID-validation epoch so far."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    log: list[dict[str, float]] = field(default_factory=list)
    best_val: float | None = None
    best_epoch: int | None = None


class ResumeCheckpoints:
    """The resumable state of one run in ``directory`` (None: checkpoints off): ``resume.pt`` with weights, optimizer,
    scheduler, RNG states and :class:`TrainState`, keyed by ``fingerprint``; ``best.safetensors`` with the tensors
    of the best epoch so far. ``write`` False: only read them (the data-parallel ranks other than rank 0)."""

    def __init__(self, directory: Path | None, fingerprint: str, device: torch.device, write: bool = True) -> None:
        self.fingerprint, self.device, self.write = fingerprint, device, write
        self.resume_path = Path(directory) / RESUME_FILE if directory else None
        self.best_path = Path(directory) / BEST_FILE if directory else None

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState | None:
        """Load the saved state into ``model``, ``optimizer``, ``scheduler`` and the RNGs; None when there is none."""
        if self.resume_path is None:
            return None
        saved = load_resume_checkpoint(self.resume_path, self.fingerprint)
        if saved is None:
            return None
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"], self.device)
        return TrainState(step=saved["step"], epoch=saved["epoch"], position=saved["position"], log=list(saved["log"]),
                          best_val=saved["best_val"], best_epoch=saved["best_epoch"])

    def save(self, state: TrainState, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        if self.resume_path is None or not self.write:
            return
        save_resume_checkpoint(self.resume_path, {
            "fingerprint": self.fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(self.device), "step": state.step,
            "epoch": state.epoch, "position": state.position, "log": state.log, "best_val": state.best_val,
            "best_epoch": state.best_epoch,
        })

    def save_best(self, tensors: Mapping[str, Tensor]) -> None:
        if self.best_path is not None and self.write:
            save_safetensors(self.best_path, tensors)

    def load_best(self) -> dict[str, Tensor]:
        if self.best_path is None or not self.best_path.is_file():
            raise FileNotFoundError(f"{self.best_path}: the best epoch's tensors of a resumed run are missing")
        return load_safetensors(self.best_path)
