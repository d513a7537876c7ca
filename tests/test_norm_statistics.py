"""training.norm_statistics: BatchNorm running statistics updated (train) or kept at the pre-trained values (frozen)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from robustft.methods.base import TrainingHyperparameters
from robustft.training.context import Split
from robustft.training.run import RunData, RunSpec, finetune_run
from tiny_backbone import CLASSES, TinyBackbone, tiny_data


def _fine_tune(tmp_path, norm_statistics: str) -> tuple[dict, dict]:
    backbone = TinyBackbone()
    train, val = tiny_data(4, seed=0), tiny_data(2, seed=1)
    g = torch.Generator().manual_seed(1)
    head = {"head.weight": 0.1 * torch.randn(len(CLASSES), 12, generator=g), "head.bias": torch.zeros(len(CLASSES))}
    spec = RunSpec(method="full_ft", seed=0, training={"epochs": 2, "batch_size": 6, "lr": 1e-2, "warmup_steps": 0,
                                                      "select": "last", "norm_statistics": norm_statistics})
    data = RunData(CLASSES, Split(train.labels, train.pixels), Split(val.labels, val.pixels))
    run_dir = tmp_path / norm_statistics
    finetune_run(spec, data, backbone=backbone, reference_head=head, run_dir=run_dir, device="cpu")
    before = {f"encoder.{k}": v for k, v in backbone.build_encoder().state_dict().items()}
    return before, load_file(str(run_dir / "model.safetensors"))


@pytest.mark.parametrize("norm_statistics", ["train", "frozen"])
def test_frozen_keeps_the_pretrained_batchnorm_statistics_and_train_updates_them(tmp_path, norm_statistics):
    before, after = _fine_tune(tmp_path, norm_statistics)
    stats = ["encoder.bn.running_mean", "encoder.bn.running_var"]
    assert all(k in after for k in stats), sorted(after)
    unchanged = [torch.equal(before[k], after[k]) for k in stats]
    assert unchanged == ([True, True] if norm_statistics == "frozen" else [False, False])
    # the weights train either way (frozen statistics are not a frozen layer)
    assert not torch.equal(before["encoder.conv.weight"], after["encoder.conv.weight"])
    assert not torch.equal(before["encoder.bn.weight"], after["encoder.bn.weight"])


def test_norm_statistics_rejects_unknown_values():
    with pytest.raises(ValueError, match="norm_statistics"):
        TrainingHyperparameters(norm_statistics="adapt")
