"""Knowledge distillation: the teacher term at a weight where it matters, computed per batch from cached features."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from robustft.methods.kd import KnowledgeDistillation
from robustft.training.context import Split
from robustft.training.data import epoch_order

from test_methods import TRAIN, TRAIN_FEATURES, TRAINING, context, reference_model, run, state_of  # noqa: E402


def test_teacher_logits_from_cached_features_equal_the_teacher_on_images_without_an_image_pass():
    ctx = context(KnowledgeDistillation, {})
    ctx.train = Split(TRAIN.labels, TRAIN.pixels, TRAIN_FEATURES)
    method = KnowledgeDistillation(ctx.hp)
    method.prepare(reference_model(), ctx)
    assert method.batch_columns(ctx) == ("pixels", "features")
    passes = []
    method.teacher.register_forward_hook(lambda module, *_: passes.append(type(module).__name__))
    order = torch.arange(len(TRAIN))
    batch = ctx.to_batch(next(ctx.load(ctx.train, order, 24, method.batch_columns(ctx))), images=True)
    with torch.no_grad():
        expected = reference_model().eval()(ctx.normalize(TRAIN.pixels))
    assert torch.allclose(method.teacher_logits(batch), expected, atol=1e-5)
    assert passes == ["ClassificationHead"]  # the reference head on features: no encoder pass

    flipped = context(KnowledgeDistillation, {"augment": "flip"})  # flipped images: the teacher sees them
    flipped.train = ctx.train
    assert KnowledgeDistillation(flipped.hp).batch_columns(flipped) == ("pixels",)


def test_the_distillation_term_is_the_cross_entropy_to_the_teachers_softened_predictions(tmp_path):
    """At step 1 the student is the reference model in train mode; the teacher is the reference model in eval
    mode on the same rows (read from cached features): the logged terms equal the hand computation."""
    a, t = 0.7, 2.0
    run("kd", tmp_path / "kd", {"kd_weight": a, "temperature": t})
    log = pd.read_parquet(tmp_path / "kd" / "train_log.parquet")
    ctx = context(KnowledgeDistillation, {})
    rows = epoch_order(len(TRAIN), ctx.generator("order", 0))[: TRAINING["batch_size"]]
    x, labels = ctx.normalize(TRAIN.pixels[rows]), TRAIN.labels[rows]
    with torch.no_grad():
        student = reference_model().train()(x)
        teacher = reference_model().eval()(x)
    distill = a * F.cross_entropy(student / t, F.softmax(teacher / t, dim=-1)) * t * t
    assert log["loss_kd"].iloc[0] == pytest.approx(float(distill), rel=1e-5)
    assert log["loss_ce"].iloc[0] == pytest.approx(float((1 - a) * F.cross_entropy(student, labels)), rel=1e-5)
    assert log["loss_kd"].iloc[0] > 0.05 * log["loss"].iloc[0]  # a term that matters


def test_kd_from_cached_features_trains_as_kd_from_images_and_unlike_plain_fine_tuning(tmp_path):
    hparams = {"kd_weight": 0.9, "temperature": 2.0}
    run("kd", tmp_path / "features", hparams)
    run("kd", tmp_path / "images", hparams, train_features=False)
    run("full_ft", tmp_path / "full")
    features, images, full = (state_of(tmp_path / name) for name in ("features", "images", "full"))
    for key in features:
        assert torch.allclose(features[key], images[key], atol=1e-5), key
    assert not torch.allclose(features["head.weight"], full["head.weight"], atol=1e-3)
