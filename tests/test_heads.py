"""The reference linear probe: streamed L-BFGS logistic regression, deterministic, L2 strength chosen on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustft.features import FEATURE_COLUMNS, FeatureChunks
from robustft.heads import (
    TensorChunks,
    fit_linear_probe,
    fit_logistic_regression,
    head_accuracy,
    standardize_stats,
)
from robustft.io.arrays import StaleCacheError, array_writer


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
    return ((features @ weight.T + bias).argmax(1) == labels).double().mean().item()


def _fit(x, y, num_classes, l2, max_iter, rows=None):
    return fit_logistic_regression(TensorChunks(x, y, rows), num_classes, l2, max_iter)


def _in_memory_fit(features, labels, num_classes, l2, max_iter):
    """The fit as it was before streaming (whole split in memory, one full-batch loss): the reference to match."""
    features = features.double()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels, reduction="sum") / z.shape[0] + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        w_raw = weight / std
        return w_raw.float(), (bias - (w_raw * mean).sum(1)).float()


def _demo_like(seed: int, n_per_class: int):
    """Demo-sized features: 7 classes, 1280-d, non-negative and skewed like pooled EfficientNet-Lite0 outputs."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(7, 1280, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.arange(7).repeat_interleave(n_per_class)
    features = torch.relu(centres[labels] + 1.5 * torch.randn(len(labels), 1280, generator=g)) ** 1.5
    return features.float(), labels


def _write_features(path, features, labels, attrs=None):
    columns = {"features": ((features.shape[1],), np.float32), "labels": ((), np.int64), "row_ids": ((), np.int64)}
    with array_writer(path, len(labels), columns, attrs or {"kind": "features"}) as handle:
        handle["features"][...] = features.numpy()
        handle["labels"][...] = labels.numpy()
        handle["row_ids"][...] = np.arange(len(labels))
    return path


# --- the fit -------------------------------------------------------------------------------------------------------


def test_separable_data_is_fitted_perfectly_and_deterministically():
    # raw features on an awkward scale and offset: the fit standardises internally and folds it back
    x, y = _blobs([30, 30, 30], dim=6, separation=8.0, seed=0, scale=50.0, offset=200.0)
    weight, bias = _fit(x, y, num_classes=3, l2=1e-3, max_iter=100)
    assert weight.shape == (3, 6) and bias.shape == (3,)
    assert weight.dtype == torch.float32 and bias.dtype == torch.float32
    assert _accuracy(x, y, weight, bias) == 1.0
    x_test, y_test = _blobs([20, 20, 20], dim=6, separation=8.0, seed=1, scale=50.0, offset=200.0)
    assert _accuracy(x_test, y_test, weight, bias) >= 0.98
    again_w, again_b = _fit(x, y, num_classes=3, l2=1e-3, max_iter=100)
    assert torch.equal(weight, again_w) and torch.equal(bias, again_b)


def test_a_stronger_penalty_gives_smaller_weights():
    x, y = _blobs([20, 20], dim=4, separation=3.0, seed=2)
    weak, _ = _fit(x, y, 2, l2=1e-3, max_iter=100)
    strong, _ = _fit(x, y, 2, l2=10.0, max_iter=100)
    assert strong.norm() < weak.norm() / 5


def test_constant_feature_is_harmless():
    x, y = _blobs([15, 15], dim=3, separation=6.0, seed=3)
    x[:, 2] = 7.0  # zero variance: the std floor keeps the fit finite
    assert (standardize_stats(TensorChunks(x, y)).std > 0).all()
    weight, bias = _fit(x, y, 2, l2=1e-2, max_iter=50)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert _accuracy(x, y, weight, bias) == 1.0


