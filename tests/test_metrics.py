import math

import numpy as np
import pytest
import torch

from robustft.metrics import (
    accuracy,
    bootstrap_ci,
    group_accuracies,
    max_project_logits,
    restrict_logits,
    seed_spread,
)


def test_accuracy_hand_computed():
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == pytest.approx(0.75)
    assert accuracy(torch.tensor([3, 3]), torch.tensor([3, 0])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        accuracy(np.array([], dtype=int), np.array([], dtype=int))


def test_group_accuracies_hand_computed():
    mask = np.array([False, False, True, True])  # classes 2, 3 absent
    out = group_accuracies(np.array([0, 1, 2, 3, 0]), np.array([0, 2, 2, 3, 1]), mask)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["seen_accuracy"] == pytest.approx(1 / 2)  # rows 0 (right) and 4 (wrong)
    assert out["absent_accuracy"] == pytest.approx(2 / 3)  # rows 1 (wrong), 2 and 3 (right)
    assert (out["n"], out["n_seen"], out["n_absent"]) == (5, 2, 3)
    seen_only = group_accuracies(np.array([0, 1]), np.array([0, 0]), mask)
    assert seen_only["seen_accuracy"] == 0.5 and math.isnan(seen_only["absent_accuracy"])
    assert seen_only["n_absent"] == 0


def test_bootstrap_ci_two_examples_has_known_distribution():
    # Resampling [1, 0] gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    correct = np.array([True, False])
    assert bootstrap_ci(correct, n_boot=2000, level=0.95, seed=0) == (0.0, 1.0)
    assert bootstrap_ci(correct, n_boot=2000, level=0.4, seed=0) == (0.5, 0.5)
    assert bootstrap_ci(np.ones(50, dtype=bool), n_boot=100) == (1.0, 1.0)


def test_bootstrap_ci_width_and_determinism():
    correct = np.arange(400) % 2 == 0  # accuracy 0.5, standard error 0.025
    lo, hi = bootstrap_ci(correct, n_boot=1000, seed=3)
    assert lo < 0.5 < hi
    assert lo == pytest.approx(0.5 - 1.96 * 0.025, abs=0.01)
    assert hi == pytest.approx(0.5 + 1.96 * 0.025, abs=0.01)
    assert bootstrap_ci(correct, n_boot=1000, seed=3) == (lo, hi)
    assert bootstrap_ci(correct, n_boot=1000, seed=4) != (lo, hi)
    # Several chunks of draws (5000 examples x 1000 resamples exceeds one chunk) still give a sane interval.
    big = np.arange(5000) % 4 == 0
    lo, hi = bootstrap_ci(big, n_boot=1000, seed=0)
    assert lo < 0.25 < hi and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 * 0.75 / 5000), rel=0.15)


def test_seed_spread():
    assert seed_spread([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3))
    assert seed_spread([0.7]) == 0.0
    with pytest.raises(ValueError):
        seed_spread([])


def test_restrict_logits_numpy_and_torch():
    logits = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    np.testing.assert_array_equal(restrict_logits(logits, [3, 1]), [[3.0, 1.0], [7.0, 5.0]])
    out = restrict_logits(torch.as_tensor(logits), [0, 2])
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, torch.tensor([[0.0, 2.0], [4.0, 6.0]], dtype=torch.float64))
    with pytest.raises(ValueError):
        restrict_logits(logits, [4])


def test_max_project_logits_numpy_and_torch():
    logits = np.array([[1.0, 5.0, 2.0, 0.0], [3.0, 1.0, 4.0, 7.0]])
    groups = [[0, 2], [1], [3, 0]]
    expected = [[2.0, 5.0, 1.0], [4.0, 1.0, 7.0]]
    np.testing.assert_array_equal(max_project_logits(logits, groups), expected)
    out = max_project_logits(torch.as_tensor(logits), groups)
    assert torch.equal(out, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="group 1"):
        max_project_logits(logits, [[0], []])
