"""Gradient accumulation (``micro_batch_size``): one step over micro-batches equals one step over the whole batch."""

from __future__ import annotations

import pytest
import torch

from robustft.methods import get_method
from robustft.methods.base import resolve_hyperparameters
from robustft.training.context import Split, TrainContext
from robustft.training.run import build_reference_model, seeded_and_deterministic
from robustft.training.trainer import train

from tiny_backbone import CLASSES, NormFreeBackbone, tiny_data  # noqa: E402

TRAINING = {"epochs": 2, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 1, "select": "last"}
#: 21 rows: batches of 8, 8 and 5; micro-batches of 3 cut them 3+3+2 and 3+2
TRAIN, VAL = tiny_data(7, 0), tiny_data(2, 1)


def features_of(backbone, split) -> torch.Tensor:
    encoder = backbone.build_encoder().eval()
    with torch.no_grad():
        return encoder(backbone.preprocessing.normalize(split.pixels))


def reference_head() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"head.weight": 0.1 * torch.randn(len(CLASSES), 12, generator=g), "head.bias": torch.zeros(len(CLASSES))}


def train_tiny(method: str, hparams: dict):
    """(method, result, log) of ``method`` trained in memory on the norm-free tiny backbone; counts loss calls."""
    backbone = NormFreeBackbone()
    method_cls = get_method(method)
    hp = resolve_hyperparameters(method_cls, TRAINING, hparams)
    ctx = TrainContext(hp=hp, seed=0, device=torch.device("cpu"),
                       train=Split(TRAIN.labels, TRAIN.pixels, features_of(backbone, TRAIN)),
                       val=Split(VAL.labels, VAL.pixels, features_of(backbone, VAL)),
                       normalize=backbone.preprocessing.normalize, backbone=backbone, class_names=list(CLASSES),
                       prompt_names=list(CLASSES))
    runner = method_cls(hp)
    calls = []
    loss = runner.loss
    runner.loss = lambda model, batch, ctx: calls.append(len(batch.labels)) or loss(model, batch, ctx)
    with seeded_and_deterministic(0):
        result = train(build_reference_model(backbone, reference_head(), len(CLASSES)), runner, ctx)
    return result, calls


def assert_close_tensors(a: dict, b: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


METHOD_CASES = [
    ("full_ft", {"augment": "flip"}),
    ("lp_ft", {"lp_epochs": 1}),
    ("l2sp", {"encoder_strength": 5.0, "head_strength": 5.0}),
    ("l1sp", {"encoder_strength": 0.05, "head_strength": 0.05}),
    ("kd", {"kd_weight": 0.5, "temperature": 2.0}),
    ("ewc", {"strength": 1e5, "fisher_examples": 8}),
    ("lora", {"targets": "conv1x1", "rank": 2}),
    ("saft", {"fraction": 0.2}),
]


@pytest.mark.parametrize("method, hparams", METHOD_CASES, ids=[m for m, _ in METHOD_CASES])
def test_accumulated_step_equals_the_whole_batch(method, hparams):
    whole, whole_calls = train_tiny(method, hparams)
    micro, micro_calls = train_tiny(method, {**hparams, "micro_batch_size": 3})
    assert set(micro_calls) == {3, 2} and set(whole_calls) == {8, 5}  # really cut into micro-batches
    assert whole.steps == micro.steps == 6
    assert_close_tensors(whole.tensors, micro.tensors)
    terms = [c for c in whole.log.columns if c.startswith("loss")]
    assert len(terms) > 1 or method in ("full_ft", "lp_ft", "lora", "saft")
    torch.testing.assert_close(torch.tensor(micro.log[terms].to_numpy()), torch.tensor(whole.log[terms].to_numpy()),
                               atol=1e-5, rtol=1e-4)


def test_a_penalty_counted_per_micro_batch_would_be_caught(monkeypatch):
    """The equality above is tight enough to fail where L2-SP's pull were added once per micro-batch (3 a step)."""
    from robustft.methods.l2sp import L2SP

    hparams = {"encoder_strength": 5.0, "head_strength": 5.0, "micro_batch_size": 3}
    right, _ = train_tiny("l2sp", hparams)
    penalties = L2SP.step_penalties
    monkeypatch.setattr(L2SP, "step_penalties",
                        lambda self, model, ctx: {k: 3 * v for k, v in penalties(self, model, ctx).items()})
    wrong, _ = train_tiny("l2sp", hparams)
    with pytest.raises(AssertionError):
        assert_close_tensors(right.tensors, wrong.tensors)


def test_micro_batch_size_and_devices_are_checked():
    with pytest.raises(ValueError, match="micro_batch_size"):
        resolve_hyperparameters(get_method("full_ft"), TRAINING, {"micro_batch_size": 0})
    with pytest.raises(ValueError, match="not a multiple of devices"):
        resolve_hyperparameters(get_method("full_ft"), TRAINING, {"devices": 3})


def test_flyp_accumulated_contrastive_step_equals_the_whole_batch(tiny_open_clip, monkeypatch):
    """FLYP's loss pairs every image with every text of the step: GradCache over micro-batches of 4 + 2 equals the
    batch of 6 (weights, logit scale, rebuilt head and the logged loss)."""
    from robustft.methods.flyp import FLYP
    from test_flyp import tiny_clip_backbone, train_flyp  # noqa: E402

    backbone = tiny_clip_backbone(tiny_open_clip)
    _, whole, _, _ = train_flyp(backbone, {})
    sizes = []
    features = FLYP.features
    monkeypatch.setattr(FLYP, "features", lambda self, clip, batch, *a: sizes.append(len(batch.labels))
                        or features(self, clip, batch, *a))
    _, micro, _, _ = train_flyp(backbone, {"micro_batch_size": 4})
    assert sizes[:4] == [4, 2, 4, 2]  # features without gradients, then again with them
    # AdamW divides by sqrt(v) + 1e-8: where a gradient is itself ~1e-8 (attention query biases of this random tiny
    # CLIP) fp32 rounding moves the update by a few percent of lr (2e-5 at lr 1e-3); elsewhere it is ~1e-7
    assert_close_tensors(whole.tensors, micro.tensors, atol=5e-5)
    torch.testing.assert_close(micro.model.clip.logit_scale, whole.model.clip.logit_scale)
    torch.testing.assert_close(torch.tensor(micro.log["loss"].to_numpy()), torch.tensor(whole.log["loss"].to_numpy()))
