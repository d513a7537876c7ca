"""One module decides the device: robustft.devices (resolve_device, autocast_for)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustft.devices import autocast_for, resolve_device

ROBUSTFT = Path(__file__).resolve().parents[1] / "robustft"


def test_resolve_device_picks_cuda_only_where_there_is_one_and_refuses_a_missing_one():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"device: unknown device 'tpu'; allowed: \['auto', 'cpu', 'cuda'\]"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda' requested but no CUDA device is available"):
            resolve_device("cuda")


def test_autocast_is_fp32_on_cpu():
    with autocast_for(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_no_other_module_decides_the_device():
    deciding = [str(p.relative_to(ROBUSTFT)) for p in ROBUSTFT.rglob("*.py")
                if p.name != "devices.py" and ("cuda.is_available" in p.read_text() or "def resolve_device" in p.read_text())]
    assert deciding == []
