import math

import pytest
import torch

from robustft.interpolation import (
    fisher_weighted_interpolation,
    interpolate_into,
    interpolate_state_dicts,
    state_dict_distance,
)


def _random_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.w": (7, 5), "enc.b": (5,), "head.w": (3, 5)}
    theta0 = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    theta1 = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    theta0["bn.num_batches_tracked"] = torch.tensor(10)
    theta1["bn.num_batches_tracked"] = torch.tensor(250)
    return theta0, theta1


def test_hand_computed_midpoint():
    theta0 = {"w": torch.tensor([0.0, 2.0, -4.0])}
    theta1 = {"w": torch.tensor([1.0, 4.0, 4.0])}
    out = interpolate_state_dicts(theta0, theta1, 0.25)
    # 0.75 * [0, 2, -4] + 0.25 * [1, 4, 4] = [0.25, 2.5, -2.0]
    assert torch.equal(out["w"], torch.tensor([0.25, 2.5, -2.0]))


def test_end_points_are_bit_exact_and_new_tensors():
    theta0, theta1 = _random_pair()
    at0 = interpolate_state_dicts(theta0, theta1, 0.0)
    at1 = interpolate_state_dicts(theta0, theta1, 1.0)
    for k in theta0:
        assert torch.equal(at0[k], theta0[k])
        assert torch.equal(at1[k], theta1[k])
        assert at0[k].data_ptr() != theta0[k].data_ptr()
        assert at1[k].data_ptr() != theta1[k].data_ptr()


def test_non_float_entries_come_from_nearer_end_point():
    theta0, theta1 = _random_pair()
    assert interpolate_state_dicts(theta0, theta1, 0.49)["bn.num_batches_tracked"].item() == 10
    out = interpolate_state_dicts(theta0, theta1, 0.5)["bn.num_batches_tracked"]
    assert out.item() == 250 and out.dtype == torch.int64


def test_key_mismatch_and_bad_alpha_raise():
    theta0, theta1 = _random_pair()
    extra = dict(theta1, **{"head.b": torch.zeros(3)})
    with pytest.raises(ValueError, match="head.b"):
        interpolate_state_dicts(theta0, extra, 0.5)
    with pytest.raises(ValueError, match="1.5"):
        interpolate_state_dicts(theta0, theta1, 1.5)
    with pytest.raises(ValueError, match="-0.1"):
        interpolate_state_dicts(theta0, theta1, -0.1)
    bad_shape = dict(theta1, **{"enc.b": torch.zeros(4)})
    with pytest.raises(ValueError, match="enc.b"):
        interpolate_state_dicts(theta0, bad_shape, 0.5)


def test_interpolate_into_matches_pure_version_without_reallocating():
    theta0, theta1 = _random_pair(1)
    out = {k: torch.empty_like(v) for k, v in theta0.items()}
    pointers = {k: v.data_ptr() for k, v in out.items()}
    for alpha in (0.0, 0.3, 0.5, 1.0):
        interpolate_into(out, theta0, theta1, alpha)
        pure = interpolate_state_dicts(theta0, theta1, alpha)
        for k in theta0:
            assert out[k].data_ptr() == pointers[k]
            if alpha in (0.0, 1.0) or not theta0[k].is_floating_point():
                assert torch.equal(out[k], pure[k])
            else:
                assert torch.allclose(out[k], pure[k], rtol=1e-6, atol=1e-6)


def test_interpolate_into_rejects_aliasing_theta1_and_wrong_shapes():
    theta0, theta1 = _random_pair(2)
    with pytest.raises(ValueError, match="aliases"):
        interpolate_into(dict(theta1), theta0, theta1, 0.5)
    out = {k: torch.empty_like(v) for k, v in theta0.items()}
    out["head.w"] = torch.empty(2, 5)
    with pytest.raises(ValueError, match="head.w"):
        interpolate_into(out, theta0, theta1, 0.5)


def test_fisher_weighted_hand_computation_and_fallback():
    theta0 = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([2.0])}
    theta1 = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([4.0])}
    fisher0 = {"w": torch.tensor([3.0, 0.0])}
    fisher1 = {"w": torch.tensor([1.0, 0.0])}
    out = fisher_weighted_interpolation(theta0, theta1, fisher0, fisher1, 0.5)
    # element 0: c0 = 1.5, c1 = 0.5 -> (1.5*0 + 0.5*1) / 2 = 0.25
    # element 1: both Fishers floored to 1e-8 -> equal weights -> 0.5
    assert torch.allclose(out["w"], torch.tensor([0.25, 0.5]))
    # "b" has no Fisher: plain interpolation
    assert torch.equal(out["b"], torch.tensor([3.0]))


def test_fisher_weighted_with_equal_fishers_is_plain_interpolation():
    theta0, theta1 = _random_pair(3)
    fisher = {k: torch.full_like(v, 2.0) for k, v in theta0.items() if v.is_floating_point()}
    merged = fisher_weighted_interpolation(theta0, theta1, fisher, fisher, 0.3)
    plain = interpolate_state_dicts(theta0, theta1, 0.3)
    for k in theta0:
        assert torch.allclose(merged[k], plain[k])
    with pytest.raises(ValueError, match="enc.w"):
        fisher_weighted_interpolation(theta0, theta1, fisher, {}, 0.3)


def test_state_dict_distance():
    theta0 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]]), "n": torch.tensor(3)}
    theta1 = {"a": torch.tensor([4.0, 2.0]), "b": torch.tensor([[4.0]]), "n": torch.tensor(9)}
    assert state_dict_distance(theta0, theta1) == pytest.approx(5.0)  # sqrt(3^2 + 4^2); ints skipped
    assert state_dict_distance(theta0, theta1, keys=["a"]) == pytest.approx(3.0)
    assert state_dict_distance(theta0, theta0) == 0.0
    theta0, theta1 = _random_pair(4)
    half = interpolate_state_dicts(theta0, theta1, 0.5)
    total = state_dict_distance(theta0, theta1)
    assert math.isclose(state_dict_distance(theta0, half), total / 2, rel_tol=1e-6)


def test_fisher_weighted_half_precision_keeps_floor():
    theta0 = {"w": torch.tensor([0.0, 2.0], dtype=torch.float16)}
    theta1 = {"w": torch.tensor([1.0, 4.0], dtype=torch.float16)}
    zero = {"w": torch.zeros(2, dtype=torch.float16)}
    out = fisher_weighted_interpolation(theta0, theta1, zero, zero, 0.25)
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.tensor([0.25, 2.5], dtype=torch.float16))  # floored Fishers: plain average
