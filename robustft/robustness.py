"""Effective robustness (Taori et al. 2020, "Measuring robustness to natural distribution shifts"; Miller et al.
2021, "Accuracy on the line"): OOD accuracy above what a baseline line predicts from ID accuracy on probit axes.

ER = acc_OOD - baseline(acc_ID), baseline(x) = Phi(slope * Phi^-1(x) + intercept), in accuracy (a fraction; the
report shows points). The baseline of an OOD domain is the published line where one exists (ImageNet shifts,
:data:`PUBLISHED_BASELINES`) or an OLS fit over the study's own end points, labelled ``fitted``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger("robustft")

OOD_AVERAGE = "ood_average"
#: The source of the published lines (REFERENCES.md, "Effective robustness").
TAORI_SOURCE = ("published: Taori et al. 2020, probit fit over the imagenet-testbed standard models "
                "(robustness_top1s.csv, ID = ImageNet val on all classes)")


def probit(p: np.ndarray | float) -> np.ndarray:
    """Phi^-1(p), the standard normal quantile; ``p`` must lie strictly inside (0, 1)."""
    import torch

    arr = np.asarray(p, dtype=np.float64)
    if arr.size and (np.nanmin(arr) <= 0 or np.nanmax(arr) >= 1):
        raise ValueError(f"probit: accuracies must lie strictly inside (0, 1), got min {np.nanmin(arr)}, "
                         f"max {np.nanmax(arr)}")
    return torch.special.ndtri(torch.from_numpy(np.array(arr, dtype=np.float64))).numpy()


def inverse_probit(z: np.ndarray | float) -> np.ndarray:
    """Phi(z), the standard normal CDF."""
    import torch

    return torch.special.ndtr(torch.from_numpy(np.array(z, dtype=np.float64))).numpy()


def clip_accuracy(acc: np.ndarray | float, n: np.ndarray | int) -> np.ndarray:
    """Accuracy moved half an example inside (0, 1) (``[0.5/n, 1 - 0.5/n]``) so that its probit is finite."""
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    return np.clip(np.asarray(acc, dtype=np.float64), 0.5 / n, 1 - 0.5 / n)


@dataclass(frozen=True)
class Baseline:
    """A baseline line on probit axes, piecewise in ID accuracy: ``pieces[i] = (x_from, slope, intercept)`` applies
    from ID accuracy ``x_from`` on (the first piece from 0). ``kind``: ``published``, ``fitted`` or ``none``."""

    pieces: tuple[tuple[float, float, float], ...]
    kind: str
    source: str
    n_points: int = 0

    def predict(self, id_accuracy: np.ndarray | float) -> np.ndarray:
        """The OOD accuracy the line predicts at ``id_accuracy`` (NaN without a line)."""
        x = np.asarray(id_accuracy, dtype=np.float64)
        if not self.pieces:
            return np.full(x.shape, np.nan)
        z = probit(x)
        out = np.empty_like(z)
        starts = np.array([p[0] for p in self.pieces])
        which = np.clip(np.searchsorted(starts, x, side="right") - 1, 0, len(self.pieces) - 1)
        for i, (_, slope, intercept) in enumerate(self.pieces):
            sel = which == i
            out[sel] = slope * z[sel] + intercept
        return inverse_probit(out)

    @property
    def slope(self) -> float:
        return self.pieces[0][1] if len(self.pieces) == 1 else float("nan")

    @property
    def intercept(self) -> float:
        return self.pieces[0][2] if len(self.pieces) == 1 else float("nan")


NO_BASELINE = Baseline((), "none", "none: fewer than two distinct end points to fit")

#: Published probit lines (REFERENCES.md, Part 2, "Effective robustness": recomputed from imagenet-testbed with the
#: paper scripts' filters), per (ID domain, OOD domain). ID accuracy is ImageNet val on all 1000 classes, as the
#: pipeline measures it; ImageNet-A is piecewise, split at 76.13 % (ResNet-50).
PUBLISHED_BASELINES: dict[tuple[str, str], Baseline] = {
    ("imagenet", "imagenet_v2"): Baseline(((0.0, 0.96168, -0.32470),), "published", TAORI_SOURCE, 85),
    ("imagenet", "imagenet_sketch"): Baseline(((0.0, 1.04353, -1.42586),), "published", TAORI_SOURCE, 85),
    ("imagenet", "objectnet"): Baseline(((0.0, 1.22150, -1.25492),), "published", TAORI_SOURCE, 85),
    ("imagenet", "imagenet_r"): Baseline(((0.0, 0.94236, -1.00331),), "published", TAORI_SOURCE, 80),
    ("imagenet", "imagenet_a"): Baseline(((0.0, 0.64294, -2.34481), (0.7613, 5.11468, -5.42853)), "published",
                                         TAORI_SOURCE, 84),
}


def fit_probit_line(id_accuracy: Sequence[float], ood_accuracy: Sequence[float], n_id: Sequence[int] | int = 10**6,
                    n_ood: Sequence[int] | int = 10**6) -> Baseline:
    """OLS fit of probit(OOD) on probit(ID) (Miller et al. 2021), accuracies clipped half an example inside (0, 1);
    :data:`NO_BASELINE` with fewer than two distinct ID accuracies."""
    x = clip_accuracy(np.asarray(id_accuracy, dtype=np.float64), n_id)
    y = clip_accuracy(np.asarray(ood_accuracy, dtype=np.float64), n_ood)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"fit_probit_line: ID and OOD accuracies must be 1-D of one length, got {x.shape}, {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if np.unique(x).size < 2:
        return NO_BASELINE
    slope, intercept = np.polyfit(probit(x), probit(y), 1)
    return Baseline(((0.0, float(slope), float(intercept)),), "fitted",
                    f"fitted: probit OLS over {x.size} end points of this study", int(x.size))


def effective_robustness(id_accuracy, ood_accuracy, baseline: Baseline, n_id=10**6) -> np.ndarray:
    """ER = OOD accuracy - the baseline's prediction at the (clipped) ID accuracy."""
    return np.asarray(ood_accuracy, dtype=np.float64) - baseline.predict(clip_accuracy(id_accuracy, n_id))


