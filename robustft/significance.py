"""Paired comparisons on shared test images: the paired bootstrap (Koehn 2004), McNemar's exact test, and Holm's
step-down correction (Holm 1979) over a family of tests.

Two models evaluated on the same images differ image by image: with several seeds per side, each image's score is
its correctness averaged over the side's seeds, and the statistic is the mean over images of the difference
``d_i`` (over domains: the mean of the domains' means). The bootstrap resamples images, the same ones for both
sides; the test is the sign test on the images where ``d_i != 0``, which with one seed per side is McNemar's exact
test (n10 = images only the first side gets right, n01 the reverse).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger("robustft")

#: The multiple-comparison correction of every family of tests here.
CORRECTION = "holm"
OOD_AVERAGE = "ood_average"
REFERENCE_METHOD = "zeroshot"
FULL_FT_METHOD = "full_ft"


# ----------------------------------------------------------------------------------------------- pure statistics
def mcnemar_exact(n10: int, n01: int) -> float:
    """Two-sided exact McNemar p-value: under H0, n10 ~ Binomial(n10 + n01, 1/2) (statsmodels ``mcnemar(exact=True)``);
    1.0 without discordant pairs."""
    if n10 < 0 or n01 < 0:
        raise ValueError(f"mcnemar_exact: counts must be non-negative, got n10={n10}, n01={n01}")
    n, k = int(n10 + n01), int(min(n10, n01))
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return float(min(1.0, 2 * tail))


def sign_test(differences: np.ndarray) -> tuple[float, int, int]:
    """(p, images better, images worse): McNemar's exact test on the signs of per-image differences."""
    d = np.asarray(differences, dtype=np.float64).reshape(-1)
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    return mcnemar_exact(better, worse), better, worse


def paired_bootstrap_ci(differences: Sequence[np.ndarray], n_boot: int, level: float, seed: int = 0
                        ) -> tuple[float, float]:
    """Percentile interval of the mean over groups (domains) of the mean per-image difference, resampling each
    group's images with replacement (both sides together). A resample's mean of a variable taking few distinct values
    only depends on how often each value is drawn, a multinomial draw: exact, and O(n_boot x distinct values)."""
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"paired_bootstrap_ci: n_boot {n_boot} must be >= 1 and level {level} in (0, 1)")
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for d in differences:
        d = np.asarray(d, dtype=np.float64).reshape(-1)
        if d.size == 0:
            raise ValueError("paired_bootstrap_ci: a group without images")
        values, counts = np.unique(d, return_counts=True)
        draws = rng.multinomial(d.size, counts / d.size, size=n_boot)
        total += draws @ values / d.size
    total /= len(differences)
    tail = (1 - level) / 2
    low, high = np.quantile(total, [tail, 1 - tail])
    return float(low), float(high)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979; statsmodels ``multipletests(method='holm')``): sorted ascending,
    p_(i) * (m - i + 1), made monotone, capped at 1. NaNs stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adjusted
    return out


def compare(first: Sequence[np.ndarray], second: Sequence[np.ndarray], n_boot: int, level: float, seed: int = 0
            ) -> dict[str, float]:
    """Paired comparison of two sides over one or several groups of images: ``first[g]`` and ``second[g]`` are the
    per-image correctness of group g, shape (seeds, images) or (images,), averaged over seeds. Returns accuracies,
    their difference, its bootstrap interval, McNemar / sign-test p and the images each side wins."""
    if len(first) != len(second) or not first:
        raise ValueError(f"compare: {len(first)} and {len(second)} groups of images; one or more of each, equal")
    diffs, acc_a, acc_b = [], [], []
    for a, b in zip(first, second):
        a = np.atleast_2d(np.asarray(a, dtype=np.float64)).mean(axis=0)
        b = np.atleast_2d(np.asarray(b, dtype=np.float64)).mean(axis=0)
        if a.shape != b.shape:
            raise ValueError(f"compare: the two sides hold {a.size} and {b.size} images; paired tests need the same")
        diffs.append(a - b)
        acc_a.append(a.mean())
        acc_b.append(b.mean())
    p, better, worse = sign_test(np.concatenate(diffs))
    low, high = paired_bootstrap_ci(diffs, n_boot, level, seed) if n_boot else (np.nan, np.nan)
    return {"accuracy": float(np.mean(acc_a)), "against_accuracy": float(np.mean(acc_b)),
            "difference": float(np.mean([d.mean() for d in diffs])), "diff_ci_low": low, "diff_ci_high": high,
            "p_value": p, "n_better": better, "n_worse": worse, "n": int(sum(d.size for d in diffs))}


# ------------------------------------------------------------------------------------ per-image correctness on disk
def metrics_path(results: str | Path, study: str, method: str, variant: str, seed: int) -> Path:
    """A run's ``metrics.parquet`` under a results folder (the layout of the README's Results section)."""
    return Path(results) / study / "runs" / method / variant / f"seed{int(seed)}" / "metrics.parquet"