def test_streamed_statistics_equal_the_whole_split_ones():
    x, y = _demo_like(0, 13)  # 91 rows
    for rows in (None, 1, 7, 40, 90):
        stats = standardize_stats(TensorChunks(x, y, rows))
        assert stats.n == 91 and stats.mean.dtype == torch.float64
        torch.testing.assert_close(stats.mean, x.double().mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.std, x.double().std(0).clamp_min(1e-6), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 training examples"):
        standardize_stats(TensorChunks(x[:1], y[:1]))


@pytest.mark.parametrize("l2", [1e-4, 1e-2, 1.0])
def test_streamed_fit_equals_the_in_memory_fit_on_demo_sized_data(l2):
    """224 x 1280 features (the demo's ID train split), read in chunks of 50 rows: the same head as the in-memory fit."""
    x, y = _demo_like(1, 32)
    expected_w, expected_b = _in_memory_fit(x, y, 7, l2, 200)
    weight, bias = _fit(x, y, 7, l2, 200, rows=50)
    torch.testing.assert_close(weight, expected_w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias, expected_b, rtol=1e-4, atol=1e-5)
    x_val, y_val = _demo_like(2, 10)
    assert _accuracy(x_val, y_val, weight, bias) == _accuracy(x_val, y_val, expected_w, expected_b)


class CountingChunks(TensorChunks):
    """Records the largest chunk handed out and the number of passes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.largest, self.passes = 0, 0

    def __iter__(self):
        self.passes += 1
        for features, labels in super().__iter__():
            self.largest = max(self.largest, features.shape[0])
            yield features, labels


def test_the_probe_reads_its_data_only_in_chunks():
    x, y = _demo_like(3, 12)
    x_val, y_val = _demo_like(4, 5)
    train, val = CountingChunks(x, y, rows=16), CountingChunks(x_val, y_val, rows=8)
    fit = fit_linear_probe(train, val, 7, l2_grid=[1e-2, 1.0], max_iter=20)
    assert train.largest == 16 and val.largest == 8
    assert train.passes > 2 and val.passes == 2  # one statistics pass + L-BFGS evaluations; one val pass per strength
    assert fit.val_accuracy == head_accuracy(TensorChunks(x_val, y_val), fit.weight, fit.bias)


# --- choosing the L2 strength --------------------------------------------------------------------------------------


def _probe(x_train, y_train, x_val, y_val, num_classes, l2_grid, max_iter):
    return fit_linear_probe(TensorChunks(x_train, y_train), TensorChunks(x_val, y_val), num_classes, l2_grid, max_iter)


def test_probe_picks_the_weak_penalty_when_a_strong_one_underfits():
    # Separable classes, imbalanced training set (4:1), balanced validation set. A strong L2 shrinks the weights
    # to ~0 so the unpenalised bias (the class prior) decides: everything is class 0, 50% val accuracy.
    x_train, y_train = _blobs([40, 10], dim=5, separation=6.0, seed=4)
    x_val, y_val = _blobs([50, 50], dim=5, separation=6.0, seed=5)
    fit = _probe(x_train, y_train, x_val, y_val, 2, l2_grid=[1e3, 1e-3], max_iter=100)
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
    fit = _probe(x_train, y_train, x_val, y_val, 2, l2_grid=[1e-3, 1e2], max_iter=100)
    grid = dict(fit.grid)
    assert grid[1e2] == 0.8
    assert grid[1e-3] < 0.75
    assert fit.l2 == 1e2
    assert [l2 for l2, _ in fit.grid] == [1e-3, 1e2]  # every strength tried, reported in ascending order
    assert _accuracy(x_train, y_train, *_fit(x_train, y_train, 2, 1e-3, 100)) == 1.0


def test_ties_go_to_the_stronger_penalty_and_the_choice_is_deterministic():
    x_train, y_train = _blobs([20, 20, 20], dim=4, separation=10.0, seed=6)
    x_val, y_val = _blobs([10, 10, 10], dim=4, separation=10.0, seed=7)
    first = _probe(x_train, y_train, x_val, y_val, 3, l2_grid=[1e-3, 1e-2, 1e-1], max_iter=50)
    assert all(acc == 1.0 for _, acc in first.grid)
    assert first.l2 == 1e-1
    second = _probe(x_train, y_train, x_val, y_val, 3, l2_grid=[1e-1, 1e-3, 1e-2], max_iter=50)
    assert second.l2 == first.l2 and second.grid == first.grid
    assert torch.equal(second.weight, first.weight) and torch.equal(second.bias, first.bias)


def test_head_accuracy_normalizes_features_for_clip_heads():
    weight, bias = torch.eye(2), torch.tensor([0.0, 0.3])
    x, y = torch.tensor([[10.0, 1.0], [0.2, 0.1]]), torch.tensor([0, 0])
    # raw scores: (10, 1.3) and (0.2, 0.4): the second row goes to class 1
    assert head_accuracy(TensorChunks(x, y), weight, bias) == 0.5
    # L2-normalised rows (0.995, 0.0995) and (0.894, 0.447): scores (0.995, 0.40) and (0.894, 0.75), both class 0
    assert head_accuracy(TensorChunks(x, y, rows=1), weight, bias, normalize=True) == 1.0


# --- reading feature caches in chunks ------------------------------------------------------------------------------


def test_feature_chunks_read_a_cache_chunk_by_chunk(tmp_path):
    x, y = _demo_like(5, 10)  # 70 x 1280
    path = _write_features(tmp_path / "f.h5", x, y, {"kind": "features", "manifest_hash": "abc"})
    chunks = FeatureChunks(path, {"manifest_hash": "abc"}, chunk_bytes=16 * 1280 * 4)
    assert len(chunks) == 70 and chunks.rows == 16
    for _ in range(2):  # re-iterable: every pass reads the file again
        parts, pointers = [], []
        for features, labels in chunks:  # a chunk is valid until the next but one: copy to keep
            parts.append((features.clone(), labels.clone()))
            pointers.append(features.data_ptr())
        assert [p[0].shape[0] for p in parts] == [16, 16, 16, 16, 6]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        # two buffers, allocated once a pass, alternate: no allocation per chunk
        assert pointers[0::2] == [pointers[0]] * 3 and pointers[1::2] == [pointers[1]] * 2
        assert pointers[0] != pointers[1]
    assert chunks._whole is None
    whole = FeatureChunks(path)  # fits one chunk: read once and kept
    assert [p[0].shape[0] for p in whole] == [70] and whole._whole is not None
    with pytest.raises(StaleCacheError, match="manifest_hash"):
        FeatureChunks(path, {"manifest_hash": "other"})
    assert set(FEATURE_COLUMNS) == {"features", "labels", "row_ids"}


def test_probe_from_feature_files_equals_the_in_memory_probe(tmp_path):
    x, y = _demo_like(6, 20)
    x_val, y_val = _demo_like(7, 6)
    train = FeatureChunks(_write_features(tmp_path / "train.h5", x, y), chunk_bytes=33 * 1280 * 4)
    val = FeatureChunks(_write_features(tmp_path / "val.h5", x_val, y_val), chunk_bytes=9 * 1280 * 4)
    streamed = fit_linear_probe(train, val, 7, [1e-3, 1e-1], max_iter=40)
    in_memory = _probe(x, y, x_val, y_val, 7, [1e-3, 1e-1], max_iter=40)
    assert streamed.l2 == in_memory.l2 and streamed.grid == in_memory.grid
    torch.testing.assert_close(streamed.weight, in_memory.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(streamed.bias, in_memory.bias, rtol=1e-4, atol=1e-5)
