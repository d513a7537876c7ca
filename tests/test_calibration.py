import numpy as np
import pytest

from robustft.calibration import (
    absent_class_mask,
    apply_logit_offset,
    ausuc,
    average_logit_gap,
    gamma_breakpoints,
    pseudo_absent_folds,
    projected_absent_mask,
    pseudo_cv_gamma,
    seen_absent_curve,
)
from robustft.metrics import max_project_logits

# Classes 0, 1 seen; 2, 3 absent. Per row: best seen, best absent, gap d = max seen - max absent.
CURVE_LOGITS = np.array(
    [
        [5.0, 1.0, 2.0, 0.0],  # label 0: seen 0, absent 2, d = 3  (right until it switches)
        [1.0, 2.0, 4.0, 0.0],  # label 2: seen 1, absent 2, d = -2 (right once switched)
        [0.0, 3.0, 1.0, 2.0],  # label 3: seen 1, absent 3, d = 1  (right once switched)
        [2.0, 0.0, 1.0, 1.5],  # label 1: seen 0, absent 3, d = 0.5 (never right)
        [0.0, 1.0, 3.0, 2.0],  # label 3: seen 1, absent 2, d = -2 (never right)
    ]
)
CURVE_LABELS = np.array([0, 2, 3, 1, 3])
CURVE_MASK = np.array([False, False, True, True])


def test_absent_class_mask():
    assert absent_class_mask(5, [3, 1]).tolist() == [False, True, False, True, False]
    assert absent_class_mask(2, []).tolist() == [False, False]
    with pytest.raises(ValueError):
        absent_class_mask(3, [3])


def test_apply_logit_offset_hand_values_and_no_mutation():
    logits = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], dtype=np.float32)
    mask = np.array([False, True, False])
    before = logits.copy()
    out = apply_logit_offset(logits, mask, 1.5)
    np.testing.assert_array_equal(out, [[1.0, 3.5, 3.0], [0.5, 0.5, 0.0]])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(logits, before)
    same = apply_logit_offset(logits, mask, 0.0)
    np.testing.assert_array_equal(same, logits)
    assert same is not logits


def test_average_logit_gap_hand_computation():
    # Seen {0, 1}, absent {2, 3}.
    logits = np.array(
        [
            [3.0, 1.0, 0.0, 2.0],  # label 0: non-label seen mean 1, absent mean 1
            [0.0, 4.0, 1.0, -1.0],  # label 1: non-label seen mean 0, absent mean 0
            [2.0, 5.0, 3.0, 3.0],  # label 0: non-label seen mean 5, absent mean 3
        ]
    )
    labels = np.array([0, 1, 0])
    mask = absent_class_mask(4, [2, 3])
    # (1 + 0 + 5) / 3 - (1 + 0 + 3) / 3 = 2 - 4/3
    assert average_logit_gap(logits, labels, mask) == pytest.approx(2 / 3)
    # A row labelled with an absent class is ignored.
    with_absent = np.vstack([logits, [[9.0, 9.0, -9.0, 9.0]]])
    assert average_logit_gap(with_absent, np.array([0, 1, 0, 2]), mask) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="seen-class label"):
        average_logit_gap(logits[:1], np.array([3]), mask)


def test_gamma_breakpoints_are_sorted_distinct_gaps():
    np.testing.assert_array_equal(gamma_breakpoints(CURVE_LOGITS, CURVE_MASK), [-2.0, 0.5, 1.0, 3.0])


def test_seen_absent_curve_hand_computation():
    curve = seen_absent_curve(CURVE_LOGITS, CURVE_LABELS, CURVE_MASK)
    assert list(curve.columns) == ["gamma", "seen_accuracy", "absent_accuracy", "accuracy"]
    np.testing.assert_allclose(curve["gamma"], [-3.0, -0.75, 0.75, 2.0, 4.0])
    np.testing.assert_allclose(curve["seen_accuracy"], [1 / 2, 1 / 2, 1 / 2, 1 / 2, 0.0])
    np.testing.assert_allclose(curve["absent_accuracy"], [0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(curve["accuracy"], [1 / 5, 2 / 5, 2 / 5, 3 / 5, 2 / 5])


def test_seen_absent_curve_agrees_with_argmax_of_offset_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 6))
    labels = rng.integers(0, 6, size=40)
    mask = absent_class_mask(6, [1, 4])
    gammas = [-2.5, -0.3, 0.0, 0.7, 3.1]
    curve = seen_absent_curve(logits, labels, mask, gammas)
    absent_rows = mask[labels]
    for row, gamma in zip(curve.itertuples(), gammas):
        correct = apply_logit_offset(logits, mask, gamma).argmax(axis=1) == labels
        assert row.accuracy == pytest.approx(correct.mean())
        assert row.seen_accuracy == pytest.approx(correct[~absent_rows].mean())
        assert row.absent_accuracy == pytest.approx(correct[absent_rows].mean())


def test_ausuc_hand_computation_and_axis_symmetry():
    seen = [1.0, 0.8, 0.5, 0.0]
    absent = [0.0, 0.4, 0.7, 0.9]
    # x = seen: 0.5*(0.9+0.7)/2 + 0.3*(0.7+0.4)/2 + 0.2*(0.4+0)/2 = 0.4 + 0.165 + 0.04
    assert ausuc(seen, absent) == pytest.approx(0.605)
    assert ausuc(seen[::-1], absent[::-1]) == pytest.approx(0.605)
    assert ausuc(absent, seen) == pytest.approx(0.605)  # same area with the axes swapped
    with pytest.raises(ValueError):
        ausuc([0.5], [0.5])