class Correctness:
    """Per-image test correctness of runs, read from their ``metrics.parquet`` (``correct``: one byte per image,
    after the domain's projection and the calibration), one run's test rows at a time, only the points asked for."""

    KEY = ("eval_domain", "alpha", "interpolation", "calibration")

    def __init__(self, paths: Mapping[tuple[str, str, str, int], str | Path]) -> None:
        self.paths = {(s, m, v, int(seed)): Path(p) for (s, m, v, seed), p in paths.items()}

    def points(self, run: tuple[str, str, str, int], points: Iterable[tuple[str, float, str, str]]
               ) -> dict[tuple[str, float, str, str], np.ndarray]:
        """``{(eval_domain, alpha, interpolation, calibration): bool[images]}`` of one run's test split."""
        import pyarrow.parquet as pq

        from robustft.io.tables import CorruptArtifactError

        run = (run[0], run[1], run[2], int(run[3]))
        if run not in self.paths:
            raise KeyError(f"no metrics file for run {run[1]}/{run[2]}/seed{run[3]} of study {run[0]}")
        path = self.paths[run]
        wanted = {(d, float(a), i, c) for d, a, i, c in points}
        try:
            table = pq.read_table(path, columns=[*self.KEY, "split", "correct"], filters=[("split", "==", "test")])
        except Exception as exc:  # noqa: BLE001 - one line naming the file
            raise CorruptArtifactError(f"{path}: cannot read per-image correctness ({exc})") from None
        frame = table.to_pandas()
        out = {}
        for row in frame.itertuples(index=False):
            key = (row.eval_domain, float(row.alpha), row.interpolation, row.calibration)
            if key in wanted:
                out[key] = np.frombuffer(row.correct, dtype=np.uint8).astype(bool)
        missing = wanted - set(out)
        if missing:
            raise CorruptArtifactError(f"{path}: no test correctness for {sorted(missing)[0]}; rerun its calibrate job")
        return out


# ------------------------------------------------------------------------------------- the study's selected points
#: Columns of ``results/analysis/paired_tests.parquet`` (documented in the README).
PAIRED_COLUMNS = (
    "study", "method", "protocol", "variant", "alpha", "n_seeds", "against", "against_variant", "against_alpha",
    "eval_domain", "n", "accuracy", "against_accuracy", "difference", "diff_ci_low", "diff_ci_high", "n_better",
    "n_worse", "p_value", "p_holm", "distinguishable", "correction", "level",
)


def _joined(values: Iterable) -> str:
    return "/".join(str(v) for v in sorted(set(values), key=lambda v: (v != "default", str(v))))


def _alphas(values: Iterable[float]) -> str:
    return "/".join(f"{v:g}" for v in sorted(set(values)))


