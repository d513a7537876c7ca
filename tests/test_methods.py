"""One test of each method's defining property, on a tiny conv encoder (and a tiny open_clip model for FLYP)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robustft.backbones.base import Backbone
from robustft.data.pixels import PixelSplit
from robustft.interpolation import state_dict_distance
from robustft.methods import get_method
from robustft.methods.base import resolve_hyperparameters
from robustft.methods.ewc import EWC
from robustft.models import ImageClassifier
from robustft.training.protocols import select_class_subset, select_kshot, select_protocol
from robustft.training.context import Split, TrainContext
from robustft.training.run import (
    RunData,
    RunSpec,
    build_reference_model,
    finetune_run,
    load_run_state,
    seeded_and_deterministic,
)
from robustft.training.trainer import train

from tiny_backbone import CLASSES, TinyBackbone, tiny_data  # noqa: E402
TRAINING = {"epochs": 2, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1}


TRAIN, VAL = tiny_data(8, 0), tiny_data(4, 1)


def features_of(split: PixelSplit) -> torch.Tensor:
    backbone = TinyBackbone()
    with torch.no_grad():
        return backbone.build_encoder().eval()(backbone.preprocessing.normalize(split.pixels))


TRAIN_FEATURES, VAL_FEATURES = features_of(TRAIN), features_of(VAL)


def reference_head() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"head.weight": 0.1 * torch.randn(len(CLASSES), 12, generator=g), "head.bias": torch.zeros(len(CLASSES))}


def reference_model() -> ImageClassifier:
    return build_reference_model(TinyBackbone(), reference_head(), len(CLASSES))


def run(method: str, run_dir, hparams: dict | None = None, backbone: Backbone | None = None,
        train: PixelSplit = TRAIN, train_features: bool = True, **kwargs) -> dict:
    features = features_of(train) if train_features else None
    data = RunData(class_names=CLASSES, train=Split(train.labels, train.pixels, features),
                   val=Split(VAL.labels, VAL.pixels, VAL_FEATURES))
    return finetune_run(RunSpec(method=method, seed=0, hparams=hparams or {}, training=TRAINING), data,
                        backbone=backbone or TinyBackbone(), reference_head=reference_head(), run_dir=run_dir,
                        device="cpu", **kwargs)


def state_of(run_dir) -> dict[str, torch.Tensor]:
    return load_run_state(run_dir, reference_model().state_dict())


def context(method_cls, hparams: dict, backbone: Backbone | None = None, train: PixelSplit = TRAIN,
            val: PixelSplit = VAL, class_names=CLASSES) -> TrainContext:
    backbone = backbone or TinyBackbone()
    hp = resolve_hyperparameters(method_cls, TRAINING, hparams)
    return TrainContext(
        hp=hp, seed=0, device=torch.device("cpu"), train=Split(train.labels, train.pixels),
        val=Split(val.labels, val.pixels), normalize=backbone.preprocessing.normalize, backbone=backbone,
        class_names=list(class_names), prompt_names=list(class_names),
    )


def train_directly(name: str, hparams: dict):
    """Train in memory (the trained module is returned, unlike ``finetune_run``); returns (method, result)."""
    method_cls = get_method(name)
    ctx = context(method_cls, hparams)
    method = method_cls(ctx.hp)
    with seeded_and_deterministic(0):
        result = train(reference_model(), method, ctx)
    return method, result, ctx


def params_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {n for n, _ in reference_model().named_parameters()}
    return {k: v for k, v in state.items() if k in names}


# ------------------------------------------------------------------------------------------------------ tests
def test_zeroshot_trains_nothing(tmp_path):
    record = run("zeroshot", tmp_path / "run")
    assert record["trainable_parameters"] == 0 and record["steps"] == 0
    assert record["checkpoint"] == {"file": None, "size_bytes": 0}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json", "train_log.parquet"]
    reference = reference_model().state_dict()
    for key, value in state_of(tmp_path / "run").items():
        assert torch.equal(value, reference[key])
    head = reference_model().head
    expected = (head(VAL_FEATURES).argmax(-1) == VAL.labels).float().mean().item()
    assert record["best_val_accuracy"] == pytest.approx(expected)


def test_linear_probe_never_runs_the_encoder_and_leaves_it_untouched(tmp_path):
    record = run("linear_probe", tmp_path / "run", backbone=TinyBackbone(explode=True))
    assert (tmp_path / "run" / "head.safetensors").is_file()
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "run" / "head.safetensors"))) == {"head.weight", "head.bias"}
    state, reference = state_of(tmp_path / "run"), reference_model().state_dict()
    for key in reference:
        if key.startswith("encoder."):
            assert torch.equal(state[key], reference[key]), key
    assert not torch.equal(state["head.weight"], reference["head.weight"])
    assert record["trainable_parameters"] == 12 * 3 + 3


def test_lp_ft_first_stage_equals_a_linear_probe(tmp_path):
    run("linear_probe", tmp_path / "lp", {"epochs": 3, "lr": 5e-2, "warmup_steps": 0})
    # epochs 0: the run's weights are exactly the stage-1 (linear-probe) model
    record = run("lp_ft", tmp_path / "lpft", {"lp_epochs": 3, "lp_lr": 5e-2, "lp_warmup_steps": 0, "epochs": 0})
    lp, lpft = state_of(tmp_path / "lp"), state_of(tmp_path / "lpft")
    for key in lp:
        assert torch.equal(lp[key], lpft[key]), key
    assert record["method_info"]["lp_steps"] == 9
    # with epochs, stage 2 then moves the encoder too
    run("lp_ft", tmp_path / "lpft2", {"lp_epochs": 3, "lp_lr": 5e-2, "lp_warmup_steps": 0})
    moved = state_of(tmp_path / "lpft2")
    assert not torch.equal(moved["encoder.conv.weight"], lp["encoder.conv.weight"])


def test_full_ft_moves_every_tensor(tmp_path):
    run("full_ft", tmp_path / "run")
    state, reference = state_of(tmp_path / "run"), reference_model().state_dict()
    for key in params_only(reference):
        assert not torch.equal(state[key], reference[key]), key


@pytest.mark.parametrize("method", ["l2sp", "l1sp"])
def test_anchor_penalty_with_huge_strength_stays_near_pretrained(tmp_path, method):
    settings = {"epochs": 4, "lr": 1e-2}
    run("full_ft", tmp_path / "full", settings)
    run(method, tmp_path / "sp", {**settings, "encoder_strength": 1e4, "head_strength": 1e4})
    reference = params_only(reference_model().state_dict())
    far = state_dict_distance(reference, params_only(state_of(tmp_path / "full")))
    near = state_dict_distance(reference, params_only(state_of(tmp_path / "sp")))
    assert near < 0.25 * far, (near, far)


@pytest.mark.parametrize("augment", ["none", "flip"])
def test_kd_with_weight_zero_is_plain_cross_entropy(tmp_path, augment):
    run("full_ft", tmp_path / "full", {"augment": augment})
    run("kd", tmp_path / "kd", {"augment": augment, "kd_weight": 0.0})
    full, kd = state_of(tmp_path / "full"), state_of(tmp_path / "kd")
    for key in full:
        assert torch.equal(full[key], kd[key]), key
    import pandas as pd

    log_full = pd.read_parquet(tmp_path / "full" / "train_log.parquet")
    log_kd = pd.read_parquet(tmp_path / "kd" / "train_log.parquet")
    assert (log_kd["loss_kd"] == 0).all()
    assert log_full["loss_ce"].tolist() == log_kd["loss_ce"].tolist() == log_kd["loss"].tolist()


def test_ewc_penalty_is_zero_at_pretrained_and_its_gradient_is_lambda_f_delta():
    ctx = context(EWC, {"strength": 3.0, "fisher_examples": 10})
    method = EWC(ctx.hp)
    model = method.prepare(reference_model(), ctx)
    assert method.penalty(model).item() == 0.0
    assert method.fisher_count == 10 and sum(f.sum() for f in method.fisher.values()) > 0
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(method.penalty(model), list(params.values()))
    for (name, p), grad in zip(params.items(), grads):
        expected = 3.0 * method.fisher[name] * (p.detach() - method.anchor[name])
        assert torch.allclose(grad, expected, atol=1e-7), name


def test_kshot_selection_is_seeded_with_k_per_class_and_names_a_short_class():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 4)
    chosen = select_kshot(labels, CLASSES, 3, seed=0)
    assert np.bincount(labels[chosen], minlength=3).tolist() == [3, 3, 3]
    assert np.array_equal(chosen, select_kshot(labels, CLASSES, 3, seed=0))
    assert any(not np.array_equal(chosen, select_kshot(labels, CLASSES, 3, seed=s)) for s in range(1, 5))
    with pytest.raises(ValueError, match="class 'cat' has 3 training examples, fewer than k=4"):
        select_kshot(labels, CLASSES, 4, seed=0)
    with pytest.raises(ValueError, match="class 'bird' has 0"):
        select_kshot(np.array([0, 1]), CLASSES, 1, seed=0)
    picked = select_protocol({"kind": "kshot", "k": 2}, labels, CLASSES, seed=7)
    assert picked.params == {"k": 2, "seed": 7} and len(picked.train_indices) == 6


def test_class_subset_selection_and_run_record(tmp_path):
    labels = np.array([0, 0, 1, 2, 2, 1])
    assert select_class_subset(labels, CLASSES, ["cat"]).tolist() == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="seen class 'bird' has no training examples"):
        select_class_subset(np.array([0, 1]), CLASSES, ["cat"])
    with pytest.raises(ValueError, match="unknown absent classes"):
        select_class_subset(labels, CLASSES, ["horse"])
    with pytest.raises(ValueError, match="unknown keys"):
        select_protocol({"kind": "kshot", "k": 1, "shots": 2}, labels, CLASSES, 0)

    record = run("full_ft", tmp_path / "run", {"protocol": {"kind": "class_subset", "absent_classes": ["cat"]}})
    assert record["absent_classes"] == ["cat"]
    assert record["protocol"]["n_train"] == 16 and record["n_val"] == 8  # validation restricted to seen classes
    state = state_of(tmp_path / "run")
    assert state["head.weight"].shape[0] == 3  # the head keeps every class
    on_disk = json.loads((tmp_path / "run" / "run.json").read_text())
    assert on_disk["protocol"]["absent_classes"] == ["cat"]
