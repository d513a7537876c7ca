"""Post-hoc calibration between seen (fine-tuned) and absent classes: "Fine-Tuning is Fine, if Calibrated".

Follows ``OSU-MLB/Fine-Tuning-Is-Fine-If-Calibrated`` ``py/util/evaluate.py`` (Mai et al. 2024): a bias γ is added to
the logits of the classes absent from fine-tuning; γ is chosen by the average logit gap (ALG) or by pseudo
cross-validation (PCV), and the seen/absent trade-off is summarised by the area under its curve (AUSUC).

Conventions: ``logits`` is ``(N, C)``, ``labels`` is ``(N,)`` of class indices, ``absent_mask`` is a boolean ``(C,)``
marking absent columns; accuracies are fractions in [0, 1]. With offset γ, example i predicts its best absent class
iff γ > d_i = (max seen logit − max absent logit), else its best seen class (exact ties go to the seen class).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def absent_class_mask(num_classes: int, absent: Sequence[int]) -> np.ndarray:
    """Boolean ``(num_classes,)`` mask, True at the classes absent from fine-tuning."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    idx = np.asarray(absent, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(f"absent class indices must lie in [0, {num_classes}), got {idx.tolist()}")
    mask = np.zeros(num_classes, dtype=bool)
    mask[idx] = True
    return mask


