"""The shared trainer: schedule, NaN guard, resume after a kill, checkpoints, determinism, run directory."""

from __future__ import annotations

import json
import logging
import math
import random
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from robustft.backbones.base import Backbone
from robustft.data.pixels import PixelSplit
from robustft.methods import METHODS, get_method
from robustft.methods.base import resolve_hyperparameters
from robustft.methods.full_ft import FullFineTuning
from robustft.methods.l2sp import L2SP
from robustft.io.progress import INTERVAL_ENV
from robustft.training import trainer as trainer_module
from robustft.training.checkpoint import (
    ResumeCheckpoints,
    TrainState,
    load_resume_checkpoint,
    load_safetensors,
    rng_state,
    save_resume_checkpoint,
    save_safetensors,
    set_rng_state,
)
from robustft.training.context import Split, TrainContext
from robustft.training.run import RunData, RunSpec, finetune_run, load_run_state, read_train_log
from robustft.training.schedule import warmup_cosine_factor
from robustft.training.trainer import BestEpoch, build_optimization, train_epoch

from tiny_backbone import CLASSES, TinyBackbone, tiny_data  # noqa: E402
TRAINING = {"epochs": 3, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1, "grad_clip": 1.0}




def features_of(backbone: Backbone, split: PixelSplit) -> torch.Tensor:
    encoder = backbone.build_encoder().eval()
    with torch.no_grad():
        return encoder(backbone.preprocessing.normalize(split.pixels))


