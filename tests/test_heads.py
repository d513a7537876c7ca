"""The reference linear probe: L-BFGS logistic regression, deterministic, L2 strength chosen on validation."""

from __future__ import annotations

import torch

from robustft.heads import fit_linear_probe, fit_logistic_regression, standardize_stats


def _blobs(n_per_class: list[int], dim: int, separation: float, seed: int, scale: float = 1.0, offset: float = 0.0):
    """Gaussian blobs, one per class, with means ``separation`` apart along different axes."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label, n in enumerate(n_per_class):
        mean = torch.zeros(dim)
        mean[label % dim] = separation
        xs.append((torch.randn(n, dim, generator=g) + mean) * scale + offset)
        ys.append(torch.full((n,), label, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def _accuracy(features, labels, weight, bias) -> float:
    return ((features @ weight.T + bias).argmax(1) == labels).float().mean().item()


def test_separable_data_is_fitted_perfectly_and_deterministically():
    # raw features on an awkward scale and offset: the fit standardises internally and folds it back
    x, y = _blobs([30, 30, 30], dim=6, separation=8.0, seed=0, scale=50.0, offset=200.0)
    weight, bias = fit_logistic_regression(x, y, num_classes=3, l2=1e-3, max_iter=100)
    assert weight.shape == (3, 6) and bias.shape == (3,)
    assert weight.dtype == torch.float32 and bias.dtype == torch.float32
    assert _accuracy(x, y, weight, bias) == 1.0
    x_test, y_test = _blobs([20, 20, 20], dim=6, separation=8.0, seed=1, scale=50.0, offset=200.0)
    assert _accuracy(x_test, y_test, weight, bias) >= 0.98
    again_w, again_b = fit_logistic_regression(x, y, num_classes=3, l2=1e-3, max_iter=100)
    assert torch.equal(weight, again_w) and torch.equal(bias, again_b)


def test_a_stronger_penalty_gives_smaller_weights():
    x, y = _blobs([20, 20], dim=4, separation=3.0, seed=2)
    weak, _ = fit_logistic_regression(x, y, 2, l2=1e-3, max_iter=100)
    strong, _ = fit_logistic_regression(x, y, 2, l2=10.0, max_iter=100)
    assert strong.norm() < weak.norm() / 5


def test_constant_feature_is_harmless():
    x, y = _blobs([15, 15], dim=3, separation=6.0, seed=3)
    x[:, 2] = 7.0  # zero variance: the std floor keeps the fit finite
    _, std = standardize_stats(x)
    assert (std > 0).all()
    weight, bias = fit_logistic_regression(x, y, 2, l2=1e-2, max_iter=50)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert _accuracy(x, y, weight, bias) == 1.0


def test_probe_picks_the_weak_penalty_when_a_strong_one_underfits():
    # Separable classes, imbalanced training set (4:1), balanced validation set. A strong L2 shrinks the weights
    # to ~0 so the unpenalised bias (the class prior) decides: everything is class 0, 50% val accuracy.
    x_train, y_train = _blobs([40, 10], dim=5, separation=6.0, seed=4)
    x_val, y_val = _blobs([50, 50], dim=5, separation=6.0, seed=5)
    fit = fit_linear_probe(x_train, y_train, x_val, y_val, 2, l2_grid=[1e3, 1e-3], max_iter=100)
    grid = dict(fit.grid)
    assert grid[1e3] == 0.5
    assert grid[1e-3] >= 0.95
    assert fit.l2 == 1e-3 and fit.val_accuracy == grid[1e-3]
    assert _accuracy(x_val, y_val, fit.weight, fit.bias) == fit.val_accuracy


def test_probe_picks_the_strong_penalty_when_a_weak_one_overfits():
    # Pure-noise features (40-d, 40 examples): a weak L2 separates the training set by memorising noise; a strong
    # one falls back to the majority class, which is right 80% of the time on an equally imbalanced val set.
    g = torch.Generator().manual_seed(0)
    x_train, y_train = torch.randn(40, 40, generator=g), torch.tensor([0] * 32 + [1] * 8)
    x_val, y_val = torch.randn(200, 40, generator=g), torch.tensor([0] * 160 + [1] * 40)
    fit = fit_linear_probe(x_train, y_train, x_val, y_val, 2, l2_grid=[1e-3, 1e2], max_iter=100)
    grid = dict(fit.grid)
    assert abs(grid[1e2] - 0.8) < 1e-6
    assert grid[1e-3] < 0.75
    assert fit.l2 == 1e2
    assert [l2 for l2, _ in fit.grid] == [1e-3, 1e2]  # every strength tried, reported in ascending order
    assert _accuracy(x_train, y_train, *fit_logistic_regression(x_train, y_train, 2, 1e-3, 100)) == 1.0


def test_ties_go_to_the_stronger_penalty_and_the_choice_is_deterministic():
    x_train, y_train = _blobs([20, 20, 20], dim=4, separation=10.0, seed=6)
    x_val, y_val = _blobs([10, 10, 10], dim=4, separation=10.0, seed=7)
    first = fit_linear_probe(x_train, y_train, x_val, y_val, 3, l2_grid=[1e-3, 1e-2, 1e-1], max_iter=50)
    assert all(acc == 1.0 for _, acc in first.grid)
    assert first.l2 == 1e-1
    second = fit_linear_probe(x_train, y_train, x_val, y_val, 3, l2_grid=[1e-1, 1e-3, 1e-2], max_iter=50)
    assert second.l2 == first.l2 and second.grid == first.grid
    assert torch.equal(second.weight, first.weight) and torch.equal(second.bias, first.bias)