def _check_logits(logits: np.ndarray, absent_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    mask = np.asarray(absent_mask)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {logits.shape}")
    if mask.dtype != bool or mask.shape != (logits.shape[1],):
        raise ValueError(
            f"absent_mask must be a boolean array of shape ({logits.shape[1]},), got {mask.dtype} {mask.shape}"
        )
    if mask.all() or not mask.any():
        raise ValueError("absent_mask must mark at least one absent and one seen class")
    return logits, mask


def _check_labels(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array of shape ({n},), got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return labels


def _best_seen_absent(logits: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: the best seen class, the best absent class, and the gap d = max seen − max absent logit."""
    seen_cols, absent_cols = np.flatnonzero(~mask), np.flatnonzero(mask)
    seen, absent = logits[:, seen_cols], logits[:, absent_cols]
    arg_seen, arg_absent = seen.argmax(axis=1), absent.argmax(axis=1)
    rows = np.arange(logits.shape[0])
    gap = seen[rows, arg_seen].astype(np.float64) - absent[rows, arg_absent].astype(np.float64)
    return seen_cols[arg_seen], absent_cols[arg_absent], gap


def apply_logit_offset(logits: np.ndarray, absent_mask: np.ndarray, gamma: float) -> np.ndarray:
    """Copy of ``logits`` with γ added to the absent-class columns (calibration repo: ``logits[:, invisible] += γ``)."""
    logits, mask = _check_logits(logits, absent_mask)
    out = np.array(logits, dtype=logits.dtype if np.issubdtype(logits.dtype, np.floating) else np.float64)
    out[:, mask] += gamma
    return out


def average_logit_gap(logits: np.ndarray, labels: np.ndarray, absent_mask: np.ndarray) -> float:
    """ALG (calibration repo ``evaluate_baseline_calibration``): γ = mean[mean non-label seen logit] − mean[mean absent
    logit], both means over the examples whose label is a seen class only; pass ID training or validation data."""
    logits, mask = _check_logits(logits, absent_mask)
    labels = _check_labels(labels, logits.shape[0], logits.shape[1])
    if (~mask).sum() < 2:
        raise ValueError("ALG needs at least two seen classes (one besides the label)")
    rows = ~mask[labels]
    if not rows.any():
        raise ValueError("no example has a seen-class label")
    x = logits[rows].astype(np.float64)
    y = labels[rows]
    seen_sum = x[:, ~mask].sum(axis=1)
    non_label_seen_mean = (seen_sum - x[np.arange(len(y)), y]) / ((~mask).sum() - 1)
    absent_mean = x[:, mask].mean(axis=1)
    return float(non_label_seen_mean.mean() - absent_mean.mean())


def gamma_breakpoints(logits: np.ndarray, absent_mask: np.ndarray) -> np.ndarray:
    """Sorted distinct γ at which some prediction switches between best seen and best absent class (the per-example
    gap max seen logit − max absent logit)."""
    logits, mask = _check_logits(logits, absent_mask)
    return np.unique(_best_seen_absent(logits, mask)[2])


def _sweep_gammas(breakpoints: np.ndarray) -> np.ndarray:
    """One γ inside each interval between breakpoints: below all, the midpoints, above all (as the reference sweep)."""
    if breakpoints.size == 0:
        raise ValueError("no examples to sweep")
    mid = (breakpoints[:-1] + breakpoints[1:]) / 2
    return np.concatenate([[breakpoints[0] - 1.0], mid, [breakpoints[-1] + 1.0]])


def projected_absent_mask(absent_mask: np.ndarray, column_class: np.ndarray, num_eval_classes: int) -> np.ndarray:
    """Absent mask over evaluation classes when each logit column counts as evaluation class ``column_class[j]``
    (ImageNet-R/-A: a class subset; ObjectNet: the max over a group of ImageNet classes).

    An evaluation class is absent when every model class it is made of is absent; a group that mixes seen and absent
    model classes counts as seen (the model was fine-tuned on part of it).
    """
    mask = np.asarray(absent_mask, dtype=bool).reshape(-1)
    column_class = np.asarray(column_class, dtype=np.int64).reshape(-1)
    if mask.shape != column_class.shape:
        raise ValueError(f"absent_mask has {mask.size} columns, column_class {column_class.size}")
    if column_class.size and (column_class.min() < 0 or column_class.max() >= num_eval_classes):
        raise ValueError(f"column_class must lie in [0, {num_eval_classes})")
    has_seen = np.zeros(num_eval_classes, dtype=bool)
    has_seen[column_class[~mask]] = True
    has_absent = np.zeros(num_eval_classes, dtype=bool)
    has_absent[column_class[mask]] = True
    return has_absent & ~has_seen


def seen_absent_curve(
    logits: np.ndarray,
    labels: np.ndarray,
    absent_mask: np.ndarray,
    gammas: Sequence[float] | None = None,
    column_class: np.ndarray | None = None,
) -> pd.DataFrame:
    """Seen, absent and overall accuracy as γ is added to the absent logits (calibration repo ``evaluate_auc``).

    Default ``gammas``: one value strictly inside each interval between :func:`gamma_breakpoints`, plus one below and
    one above all of them, so the curve runs from "never predict absent" to "always prefer absent" and visits
    every distinct prediction state once, away from ties. Accuracies of an empty group are NaN.

    ``column_class`` (default: identity): the evaluation class each logit column counts as, for projected domains;
    ``labels`` are then evaluation classes and an example's class is absent as in :func:`projected_absent_mask`.
    With γ added before the projection (a class's logit is the max over its columns), the prediction is still the
    class of the best seen column or of the best absent column, switching at the same gap d.
    """
    logits, mask = _check_logits(logits, absent_mask)
    if column_class is None:
        column_class = np.arange(logits.shape[1])
        num_eval = logits.shape[1]
    else:
        column_class = np.asarray(column_class, dtype=np.int64).reshape(-1)
        num_eval = int(column_class.max()) + 1 if column_class.size else 0
        if column_class.shape != (logits.shape[1],):
            raise ValueError(f"column_class must have one entry per logit column ({logits.shape[1]})")
    labels = _check_labels(labels, logits.shape[0], num_eval)
    best_seen, best_absent, gap = _best_seen_absent(logits, mask)
    grid = _sweep_gammas(np.unique(gap)) if gammas is None else np.asarray(gammas, dtype=np.float64).reshape(-1)

    label_absent = projected_absent_mask(mask, column_class, num_eval)[labels]
    right_unswitched = column_class[best_seen] == labels  # correct while predicting its best seen column's class
    right_switched = column_class[best_absent] == labels  # correct once switched to its best absent column's class
    order = np.argsort(gap, kind="stable")
    # switched = the examples with d < γ (a prefix of ``order``); per group, correct = switched-right + rest-right
    n_switched = np.searchsorted(gap[order], grid, side="left")

    def correct_in(group: np.ndarray) -> np.ndarray:
        cum_unswitched = np.concatenate([[0], np.cumsum((right_unswitched & group)[order])])
        cum_switched = np.concatenate([[0], np.cumsum((right_switched & group)[order])])
        return cum_switched[n_switched] + cum_unswitched[-1] - cum_unswitched[n_switched]

    n_seen_correct, n_absent_correct = correct_in(~label_absent), correct_in(label_absent)
    n_seen, n_absent = int((~label_absent).sum()), int(label_absent.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(
            {
                "gamma": grid,
                "seen_accuracy": n_seen_correct / n_seen if n_seen else np.full(grid.shape, np.nan),
                "absent_accuracy": n_absent_correct / n_absent if n_absent else np.full(grid.shape, np.nan),
                "accuracy": (n_seen_correct + n_absent_correct) / len(labels) if len(labels) else np.nan,
            }
        )


def ausuc(seen_accuracy: Sequence[float], absent_accuracy: Sequence[float]) -> float:
    """AUSUC as the calibration repo computes it: ``sklearn.metrics.auc(seen, absent)``, trapezoids over the curve
    sorted by seen accuracy.

    Points with equal seen accuracy are ordered by decreasing absent accuracy, i.e. along the curve (the reference's
    unstable argsort leaves this open). No end points are added: take the curve from :func:`seen_absent_curve` with
    default γ, which reaches (max seen, 0) and (0, max absent), where the area equals the one with axes swapped.
    """
    x = np.asarray(seen_accuracy, dtype=np.float64).reshape(-1)
    y = np.asarray(absent_accuracy, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two equal-length curves of at least 2 points, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("accuracies must be finite (is a group empty?)")
    order = np.lexsort((-y, x))
    x, y = x[order], y[order]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _pick_gamma(curve: pd.DataFrame, min_absent: float | None) -> float:
    acc = curve["accuracy"].to_numpy()
    absent = curve["absent_accuracy"].to_numpy()
    if min_absent is not None:
        if np.isnan(absent).any():
            raise ValueError("a fold has no example labelled with a pseudo-absent class")
        valid = absent >= min_absent
        if not valid.any():
            # No γ meets the floor: take the best absent accuracy, then the best overall accuracy.
            best = np.flatnonzero(absent == absent.max())
            return float(curve["gamma"].to_numpy()[best[np.argmax(acc[best])]])
        acc = np.where(valid, acc, -np.inf)
    return float(curve["gamma"].to_numpy()[np.argmax(acc)])  # ties: the smallest γ


def pseudo_cv_gamma(
    fold_logits: Sequence[np.ndarray],
    fold_labels: Sequence[np.ndarray],
    fold_pseudo_absent: Sequence[np.ndarray],
    min_absent_accuracy: Sequence[float] | None = None,
) -> float:
    """PCV (calibration repo ``evaluate_better_calibration``): mean over folds of the accuracy-maximising γ.

    Per fold, γ is swept over that fold's breakpoints (as in :func:`seen_absent_curve`) and the γ with the highest
    overall accuracy subject to pseudo-absent accuracy ≥ ``min_absent_accuracy[fold]`` is kept (the smallest such γ on
    ties); when no γ meets the floor, the γ with the best pseudo-absent accuracy is kept instead. Each fold's mask
    marks every column its model was not fine-tuned on (the pseudo-absent classes, plus any truly absent ones).
    """
    n = len(fold_logits)
    if n == 0 or len(fold_labels) != n or len(fold_pseudo_absent) != n:
        raise ValueError("fold_logits, fold_labels and fold_pseudo_absent must be non-empty and of equal length")
    if min_absent_accuracy is not None and len(min_absent_accuracy) != n:
        raise ValueError(f"min_absent_accuracy has {len(min_absent_accuracy)} entries for {n} folds")
    gammas = []
    for f in range(n):
        curve = seen_absent_curve(fold_logits[f], fold_labels[f], fold_pseudo_absent[f])
        floor = None if min_absent_accuracy is None else float(min_absent_accuracy[f])
        gammas.append(_pick_gamma(curve, floor))
    return float(np.mean(gammas))


def pseudo_absent_folds(seen_classes: Sequence[int], n_folds: int, fraction: float, seed: int) -> list[np.ndarray]:
    """Per fold, a sorted random subset of the seen classes held out as pseudo-absent (PCV; the reference: 15 of 30).

    Each subset has round(fraction · n) classes, clipped so that at least one class is on each side.
    """
    classes = np.asarray(seen_classes, dtype=np.int64).reshape(-1)
    if np.unique(classes).size != classes.size or classes.size < 2:
        raise ValueError("seen_classes must hold at least two distinct classes")
    if n_folds < 1:
        raise ValueError(f"n_folds must be positive, got {n_folds}")
    if not (0.0 < fraction < 1.0):
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    k = int(np.clip(np.floor(fraction * classes.size + 0.5), 1, classes.size - 1))
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(classes, size=k, replace=False)) for _ in range(n_folds)]