def selected_points(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (study, method, protocol, seed): the variant and alpha chosen on ID validation (linear, uncalibrated)."""
    rows = summary[summary["selected_alpha"].astype(bool) & summary["selected_variant"].astype(bool)
                   & (summary["interpolation"] == "linear") & (summary["calibration"] == "none")]
    return rows.drop_duplicates(["study", "method", "protocol", "seed"])[
        ["study", "method", "protocol", "seed", "variant", "alpha"]].reset_index(drop=True)


def paired_tests_table(summary: pd.DataFrame, correctness: Correctness, n_boot: int, ci_level: float) -> pd.DataFrame:
    """Each method's selected point (per seed: the variant and alpha chosen on ID validation) against the reference
    model (alpha = 0 of the same runs) and against full fine-tuning (``full_ft`` at alpha = 1, its chosen variant, the
    same protocol), on the ID test split, each OOD domain and the OOD average. Holm's correction over every test of
    a study; ``distinguishable`` where the adjusted p is below 1 - ``ci_level``."""
    level = round(1 - ci_level, 12)
    picks = selected_points(summary)
    out = []
    for study, rows in summary.groupby("study", sort=False):
        id_domain = str(rows["train_domain"].iloc[0])
        ood = [d for d in pd.unique(rows.loc[rows["is_ood"] & (rows["split"] == "test"), "eval_domain"])
               if d != OOD_AVERAGE]
        domains = [id_domain, *ood]
        mine = picks[picks["study"] == study]
        swept = set(rows["alpha"].astype(float))  # a sweep without alpha 0 (1) has no reference (fine-tuned) point
        fulls = mine[mine["method"] == FULL_FT_METHOD] if 1.0 in swept else mine.iloc[:0]
        study_rows = []
        for (method, protocol), points in mine.groupby(["method", "protocol"], sort=False):
            if method == REFERENCE_METHOD:
                continue
            sides = {"selected": [], "reference": []}
            reference = [0.0] if 0.0 in swept else []
            for p in points.itertuples(index=False):
                got = correctness.points((study, method, p.variant, p.seed),
                                         [(d, a, "linear", "none") for d in domains for a in {p.alpha, *reference}])
                sides["selected"].append({d: got[(d, float(p.alpha), "linear", "none")] for d in domains})
                if reference:
                    sides["reference"].append({d: got[(d, 0.0, "linear", "none")] for d in domains})
            against = {"reference": (sides["reference"], points["variant"], [0.0])} if reference else {}
            full = fulls[fulls["protocol"] == protocol]
            if len(full):
                sides_ft = []
                for p in full.itertuples(index=False):
                    got = correctness.points((study, FULL_FT_METHOD, p.variant, p.seed),
                                             [(d, 1.0, "linear", "none") for d in domains])
                    sides_ft.append({d: got[(d, 1.0, "linear", "none")] for d in domains})
                against["full_ft"] = (sides_ft, full["variant"], [1.0])
            for name, (other, other_variants, other_alphas) in against.items():
                for domain in [*domains, OOD_AVERAGE]:
                    group = ood if domain == OOD_AVERAGE else [domain]
                    if not group:
                        continue
                    first = [np.stack([s[d] for s in sides["selected"]]) for d in group]
                    second = [np.stack([s[d] for s in other]) for d in group]
                    result = compare(first, second, n_boot, ci_level)
                    study_rows.append({
                        "study": study, "method": method, "protocol": protocol,
                        "variant": _joined(points["variant"]), "alpha": _alphas(points["alpha"]),
                        "n_seeds": int(len(points)), "against": name, "against_variant": _joined(other_variants),
                        "against_alpha": _alphas(other_alphas), "eval_domain": domain, **result})
        if study_rows:
            frame = pd.DataFrame(study_rows)
            frame["p_holm"] = holm(frame["p_value"])
            out.append(frame)
    if not out:
        return pd.DataFrame(columns=list(PAIRED_COLUMNS))
    table = pd.concat(out, ignore_index=True)
    table["distinguishable"] = table["p_holm"] < level
    table["correction"], table["level"] = CORRECTION, level
    return table[list(PAIRED_COLUMNS)]


def run_paths(metrics: Sequence[str], run_studies: Sequence[str]) -> dict[tuple[str, str, str, int], str]:
    """(study, method, variant, seed) -> metrics file, the run read from each file's metadata."""
    from robustft.io.tables import read_table_metadata

    if len(metrics) != len(run_studies):
        raise ValueError(f"paired tests: {len(metrics)} metrics files and {len(run_studies)} run studies; one each")
    import pyarrow.parquet as pq

    out = {}
    for path, study in zip(metrics, run_studies):
        run = read_table_metadata(path).get("run")
        if not run:  # the rows carry it too
            first = pq.ParquetFile(path).read_row_group(0, columns=["method", "variant", "seed"]).slice(0, 1)
            if not first.num_rows:
                raise ValueError(f"{path}: no run identity (metadata key 'run' or rows); rerun its calibrate job")
            run = first.to_pylist()[0]
        out[(study, run["method"], run["variant"], int(run["seed"]))] = path
    return out


def paired_tests_stage(*, summary: str, metrics: Sequence[str], run_studies: Sequence[str], bootstrap: int,
                       ci_level: float, out: str) -> None:
    """Rule paired_tests: ``results/analysis/paired_tests.parquet``."""
    from robustft.io.tables import read_table, write_table

    frame = read_table(summary, ("study", "method", "variant", "seed", "protocol", "eval_domain", "split", "alpha",
                                 "interpolation", "calibration", "selected_alpha", "selected_variant", "is_ood"))
    table = paired_tests_table(frame, Correctness(run_paths(metrics, run_studies)), bootstrap, ci_level)
    shown = table[table["eval_domain"] == OOD_AVERAGE]
    for row in shown.itertuples(index=False):
        log.info("%s %s (%s) vs %s, OOD average: %+.4f [%.4f, %.4f], p %.3g, Holm %.3g", row.study, row.method,
                 row.protocol, row.against, row.difference, row.diff_ci_low, row.diff_ci_high, row.p_value, row.p_holm)
    write_table(out, table, {"columns": list(PAIRED_COLUMNS), "correction": CORRECTION, "ci_level": ci_level,
                             "bootstrap": bootstrap, "family": "every test of one study"})


def leaderboard_marks(paired: pd.DataFrame, study: str, method: str, protocol: str) -> str:
    """The OOD-average differences of a method's selected point against the reference and full fine-tuning, in
    points, "≈" before one not distinguishable after Holm's correction (e.g. ``+4.1 / ≈ +0.3``)."""
    rows = paired[(paired["study"] == study) & (paired["method"] == method) & (paired["protocol"] == protocol)
                  & (paired["eval_domain"] == OOD_AVERAGE)].set_index("against")
    parts = []
    for against in ("reference", "full_ft"):
        if against not in rows.index:
            parts.append("–")
            continue
        row = rows.loc[against]
        parts.append(("" if bool(row["distinguishable"]) else "≈ ") + f"{100 * row['difference']:+.1f}")
    return " / ".join(parts)


__all__ = ["CORRECTION", "PAIRED_COLUMNS", "Correctness", "compare", "holm", "leaderboard_marks", "mcnemar_exact",
           "metrics_path", "paired_bootstrap_ci", "paired_tests_stage", "paired_tests_table", "run_paths",
           "selected_points", "sign_test"]
