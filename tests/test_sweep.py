"""The WiSE-FT sweep: every alpha's logits are those of theta(alpha) = (1-alpha) theta_0 + alpha theta_1, whether the
weights are written in place into an eager model or frozen, per alpha, into a graph traced once (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robustft.evaluation import EvalSplit, build_classifier, gather_logits, predict_logits, sweep_logits
from robustft.features import CpuInferenceGraph
from robustft.interpolation import interpolate_state_dicts

sys.path.insert(0, str(Path(__file__).parent))
from tiny_backbone import CLASSES, TinyBackbone, tiny_data  # noqa: E402

CPU = torch.device("cpu")


def _states(model: nn.Module) -> tuple[dict, dict]:
    """theta_0 = the model's weights with batch-norm statistics set; theta_1 = every parameter moved."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.encoder.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
        model.encoder.bn.running_var.uniform_(0.5, 2.0, generator=g)
        model.head.weight.normal_(0, 0.5, generator=g)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {name for name, _ in model.named_parameters()}
    finetuned = {k: v + 0.3 * torch.randn(v.shape, generator=g) if k in trained else v.clone() for k, v in reference.items()}
    return reference, finetuned


@pytest.mark.parametrize("min_pixels", [0, None, 10**9])
def test_every_alpha_is_the_interpolated_model(min_pixels, monkeypatch):
    backbone = TinyBackbone()
    model = build_classifier(backbone, len(CLASSES)).eval()
    reference, finetuned = _states(model)
    data = tiny_data(per_class=4)
    split = EvalSplit("photo_test", "photo", "test", data.labels.numpy(), pixels=data.pixels)
    frozen_graphs = []
    real_frozen = CpuInferenceGraph.frozen

    def recording_frozen(self):
        module = real_frozen(self)
        frozen_graphs.append(isinstance(module, torch.jit.ScriptModule))
        return module

    monkeypatch.setattr(CpuInferenceGraph, "frozen", recording_frozen)
    alphas = [0.0, 0.25, 0.5, 1.0]
    got = {alpha: logits for (alpha, _), logits in gather_logits(sweep_logits(
        model, reference, finetuned, alphas, [split], backbone.preprocessing, CPU, batch_size=16,
        cpu_freeze_min_pixels=min_pixels)).items()}
    # one frozen graph per alpha where the alpha's pixels reach the threshold (the tiny encoder freezes exactly),
    # none below it or when freezing is off
    assert frozen_graphs == ([True] * len(alphas) if min_pixels == 0 else [])
    check = build_classifier(backbone, len(CLASSES)).eval()
    for alpha in alphas:
        check.load_state_dict(interpolate_state_dicts(reference, finetuned, alpha))
        want = predict_logits(check, data.pixels, backbone.preprocessing, CPU, 16)
        np.testing.assert_allclose(got[alpha], want, rtol=1e-5, atol=1e-5, err_msg=f"alpha={alpha}")
    assert not np.allclose(got[0.0], got[1.0])


def test_cpu_graph_freezes_the_weights_written_in_place_since_the_trace():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    example = torch.randn(4, 3, 8, 8)
    graph = CpuInferenceGraph(encoder, example)
    before = graph.frozen()
    with torch.no_grad():
        encoder[0].weight.mul_(-2.0)
        encoder[1].running_var.fill_(3.0)
    after = graph.frozen()
    assert isinstance(after, torch.jit.ScriptModule) and after is not before
    other = torch.randn(5, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(after(other), encoder(other), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(before(other), encoder(other), atol=1e-3)  # an old graph keeps its own weights


def test_cpu_graph_trusts_no_graph_after_a_mismatch():
    class BatchSizeBaked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :4] * int(x.shape[0])  # the trace bakes in the example's batch size

    module = BatchSizeBaked()
    graph = CpuInferenceGraph(module, torch.randn(4, 3, 8, 8))
    assert graph.frozen() is module
    assert graph.traced is None and graph.frozen() is module


def test_fisher_sweep_is_the_fisher_weighted_merge_at_every_alpha():
    from robustft.interpolation import fisher_weighted_interpolation

    backbone = TinyBackbone()
    model = build_classifier(backbone, len(CLASSES)).eval()
    reference, finetuned = _states(model)
    g = torch.Generator().manual_seed(2)
    params = [name for name, _ in model.named_parameters()]
    fishers = tuple({k: torch.rand(reference[k].shape, generator=g) for k in params} for _ in range(2))
    data = tiny_data(per_class=4)
    split = EvalSplit("photo_val", "photo", "val", data.labels.numpy(), pixels=data.pixels)
    alphas = [0.0, 0.5, 1.0]
    got = {alpha: logits for (alpha, _), logits in gather_logits(sweep_logits(
        model, reference, finetuned, alphas, [split], backbone.preprocessing, CPU, batch_size=16, fisher=fishers,
        cpu_freeze_min_pixels=0)).items()}
    check = build_classifier(backbone, len(CLASSES)).eval()
    for alpha in alphas:
        merged = fisher_weighted_interpolation(reference, finetuned, fishers[0], fishers[1], alpha)
        check.load_state_dict({**reference, **merged})
        want = predict_logits(check, data.pixels, backbone.preprocessing, CPU, 16)
        np.testing.assert_allclose(got[alpha], want, rtol=1e-5, atol=1e-5, err_msg=f"alpha={alpha}")
    linear = gather_logits(sweep_logits(model, reference, finetuned, [0.5], [split], backbone.preprocessing, CPU, 16))
    linear = linear[(0.5, "photo_val")]
    assert not np.allclose(got[0.5], linear, atol=1e-4)  # unequal Fishers weight the two ends differently