def reference_head(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head.weight": 0.1 * torch.randn(len(CLASSES), 12, generator=g), "head.bias": torch.zeros(len(CLASSES))}


def reference_model(backbone: Backbone):
    from robustft.training.run import build_reference_model

    return build_reference_model(backbone, reference_head(), len(CLASSES))


def reference_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return reference_model(backbone).state_dict()


def run(method: str, run_dir, hparams: dict | None = None, training: dict | None = None, seed: int = 0,
        backbone: Backbone | None = None, variant: str = "default", train: PixelSplit | None = None, **kwargs) -> dict:
    train, val = train or tiny_data(8, seed=0), tiny_data(4, seed=1)
    data = RunData(class_names=CLASSES, train=Split(train.labels, train.pixels, features_of(TinyBackbone(), train)),
                   val=Split(val.labels, val.pixels, features_of(TinyBackbone(), val)))
    spec = RunSpec(method=method, seed=seed, variant=variant, hparams=hparams or {},
                   training={**TRAINING, **(training or {})})
    return finetune_run(spec, data, backbone=backbone or TinyBackbone(), reference_head=reference_head(),
                        run_dir=run_dir, device="cpu", **kwargs)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def comparable_log(run_dir) -> pd.DataFrame:
    return read_train_log(run_dir).drop(columns=["samples_per_s"])


# ------------------------------------------------------------------------------------------------------ tests
def test_warmup_cosine_schedule_shape():
    warmup, total = 4, 20
    factors = [warmup_cosine_factor(s, warmup, total) for s in range(total)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up, (step + 1) / warmup
    assert factors[4] == 1.0
    decay = factors[4:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing cosine
    assert decay[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert warmup_cosine_factor(8 + 4, 4, 20) == pytest.approx(0.5)  # half-way through the decay
    assert warmup_cosine_factor(3, 10, 5) == 0.4  # warm-up longer than the run: wise-ft keeps warming up


class NanAtThirdStep(FullFineTuning):
    name = "nan_at_third_step"

    def loss(self, model, batch, ctx):
        terms = super().loss(model, batch, ctx)
        if ctx.step == 2:
            terms["ce"] = terms["ce"] * float("nan")
        return terms


def test_nan_loss_stops_with_the_step_and_term(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, NanAtThirdStep.name, NanAtThirdStep)
    with pytest.raises(FloatingPointError, match=r"step 3 .*'ce'"):
        run(NanAtThirdStep.name, tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()


class Killed(Exception):
    pass


@pytest.mark.parametrize(
    "method, hparams",
    [("full_ft", {"augment": "flip", "checkpoint_every": 2}), ("lora", {"lora_dropout": 0.5, "checkpoint_every": 2})],
)
def test_resume_after_kill_is_bit_identical(tmp_path, method, hparams):
    reference = run(method, tmp_path / "whole", hparams)
    assert reference["steps"] == 9  # 3 epochs x 3 batches of 8

    def kill_after_step_5(step: int) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        run(method, tmp_path / "cut", hparams, on_step_end=kill_after_step_5)
    assert (tmp_path / "cut.resume" / "resume.pt").is_file()
    assert not (tmp_path / "cut" / "run.json").exists()
    resumed = run(method, tmp_path / "cut", hparams)
    assert resumed["resumed_at_step"] == 4  # the last checkpoint before the kill (every 2 steps)
    assert not (tmp_path / "cut.resume").exists()  # removed once the run is complete

    file = get_method(method).checkpoint_file
    assert_same_state(load_safetensors(tmp_path / "whole" / file), load_safetensors(tmp_path / "cut" / file))
    pd.testing.assert_frame_equal(comparable_log(tmp_path / "whole"), comparable_log(tmp_path / "cut"))
    for key in ("best_epoch", "best_val_accuracy", "last_val_accuracy", "steps"):
        assert resumed[key] == reference[key], key


def test_same_seed_is_deterministic_and_seed_matters(tmp_path):
    a = run("full_ft", tmp_path / "a", {"augment": "flip"})
    b = run("full_ft", tmp_path / "b", {"augment": "flip"})
    c = run("full_ft", tmp_path / "c", {"augment": "flip"}, seed=1)
    assert_same_state(load_safetensors(tmp_path / "a/model.safetensors"), load_safetensors(tmp_path / "b/model.safetensors"))
    pd.testing.assert_frame_equal(comparable_log(tmp_path / "a"), comparable_log(tmp_path / "b"))
    assert a["best_val_accuracy"] == b["best_val_accuracy"]
    state_a, state_c = load_safetensors(tmp_path / "a/model.safetensors"), load_safetensors(tmp_path / "c/model.safetensors")
    assert not torch.equal(state_a["head.weight"], state_c["head.weight"])
    assert c["seed"] == 1


def test_run_directory_log_and_record(tmp_path):
    record = run("full_ft", tmp_path / "run", variant="demo", extra_record={"pipeline_commit": "abc"})
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["model.safetensors", "run.json", "train_log.parquet"]
    on_disk = json.loads((tmp_path / "run" / "run.json").read_text())
    assert on_disk["method"] == "full_ft" and on_disk["variant"] == "demo" and on_disk["seed"] == 0
    assert on_disk["pipeline_commit"] == "abc"
    assert on_disk["hyperparameters"]["lr"] == TRAINING["lr"]
    assert on_disk["protocol"] == {"kind": "full", "absent_classes": [], "n_train": 24}
    assert on_disk["trainable_parameters"] == on_disk["total_parameters"] == record["total_parameters"]
    assert on_disk["checkpoint"]["size_bytes"] == (tmp_path / "run" / "model.safetensors").stat().st_size
    assert set(on_disk["versions"]) >= {"torch", "open_clip", "peft", "python"}
    assert on_disk["best_epoch"] in (0, 1, 2) and on_disk["wall_time_s"] > 0

    log = read_train_log(tmp_path / "run")
    assert list(log["step"]) == list(range(1, 10))
    assert {"epoch", "lr", "loss_ce", "loss", "grad_norm", "samples_per_s", "val_accuracy"} <= set(log.columns)
    assert log["val_accuracy"].notna().sum() == 3  # one per epoch, on its last step
    assert log["lr"].iloc[0] == pytest.approx(TRAINING["lr"])  # warm-up of 1 step
    best = log.loc[log["val_accuracy"].notna(), "val_accuracy"]
    assert on_disk["best_val_accuracy"] == best.max()
    assert on_disk["best_epoch"] == int(log.loc[best.idxmax(), "epoch"])

    reference = reference_state(TinyBackbone())
    assert load_run_state(tmp_path / "run", reference).keys() == reference.keys()
    from robustft.training.run import RUN_RECORD_KEYS

    assert set(on_disk) == RUN_RECORD_KEYS | {"pipeline_commit"}
    with pytest.raises(ValueError, match=r"extra_record may not replace run.json keys \['seed'\]"):
        run("full_ft", tmp_path / "other", extra_record={"seed": 3})


def validation_accuracies(monkeypatch, values: list[float]) -> None:
    """The trainer's per-epoch validation returns ``values`` in turn (selection only; training is unchanged)."""
    sequence = iter(values)
    monkeypatch.setattr(trainer_module, "evaluate_accuracy", lambda *args: next(sequence))


def test_select_last_keeps_the_final_weights(tmp_path, monkeypatch):
    validation_accuracies(monkeypatch, [0.9, 0.5, 0.1])
    last = run("full_ft", tmp_path / "last", {"select": "last"})
    validation_accuracies(monkeypatch, [0.9, 0.5, 0.1])
    first = run("full_ft", tmp_path / "first")  # best_val keeps epoch 0
    validation_accuracies(monkeypatch, [0.1, 0.5, 0.9])
    final = run("full_ft", tmp_path / "final")  # best_val keeps epoch 2, the weights training ends with
    assert (last["best_epoch"], first["best_epoch"], final["best_epoch"]) == (2, 0, 2)
    assert last["best_val_accuracy"] == last["last_val_accuracy"] == 0.1
    weights = {name: load_safetensors(tmp_path / name / "model.safetensors") for name in ("last", "first", "final")}
    assert_same_state(weights["last"], weights["final"])
    assert not torch.equal(weights["last"]["head.weight"], weights["first"]["head.weight"])


def test_best_epoch_keeps_the_first_of_equal_accuracies_and_copies_only_improvements():
    best, copies = BestEpoch(), []
    snapshot = lambda: copies.append(1) or {"w": torch.ones(1) * len(copies)}  # noqa: E731
    kept = [best.offer(epoch, accuracy, snapshot) for epoch, accuracy in enumerate([0.5, 0.7, 0.7, 0.6])]
    assert kept == [True, True, False, False] and (best.epoch, best.accuracy) == (1, 0.7)
    assert len(copies) == 2 and best.tensors["w"].item() == 2


class RecordingRows(FullFineTuning):
    """full_ft that records the training rows of every step."""

    name = "recording_rows"

    def loss(self, model, batch, ctx):
        ctx.state.setdefault("rows", []).append(batch.indices.clone())
        return super().loss(model, batch, ctx)


def test_an_epoch_visits_the_seeded_permutation_from_its_position():
    train_data = tiny_data(8, seed=0)
    method_cls = RecordingRows
    hp = resolve_hyperparameters(method_cls, TRAINING, {})
    backbone = TinyBackbone()
    ctx = TrainContext(hp=hp, seed=0, device=torch.device("cpu"), train=Split(train_data.labels, train_data.pixels),
                       val=Split(train_data.labels[:0], train_data.pixels[:0]),
                       normalize=backbone.preprocessing.normalize, backbone=backbone, class_names=CLASSES)
    method = method_cls(hp)
    model = method.prepare(reference_model(backbone), ctx)
    opt = build_optimization(method, model, hp, total_steps=9)
    order = torch.randperm(24, generator=ctx.generator("order", 1))
    state = TrainState(step=4, epoch=1, position=1)  # as a run resumed after batch 1 of epoch 1
    steps = []
    train_epoch(model, method, ctx, opt, state, after_step=lambda row: steps.append(row["step"]))
    assert torch.equal(torch.cat(ctx.state["rows"]), order[8:])
    assert steps == [5, 6] and (state.step, state.position) == (6, 3)


def test_resume_checkpoints_round_trip_the_state(tmp_path):
    model, device = nn.Linear(3, 2), torch.device("cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    off = ResumeCheckpoints(None, "abc", device)
    off.save(TrainState(step=1), model, optimizer, scheduler)
    assert off.restore(model, optimizer, scheduler) is None
    checkpoints = ResumeCheckpoints(tmp_path / "resume", "abc", device)
    assert checkpoints.restore(model, optimizer, scheduler) is None  # nothing saved yet
    state = TrainState(step=7, epoch=2, position=1, log=[{"step": 7, "loss": 0.5}], best_val=0.75, best_epoch=1)
    checkpoints.save(state, model, optimizer, scheduler)
    fresh = nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    restored = checkpoints.restore(fresh, fresh_optimizer, torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda s: 1.0))
    assert restored == state
    assert_same_state(fresh.state_dict(), model.state_dict())
    with pytest.raises(FileNotFoundError, match="best epoch"):
        checkpoints.load_best()
    with pytest.warns(UserWarning, match="another configuration"):
        assert ResumeCheckpoints(tmp_path / "resume", "other", device).restore(fresh, fresh_optimizer, scheduler) is None


class KilledAt5(Exception):
    pass


def test_progress_lines_epoch_accuracy_and_resume_note_without_carriage_returns(tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv(INTERVAL_ENV, "0")  # a line after every step
    caplog.set_level(logging.INFO, logger="robustft")

    def kill_after_step_5(step: int) -> None:
        if step == 5:
            raise KilledAt5

    with pytest.raises(KilledAt5):
        run("full_ft", tmp_path / "run", {"checkpoint_every": 2}, on_step_end=kill_after_step_5)
    first = [r.getMessage() for r in caplog.records]
    assert "finetune full_ft: epoch 1/3: ID-validation accuracy" in "\n".join(first)
    caplog.clear()
    run("full_ft", tmp_path / "run", {"checkpoint_every": 2})
    lines = [r.getMessage() for r in caplog.records]
    assert "finetune full_ft: resumed at step 4 (epoch 1, batch 1)" in lines
    steps = [int(m.group(1)) for m in map(re.compile(r"progress finetune full_ft: (\d+)/9 steps .*ETA .*loss=").match,
                                           lines) if m]
    assert steps == [5, 6, 7, 8, 9]
    epochs = [line for line in lines if "ID-validation accuracy" in line]
    assert [line.split(":")[1].strip() for line in epochs] == ["epoch 2/3", "epoch 3/3"]
    assert any(line.startswith("done finetune full_ft: 9 steps") for line in lines)
    out, err = capfd.readouterr()
    assert "\r" not in "".join(first + lines) + out + err  # no carriage-return bar anywhere


def test_resume_checkpoint_and_rng_round_trip(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt" / "resume.pt"
    save_resume_checkpoint(path, {"fingerprint": "abc", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "rng": saved, "log": [{"step": 1, "loss": 0.5}]})
    loaded = load_resume_checkpoint(path, "abc")
    assert_same_state(loaded["model"], model.state_dict())
    fresh = torch.optim.AdamW(nn.Linear(3, 2).parameters())
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    set_rng_state(loaded["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])
    assert loaded["log"] == [{"step": 1, "loss": 0.5}]
    with pytest.warns(UserWarning, match="another configuration"):
        assert load_resume_checkpoint(path, "other") is None
    assert load_resume_checkpoint(tmp_path / "missing.pt", "abc") is None

    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2)[:1]}
    size = save_safetensors(tmp_path / "t.safetensors", tensors, {"k": "v"})
    assert size == (tmp_path / "t.safetensors").stat().st_size
    assert_same_state(load_safetensors(tmp_path / "t.safetensors"), tensors)


def test_hyperparameter_resolution_and_unknown_keys():
    hp = resolve_hyperparameters(L2SP, {"lr": 0.5, "weight_decay": 0.1}, {"encoder_strength": 2.0})
    assert hp.lr == 0.5  # training block over trainer defaults
    assert hp.weight_decay == 0.1  # the training block wins over L2-SP's own default (tests/test_defaults.py)
    assert hp.encoder_strength == 2.0 and hp.head_strength == 0.01  # variant override, paper default
    assert resolve_hyperparameters(L2SP, {"weight_decay": 0.1}, {"weight_decay": 0.3}).weight_decay == 0.3
    assert resolve_hyperparameters(FullFineTuning, {"weight_decay": 0.2}, {}).weight_decay == 0.2
    with pytest.raises(ValueError, match=r"'encoder_strenght'.*allowed:.*encoder_strength"):
        resolve_hyperparameters(L2SP, {}, {"encoder_strenght": 1.0})
    with pytest.raises(ValueError, match=r"training: unknown hyperparameter 'kd_weight'"):
        resolve_hyperparameters(FullFineTuning, {"kd_weight": 0.5}, {})
    with pytest.raises(ValueError, match="augment"):
        resolve_hyperparameters(FullFineTuning, {}, {"augment": "crop"})
    with pytest.raises(ValueError, match=r"unknown method 'sgd'; allowed: \[.*'full_ft'"):
        get_method("sgd")
    for name, cls in METHODS.items():
        assert cls.name == name


def test_unknown_hyperparameter_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="'rnak'.*allowed"):
        run("lora", tmp_path / "run", {"rnak": 4})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config_file", ["config.yaml", *sorted(p.name for p in (
    __import__("pathlib").Path(__file__).resolve().parent.parent / "config" / "presets").glob("*.yaml"))])
def test_every_configured_variant_resolves(config_file):
    import pathlib

    import yaml

    root = pathlib.Path(__file__).resolve().parent.parent
    path = root / config_file if config_file == "config.yaml" else root / "config" / "presets" / config_file
    config = yaml.safe_load(path.read_text())
    training = {k: v for k, v in (config.get("training") or {}).items() if k != "device"}
    if "protocol" in config:
        training["protocol"] = config["protocol"]
    for method, variants in config["methods"].items():
        for variant, overrides in variants.items():
            hp = resolve_hyperparameters(get_method(method), training, overrides)
            for key, value in overrides.items():
                assert getattr(hp, key) == value, (method, variant, key)