def test_ausuc_of_swept_curve_follows_the_staircase():
    curve = seen_absent_curve(CURVE_LOGITS, CURVE_LABELS, CURVE_MASK)
    # Points (seen, absent): (0.5, 0), (0.5, 1/3) x2, (0.5, 2/3), (0, 2/3): a step of height 2/3 and width 1/2.
    assert ausuc(curve["seen_accuracy"], curve["absent_accuracy"]) == pytest.approx(1 / 3)
    assert ausuc(curve["absent_accuracy"], curve["seen_accuracy"]) == pytest.approx(1 / 3)


# Fold B: classes 0, 1 seen, 2 pseudo-absent. Gaps 2, 0.5, 1 -> gammas -0.5, 0.75, 1.5, 3 with
# accuracy 2/3, 1/3, 2/3, 1/3 and pseudo-absent accuracy 0, 0, 1, 1.
FOLD_B_LOGITS = np.array([[3.0, 0.0, 1.0], [2.0, 0.0, 1.5], [0.0, 2.0, 1.0]])
FOLD_B_LABELS = np.array([0, 0, 2])
FOLD_B_MASK = np.array([False, False, True])


def test_pseudo_cv_gamma_hand_computation():
    logits = [CURVE_LOGITS, FOLD_B_LOGITS]
    labels = [CURVE_LABELS, FOLD_B_LABELS]
    masks = [CURVE_MASK, FOLD_B_MASK]
    # Unconstrained: fold A best accuracy 3/5 at gamma 2; fold B ties 2/3 at -0.5 and 1.5 -> smallest, -0.5.
    assert pseudo_cv_gamma(logits, labels, masks) == pytest.approx((2.0 - 0.5) / 2)
    # Floor 0.5 on fold B excludes -0.5 and 0.75 -> 1.5.
    assert pseudo_cv_gamma(logits, labels, masks, [0.3, 0.5]) == pytest.approx((2.0 + 1.5) / 2)
    # Unreachable floor on fold B: best absent accuracy (1 at 1.5 and 3), then best accuracy -> 1.5.
    assert pseudo_cv_gamma([FOLD_B_LOGITS], [FOLD_B_LABELS], [FOLD_B_MASK], [1.1]) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="folds"):
        pseudo_cv_gamma(logits, labels, masks, [0.3])


def test_pseudo_absent_folds_reproducible_and_bounded():
    seen = list(range(10, 40))
    folds = pseudo_absent_folds(seen, n_folds=3, fraction=0.5, seed=0)
    assert len(folds) == 3
    for fold in folds:
        assert len(fold) == 15 and len(set(fold.tolist())) == 15
        assert set(fold.tolist()) <= set(seen)
        assert np.all(np.diff(fold) > 0)
    again = pseudo_absent_folds(seen, n_folds=3, fraction=0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    other = pseudo_absent_folds(seen, n_folds=3, fraction=0.5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(folds, other))
    assert len(pseudo_absent_folds([0, 1, 2], 1, 0.01, 0)[0]) == 1  # at least one pseudo-absent
    assert len(pseudo_absent_folds([0, 1, 2], 1, 0.99, 0)[0]) == 2  # at least one left seen


# ObjectNet-style groups over 8 model classes; absent model classes 1, 2, 4, 5, 7.
GROUPS = [[0, 1], [2], [3, 4, 5], [6], [7]]
GROUP_MASK = absent_class_mask(8, [1, 2, 4, 5, 7])


def test_projected_absent_mask_needs_every_member_absent():
    columns = np.concatenate(GROUPS)
    column_class = np.repeat(np.arange(len(GROUPS)), [len(g) for g in GROUPS])
    got = projected_absent_mask(GROUP_MASK[columns], column_class, len(GROUPS))
    # [0, 1] and [3, 4, 5] mix seen and absent classes: seen; [2] and [7] absent; [6] seen
    assert got.tolist() == [False, True, False, False, True]
    # a class subset (ImageNet-R/-A): each evaluation class is one model class
    assert projected_absent_mask(GROUP_MASK[[7, 0, 2]], np.arange(3), 3).tolist() == [True, False, True]
    with pytest.raises(ValueError):
        projected_absent_mask(GROUP_MASK, np.arange(7), 8)


def test_seen_absent_curve_through_a_projection_agrees_with_argmax_of_projected_offset_logits():
    """gamma added on the model's classes, then the max over each group: the curve computed from the best seen and
    best absent column (and the group each belongs to) matches brute force at every gamma."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 8))
    labels = rng.integers(0, len(GROUPS), size=200)
    columns = np.concatenate(GROUPS)
    column_class = np.repeat(np.arange(len(GROUPS)), [len(g) for g in GROUPS])
    eval_absent = projected_absent_mask(GROUP_MASK[columns], column_class, len(GROUPS))[labels]
    gammas = [-3.0, -1.1, -0.2, 0.0, 0.4, 1.3, 2.9]
    curve = seen_absent_curve(logits[:, columns], labels, GROUP_MASK[columns], gammas, column_class=column_class)
    for row, gamma in zip(curve.itertuples(), gammas):
        pred = max_project_logits(apply_logit_offset(logits, GROUP_MASK, gamma), GROUPS).argmax(1)
        correct = pred == labels
        assert row.accuracy == pytest.approx(correct.mean())
        assert row.seen_accuracy == pytest.approx(correct[~eval_absent].mean())
        assert row.absent_accuracy == pytest.approx(correct[eval_absent].mean())
    default = seen_absent_curve(logits[:, columns], labels, GROUP_MASK[columns], column_class=column_class)
    assert default["seen_accuracy"].iloc[0] > 0 and default["absent_accuracy"].iloc[-1] > 0