def effective_robustness_ci(id_accuracy: float, n_id: int, ood: Sequence[tuple[float, int, Baseline]],
                            n_boot: int, level: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ER resampling the test images: the ID test set and each OOD domain's,
    independently (``ood``: (accuracy, examples, baseline) per domain; several domains give the mean of their ERs).
    The accuracy of n examples resampled with replacement is Binomial(n, accuracy) / n, drawn directly; the
    baseline is held fixed."""
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"effective_robustness_ci: n_boot {n_boot} must be >= 1 and level {level} in (0, 1)")
    if n_id < 1 or any(n < 1 for _, n, _ in ood):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    x = clip_accuracy(rng.binomial(n_id, id_accuracy, size=n_boot) / n_id, n_id)
    er = np.zeros(n_boot)
    for acc, n, baseline in ood:
        er += rng.binomial(n, acc, size=n_boot) / n - baseline.predict(x)
    er /= len(ood)
    tail = (1 - level) / 2
    low, high = np.quantile(er, [tail, 1 - tail])
    return float(low), float(high)


# ------------------------------------------------------------------------------------------------ on the summary
#: Columns of ``results/analysis/effective_robustness.parquet`` (documented in the README).
ER_COLUMNS = (
    "study", "method", "variant", "seed", "protocol", "interpolation", "calibration", "alpha", "selected_alpha",
    "end_point", "eval_domain", "id_accuracy", "ood_accuracy", "baseline_accuracy", "effective_robustness",
    "er_ci_low", "er_ci_high", "baseline_kind", "baseline_source", "baseline_slope", "baseline_intercept",
    "baseline_points",
)
_POINT = ["study", "method", "variant", "seed", "interpolation", "calibration", "alpha"]


def end_points(rows: pd.DataFrame) -> pd.DataFrame:
    """The points a fitted baseline goes through: the reference (alpha 0, once per distinct accuracy pair) and each
    run's fine-tuned model (alpha 1), linear, uncalibrated, runs of the ``full`` and ``kshot`` protocols (a
    class-subset run is scored on classes it never saw)."""
    rows = rows[(rows["interpolation"] == "linear") & (rows["calibration"] == "none")
                & (rows["protocol"] != "class_subset") & rows["alpha"].isin([0.0, 1.0])]
    reference = rows[rows["alpha"] == 0.0].drop_duplicates(["eval_domain", "id_accuracy", "ood_accuracy"])
    return pd.concat([reference, rows[rows["alpha"] == 1.0]], ignore_index=True)


def baselines_for(points: pd.DataFrame, id_domain: str, ood_domains: Sequence[str],
                  published: Mapping[tuple[str, str], Baseline] = PUBLISHED_BASELINES) -> dict[str, Baseline]:
    """Per OOD domain: the published line for (``id_domain``, domain), else a probit fit over ``points`` (rows with
    ``eval_domain``, ``id_accuracy``, ``ood_accuracy``, ``id_n``, ``n``: :func:`end_points`)."""
    out = {}
    for domain in ood_domains:
        if (id_domain, domain) in published:
            out[domain] = published[(id_domain, domain)]
            continue
        mine = points[points["eval_domain"] == domain]
        out[domain] = fit_probit_line(mine["id_accuracy"], mine["ood_accuracy"], mine["id_n"], mine["n"])
    return out


def _paired_with_id(summary: pd.DataFrame) -> pd.DataFrame:
    """Each OOD test row beside its point's ID test accuracy and examples (``id_accuracy``, ``id_n``)."""
    test = summary[summary["split"] == "test"]
    ident = test[test["eval_domain"] == test["train_domain"]][[*_POINT, "accuracy", "n"]]
    ident = ident.rename(columns={"accuracy": "id_accuracy", "n": "id_n"})
    ood = test[test["is_ood"]].rename(columns={"accuracy": "ood_accuracy"})
    return ood.merge(ident, on=_POINT, how="inner")


