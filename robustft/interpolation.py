"""Weight-space interpolation between two checkpoints: WiSE-FT and its Fisher-weighted variant.

Follows ``mlfoundations/wise-ft`` ``src/wise_ft.py::_merge`` (Wortsman et al. 2022, Eq. 1):
θ_α = (1−α)·θ_0 + α·θ_1 over every key of the state dict, encoder and head alike.

Non-floating entries (integer or boolean buffers such as BatchNorm's ``num_batches_tracked``) cannot be
averaged; they are copied from the nearer end point: θ_0's for α < 0.5, θ_1's for α ≥ 0.5.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    return alpha


def _check_keys(theta0: StateDict, theta1: StateDict, names: tuple[str, str] = ("theta0", "theta1")) -> None:
    for key in theta0:
        if key not in theta1:
            raise ValueError(f"key {key!r} is in {names[0]} but not in {names[1]}")
    for key in theta1:
        if key not in theta0:
            raise ValueError(f"key {key!r} is in {names[1]} but not in {names[0]}")


def _check_pair(key: str, t0: Tensor, t1: Tensor) -> None:
    if t0.shape != t1.shape:
        raise ValueError(f"shape mismatch for key {key!r}: {tuple(t0.shape)} vs {tuple(t1.shape)}")
    if t0.dtype != t1.dtype:
        raise ValueError(f"dtype mismatch for key {key!r}: {t0.dtype} vs {t1.dtype}")


def _is_interpolable(t: Tensor) -> bool:
    return t.is_floating_point()


def interpolate_state_dicts(theta0: StateDict, theta1: StateDict, alpha: float) -> dict[str, Tensor]:
    """WiSE-FT θ_α = (1−α)·θ_0 + α·θ_1 over every key (wise-ft ``_merge`` without Fishers).

    α = 0 returns θ_0 and α = 1 returns θ_1 bit-exactly (as new tensors); non-float entries come from the
    nearer end point (θ_0 for α < 0.5, else θ_1).
    """
    alpha = _check_alpha(alpha)
    _check_keys(theta0, theta1)
    out: dict[str, Tensor] = {}
    for key, t0 in theta0.items():
        t1 = theta1[key]
        _check_pair(key, t0, t1)
        if _is_interpolable(t0):
            out[key] = (1 - alpha) * t0 + alpha * t1
        else:
            out[key] = (t0 if alpha < 0.5 else t1).clone()
    return out


@torch.no_grad()
def interpolate_into(out: dict[str, Tensor], theta0: StateDict, theta1: StateDict, alpha: float) -> None:
    """Write WiSE-FT θ_α = (1−α)·θ_0 + α·θ_1 into the preallocated tensors of ``out`` (no new allocations).

    Bit-identical to :func:`interpolate_state_dicts` at α = 0 and α = 1, equal up to rounding elsewhere
    (the in-place ``add_`` may fuse the multiply-add). ``out`` may alias θ_0 but not θ_1.
    """
    alpha = _check_alpha(alpha)
    _check_keys(theta0, theta1)
    _check_keys(theta0, out, ("theta0", "out"))
    for key, t0 in theta0.items():
        t1, o = theta1[key], out[key]
        _check_pair(key, t0, t1)
        if o.shape != t0.shape or o.dtype != t0.dtype:
            raise ValueError(
                f"out[{key!r}] has shape {tuple(o.shape)} and dtype {o.dtype}, "
                f"expected {tuple(t0.shape)} and {t0.dtype}"
            )
        if o.numel() and o.data_ptr() == t1.data_ptr():
            # Writing (1-α)·θ_0 into θ_1's memory would destroy θ_1 before it is read.
            raise ValueError(f"out[{key!r}] aliases theta1[{key!r}]")
        if _is_interpolable(t0):
            torch.mul(t0, 1 - alpha, out=o)
            o.add_(t1, alpha=alpha)
        else:
            o.copy_(t0 if alpha < 0.5 else t1)


def fisher_weighted_interpolation(
    theta0: StateDict,
    theta1: StateDict,
    fisher0: StateDict,
    fisher1: StateDict,
    alpha: float,
    *,
    floor: float = 1e-8,
) -> dict[str, Tensor]:
    """Fisher-weighted merge of wise-ft ``_merge`` (Matena & Raffel 2021): θ = (c0·θ_0 + c1·θ_1)/(c0 + c1).

    c0 = (1−α)·max(F_0, floor), c1 = α·max(F_1, floor); keys with no Fisher in either dict fall back to
    :func:`interpolate_state_dicts`, and a key with a Fisher in only one of the two is an error.
    """
    alpha = _check_alpha(alpha)
    _check_keys(theta0, theta1)
    plain = interpolate_state_dicts(theta0, theta1, alpha)
    out: dict[str, Tensor] = {}
    for key, t0 in theta0.items():
        in0, in1 = key in fisher0, key in fisher1
        if in0 != in1:
            raise ValueError(f"key {key!r} has a Fisher in {'fisher0' if in0 else 'fisher1'} only")
        if not in0 or not _is_interpolable(t0):
            out[key] = plain[key]
            continue
        t1, f0, f1 = theta1[key], fisher0[key], fisher1[key]
        for name, f in (("fisher0", f0), ("fisher1", f1)):
            if f.shape != t0.shape:
                raise ValueError(f"{name}[{key!r}] has shape {tuple(f.shape)}, expected {tuple(t0.shape)}")
        # At least float32, so that the 1e-8 floor does not underflow to 0 in half precision.
        work = torch.promote_types(t0.dtype, torch.float32)
        c0 = (1 - alpha) * torch.clamp(f0.to(work), min=floor)
        c1 = alpha * torch.clamp(f1.to(work), min=floor)
        out[key] = ((c0 * t0.to(work) + c1 * t1.to(work)) / (c0 + c1)).to(t0.dtype)
    return out


def state_dict_distance(theta0: StateDict, theta1: StateDict, keys: Iterable[str] | None = None) -> float:
    """Euclidean distance ‖θ_0 − θ_1‖₂ over the floating entries (all keys, or those in ``keys``), in float64."""
    if keys is None:
        _check_keys(theta0, theta1)
        keys = list(theta0)
    total = 0.0
    for key in keys:
        if key not in theta0 or key not in theta1:
            raise ValueError(f"key {key!r} is missing from {'theta0' if key not in theta0 else 'theta1'}")
        t0, t1 = theta0[key], theta1[key]
        _check_pair(key, t0, t1)
        if _is_interpolable(t0):
            diff = t0.detach().to(torch.float64) - t1.detach().to(torch.float64)
            total += float(diff.square().sum())
    return math.sqrt(total)
