"""Data parallel training on CPU: 2 gloo ranks (torch.distributed, one process each) equal 1 rank at the same global
batch, and a 2-rank run killed mid-training resumes to the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from robustft.distributed import SINGLE, Group
from robustft.training.checkpoint import load_safetensors
from robustft.training.context import Split
from robustft.training.run import RunData, RunSpec, finetune_ranks, read_train_log

from test_accumulation import assert_close_tensors, features_of, reference_head  # noqa: E402
from tiny_backbone import CLASSES, NormFreeBackbone, tiny_data  # noqa: E402

#: 17 training rows, batches of 8, 8 and 1: in the last step rank 1 holds no example
TRAINING = {"epochs": 2, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1, "select": "best_val",
            "checkpoint_every": 2}


def tiny_run_data() -> RunData:
    backbone = NormFreeBackbone()
    train, val = tiny_data(6, 0), tiny_data(2, 1)
    split = Split(train.labels, train.pixels, features_of(backbone, train)).rows(torch.arange(17))
    return RunData(class_names=CLASSES, train=split, val=Split(val.labels, val.pixels, features_of(backbone, val)))


class Killed(Exception):
    pass


class KillAfter:
    """``on_step_end`` that stops every rank after ``step`` (picklable, for the spawned ranks)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, step: int) -> None:
        if step == self.step:
            raise Killed(f"killed after step {step}")


def run_ft(run_dir, devices: int, **kwargs) -> dict:
    spec = RunSpec(method="full_ft", seed=0, training={**TRAINING, "devices": devices})
    return finetune_ranks(spec, tiny_run_data(), backbone=NormFreeBackbone(), reference_head=reference_head(),
                          run_dir=run_dir, device="cpu", threads=1, **kwargs)


def test_two_gloo_ranks_equal_one_process_and_resume_after_a_kill(tmp_path):
    one = run_ft(tmp_path / "one", 1)
    two = run_ft(tmp_path / "two", 2)
    assert one["steps"] == two["steps"] == 6
    assert two["hyperparameters"]["devices"] == 2
    assert_close_tensors(load_safetensors(tmp_path / "one" / "model.safetensors"),
                         load_safetensors(tmp_path / "two" / "model.safetensors"))
    log_one, log_two = read_train_log(tmp_path / "one"), read_train_log(tmp_path / "two")
    for column in ("loss", "grad_norm", "val_accuracy"):
        torch.testing.assert_close(torch.tensor(log_two[column].to_numpy()), torch.tensor(log_one[column].to_numpy()),
                                   equal_nan=True)

    with pytest.raises(mp.ProcessRaisedException, match="killed after step 5"):
        run_ft(tmp_path / "cut", 2, on_step_end=KillAfter(5))
    assert (tmp_path / "cut.resume" / "resume.pt").is_file() and not (tmp_path / "cut" / "run.json").exists()
    resumed = run_ft(tmp_path / "cut", 2)
    assert resumed["resumed_at_step"] == 4
    whole, cut = load_safetensors(tmp_path / "two" / "model.safetensors"), load_safetensors(tmp_path / "cut" / "model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert not (tmp_path / "cut.resume").exists()


def test_flyp_on_two_gloo_ranks_equals_one_process(tmp_path, tiny_open_clip):
    """FLYP's contrastive loss over the whole global batch: features gathered from both ranks (GradCache)."""
    from robustft.backbones import build_backbone

    spec_backbone = {"name": "open_clip", "model": tiny_open_clip["model"],
                     "model_config": tiny_open_clip["model_config"], "pretrained": tiny_open_clip["checkpoint"]}
    backbone = build_backbone(spec_backbone)
    train, val = tiny_data(2, 0, size=32), tiny_data(1, 1, size=32)
    data = RunData(class_names=CLASSES, train=Split(train.labels, train.pixels), val=Split(val.labels, val.pixels))
    head = {"head.weight": backbone.zeroshot_head_weights(CLASSES, device="cpu"), "head.bias": torch.zeros(3)}
    training = {"epochs": 2, "batch_size": 6, "lr": 1e-3, "warmup_steps": 1, "select": "last"}
    states = {}
    for devices, micro in ((1, None), (2, 2)):
        spec = RunSpec(method="flyp", seed=0, training={**training, "devices": devices, "micro_batch_size": micro})
        finetune_ranks(spec, data, backbone=spec_backbone, reference_head=head, run_dir=tmp_path / str(devices),
                       device="cpu", threads=1)
        states[devices] = load_safetensors(tmp_path / str(devices) / "model.safetensors")
    # atol: see test_flyp_accumulated_contrastive_step_equals_the_whole_batch (AdamW on ~1e-8 gradients)
    assert_close_tensors(states[1], states[2], atol=5e-5)


def test_a_single_process_group_needs_no_process_group():
    assert SINGLE.world_size == 1 and SINGLE.is_main and not SINGLE.parallel
    t = torch.ones(3)
    SINGLE.all_reduce_([t])
    assert torch.equal(t, torch.ones(3))
    assert Group(1, 2).shard(torch.arange(7)).tolist() == [1, 3, 5]
    assert Group(0, 2).counts(5) == [3, 2]
    with pytest.raises(ValueError, match="rank 2 outside"):
        Group(2, 2)


def test_slurm_dry_run_asks_for_the_variants_devices_on_one_node(tmp_path):
    """``training.devices: 2``: each finetune job asks Slurm for 2 GPUs on one node (with the gpu limit raised)."""
    import os
    import re
    import subprocess

    from pipeline_utils import REPO, SNAKEMAKE  # noqa: E402

    config = tmp_path / "devices.yaml"
    config.write_text("training: {devices: 2}\n")
    proc = subprocess.run([str(SNAKEMAKE), "--profile", "slurm", "-n", "--forceall", "--configfile", str(config),
                           "--resources", "gpu=2", "--until", "finetune"], capture_output=True, text=True,
                          timeout=300, cwd=str(REPO), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    jobs = re.findall(r"^rule (finetune|features):\n((?:    .*\n)*)", out, re.M)
    requested = {rule: dict(item.split("=", 1) for item in re.search(r"resources: (.*)", body)[1].split(", "))
                 for rule, body in jobs}
    assert requested["finetune"]["gpu"] == "2" and requested["finetune"]["nodes"] == "1", requested["finetune"]
    assert requested["features"]["gpu"] == "1"