def effective_robustness_table(summary: pd.DataFrame, n_boot: int, ci_level: float,
                               published: Mapping[tuple[str, str], Baseline] = PUBLISHED_BASELINES) -> pd.DataFrame:
    """One row per (study, run, interpolation, calibration, alpha, OOD domain and ``ood_average``): ER against the
    domain's baseline with a bootstrap interval (:data:`ER_COLUMNS`). The OOD average's ER is the mean of the
    domains' ERs (each against its own line), not the ER of the averaged accuracy."""
    frames = []
    for study, rows in summary.groupby("study", sort=False):
        id_domain = str(rows["train_domain"].iloc[0])
        ood_domains = [d for d in pd.unique(rows.loc[rows["is_ood"], "eval_domain"]) if d != OOD_AVERAGE]
        paired = _paired_with_id(rows)
        lines = baselines_for(end_points(paired), id_domain, ood_domains, published)
        per_domain = paired[paired["eval_domain"] != OOD_AVERAGE].copy()
        per_domain["baseline_accuracy"] = np.nan
        for domain, line in lines.items():
            sel = per_domain["eval_domain"] == domain
            per_domain.loc[sel, "baseline_accuracy"] = line.predict(
                clip_accuracy(per_domain.loc[sel, "id_accuracy"], per_domain.loc[sel, "id_n"]))
        per_domain["effective_robustness"] = per_domain["ood_accuracy"] - per_domain["baseline_accuracy"]
        out = []
        for _, point in per_domain.groupby(_POINT, sort=False):
            point = point.set_index("eval_domain")
            first = point.iloc[0]
            id_acc, id_n = float(first["id_accuracy"]), int(first["id_n"])
            base = {c: first[c] for c in (*_POINT, "protocol", "selected_alpha")}
            for domain in [*point.index, OOD_AVERAGE] if set(point.index) == set(ood_domains) else list(point.index):
                names = ood_domains if domain == OOD_AVERAGE else [domain]
                members = [(float(point.loc[d, "ood_accuracy"]), int(point.loc[d, "n"]), lines[d]) for d in names]
                drawn = all(lines[d].pieces for d in names)
                low, high = (effective_robustness_ci(id_acc, id_n, members, n_boot, ci_level)
                             if n_boot and drawn else (np.nan, np.nan))
                out.append({**base, "eval_domain": domain, "id_accuracy": id_acc,
                            "ood_accuracy": float(point.loc[names, "ood_accuracy"].mean()),
                            "baseline_accuracy": float(point.loc[names, "baseline_accuracy"].mean()),
                            "effective_robustness": float(point.loc[names, "effective_robustness"].mean()),
                            "er_ci_low": low, "er_ci_high": high, **_line_columns([lines[d] for d in names])})
        frame = pd.DataFrame(out)
        if len(frame):
            frame["end_point"] = frame["alpha"].isin([0.0, 1.0])
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=list(ER_COLUMNS))
    table = pd.concat(frames, ignore_index=True)
    table["seed"] = table["seed"].astype(int)
    table["selected_alpha"] = table["selected_alpha"].astype(bool)
    return table[list(ER_COLUMNS)].reset_index(drop=True)


def _line_columns(lines: Sequence[Baseline]) -> dict:
    """The baseline columns of a row: its line's, or for the OOD average (several lines) their kinds and sources."""
    if len(lines) == 1:
        line = lines[0]
        return {"baseline_kind": line.kind, "baseline_source": line.source, "baseline_slope": line.slope,
                "baseline_intercept": line.intercept, "baseline_points": line.n_points}
    return {"baseline_kind": "+".join(sorted({line.kind for line in lines})),
            "baseline_source": "mean of the OOD domains' effective robustness, each against its own line: "
                               + "; ".join(sorted({line.source for line in lines})),
            "baseline_slope": float("nan"), "baseline_intercept": float("nan"),
            "baseline_points": int(sum(line.n_points for line in lines))}


def effective_robustness_stage(*, summary: str, bootstrap: int, ci_level: float, out: str) -> None:
    """Rule effective_robustness: ``results/analysis/effective_robustness.parquet`` from the summary."""
    from robustft.io.tables import read_table, write_table

    frame = read_table(summary, ("study", "method", "variant", "seed", "eval_domain", "split", "alpha", "accuracy",
                                 "n", "is_ood", "train_domain", "protocol", "selected_alpha"))
    table = effective_robustness_table(frame, bootstrap, ci_level)
    baselines = (table.drop_duplicates(["study", "eval_domain"])
                 [["study", "eval_domain", "baseline_kind", "baseline_source", "baseline_slope",
                   "baseline_intercept", "baseline_points"]].to_dict("records"))
    for line in baselines:
        log.info("baseline %s / %s: %s (slope %.4g, intercept %.4g)", line["study"], line["eval_domain"],
                 line["baseline_source"], line["baseline_slope"], line["baseline_intercept"])
    write_table(out, table, {"columns": list(ER_COLUMNS), "ci_level": ci_level, "bootstrap": bootstrap,
                             "baselines": json.loads(json.dumps(baselines, default=str))})
