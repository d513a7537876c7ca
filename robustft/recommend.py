"""A recommendation under an ID floor: among every (method, variant, alpha, calibration) point of a study whose
ID-validation accuracy clears the floor, the ones with the best OOD-average test accuracy, with bootstrap intervals,
and which of them are statistically tied with the best (paired tests, Holm's correction: robustft.significance).

The floor is checked on ID validation only (``seen_accuracy`` of the ID val split, the selection criterion of the
summary); OOD accuracy is test accuracy, so the ranking describes the study and is not itself a model selection.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np
import pandas as pd

from robustft.significance import CORRECTION, Correctness, compare, holm, paired_bootstrap_ci

OOD_AVERAGE = "ood_average"
REFERENCE_METHOD = "zeroshot"
_FLOOR = re.compile(r"^\s*best\s*-\s*(?P<d>\d+(\.\d+)?)\s*$")
#: Columns of ``results/analysis/recommendation.parquet`` (documented in the README).
RECOMMEND_COLUMNS = (
    "study", "rank", "method", "variant", "protocol", "interpolation", "calibration", "alpha", "n_seeds",
    "id_val_accuracy", "id_floor", "floor", "id_test_accuracy", "ood_accuracy", "ood_ci_low", "ood_ci_high",
    "difference_to_best", "diff_ci_low", "diff_ci_high", "p_value", "p_holm", "best", "tied_with_best",
    "correction", "level",
)
_POINT = ["study", "method", "variant", "protocol", "interpolation", "calibration", "alpha"]


@dataclass(frozen=True)
class IdFloor:
    """An ID floor: ``absolute`` accuracy (a fraction), or ``relative``: at most ``value`` below the best (a fraction;
    given in points as ``best-<d>``)."""

    kind: str
    value: float
    text: str

    def threshold(self, best: float) -> float:
        return self.value if self.kind == "absolute" else best - self.value


def parse_id_floor(text: str | float) -> IdFloor:
    """``0.9`` (an accuracy, a fraction in [0, 1]) or ``best-2`` (at most 2 accuracy points below the best ID)."""
    raw = str(text).strip()
    match = _FLOOR.match(raw)
    if match:
        return IdFloor("relative", float(match["d"]) / 100, raw)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"id floor {raw!r}: expected an accuracy in [0, 1] (e.g. 0.9) or best-<points> "
                         "(e.g. best-2)") from None
    if not 0 <= value <= 1:
        raise ValueError(f"id floor {raw!r}: an absolute floor is an accuracy in [0, 1] (e.g. 0.9 for 90 %)")
    return IdFloor("absolute", value, raw)


def candidates(summary: pd.DataFrame) -> pd.DataFrame:
    """Every point of every study, seeds averaged: ``id_val_accuracy`` (ID val, classes fine-tuned on),
    ``id_test_accuracy`` and ``ood_accuracy`` (OOD average, test). A run's alpha = 0 is the reference model, so only
    the reference method keeps it (once)."""
    rows = summary[(summary["alpha"] > 0) != (summary["method"] == REFERENCE_METHOD)]
    ident = rows["eval_domain"] == rows["train_domain"]
    parts = {"id_val_accuracy": rows[ident & (rows["split"] == "val")].assign(value=lambda f: f["seen_accuracy"]),
             "id_test_accuracy": rows[ident & (rows["split"] == "test")].assign(value=lambda f: f["accuracy"]),
             "ood_accuracy": rows[(rows["eval_domain"] == OOD_AVERAGE)].assign(value=lambda f: f["accuracy"])}
    merged = None
    for name, part in parts.items():
        grouped = part.groupby(_POINT, sort=False).agg(**{name: ("value", "mean")},
                                                       **({"n_seeds": ("seed", "nunique"),
                                                           "seeds": ("seed", lambda s: sorted(set(s)))}
                                                          if name == "ood_accuracy" else {}))
        merged = grouped if merged is None else merged.join(grouped, how="inner")
    return (merged if merged is not None else pd.DataFrame()).reset_index()


def rank_under_floor(points: pd.DataFrame, floor: IdFloor) -> pd.DataFrame:
    """Per study, the points whose ID-validation accuracy clears the floor, best OOD first (ties: better ID val,
    then smaller alpha); ``id_floor`` holds the threshold, ``rank`` starts at 1."""
    out = []
    for _, rows in points.groupby("study", sort=False):
        threshold = floor.threshold(float(rows["id_val_accuracy"].max()))
        kept = rows[rows["id_val_accuracy"] >= threshold - 1e-12]
        kept = kept.sort_values(["ood_accuracy", "id_val_accuracy", "alpha"], ascending=[False, False, True],
                                kind="stable")
        out.append(kept.assign(id_floor=threshold, rank=np.arange(1, len(kept) + 1)))
    return pd.concat(out, ignore_index=True) if out else points.assign(id_floor=np.nan, rank=0)


def recommendation_table(summary: pd.DataFrame, correctness: Correctness, floor: IdFloor, n_boot: int,
                         ci_level: float) -> pd.DataFrame:
    """The points clearing ``floor`` (:func:`rank_under_floor`), each with its OOD-average interval (resampling each
    OOD domain's images) and a paired comparison with the best point; ``tied_with_best`` where Holm's adjusted p
    (over the comparisons with the best within a study) is not below 1 - ``ci_level``."""
    level = round(1 - ci_level, 12)
    ranked = rank_under_floor(candidates(summary), floor)
    frames = []
    for study, rows in ranked.groupby("study", sort=False):
        ood = [d for d in pd.unique(summary.loc[(summary["study"] == study) & summary["is_ood"]
                                                & (summary["split"] == "test"), "eval_domain"]) if d != OOD_AVERAGE]
        scores = _point_scores(rows, ood, correctness)
        best = scores[0]
        stats = []
        for i, score in enumerate(scores):
            low, high = paired_bootstrap_ci(score, n_boot, ci_level) if n_boot else (np.nan, np.nan)
            entry = {"ood_ci_low": low, "ood_ci_high": high}
            if i == 0:
                entry.update(difference_to_best=0.0, diff_ci_low=0.0, diff_ci_high=0.0, p_value=np.nan)
            else:
                result = compare(score, best, n_boot, ci_level)
                entry.update(difference_to_best=result["difference"], diff_ci_low=result["diff_ci_low"],
                             diff_ci_high=result["diff_ci_high"], p_value=result["p_value"])
            stats.append(entry)
        frame = pd.concat([rows.reset_index(drop=True), pd.DataFrame(stats)], axis=1)
        frame["p_holm"] = holm(frame["p_value"])
        frame["best"] = frame["rank"] == 1
        frame["tied_with_best"] = ~frame["best"] & (frame["p_holm"] >= level)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=list(RECOMMEND_COLUMNS))
    table = pd.concat(frames, ignore_index=True)
    table["floor"], table["correction"], table["level"] = floor.text, CORRECTION, level
    return table[list(RECOMMEND_COLUMNS)]


def _point_scores(rows: pd.DataFrame, ood: Sequence[str], correctness: Correctness) -> list[list[np.ndarray]]:
    """Per point (in ``rows`` order), per OOD domain: each image's correctness averaged over the point's seeds. Each
    run's metrics file is read once, for the points of that run."""
    wanted: dict[tuple, list[tuple]] = {}
    for row in rows.itertuples(index=False):
        for seed in row.seeds:
            run = (row.study, row.method, row.variant, int(seed))
            wanted.setdefault(run, []).extend((d, float(row.alpha), row.interpolation, row.calibration) for d in ood)
    per_run = {run: correctness.points(run, keys) for run, keys in wanted.items()}
    scores = []
    for row in rows.itertuples(index=False):
        runs = [(row.study, row.method, row.variant, int(seed)) for seed in row.seeds]
        scores.append([np.mean([per_run[r][(d, float(row.alpha), row.interpolation, row.calibration)] for r in runs],
                               axis=0) for d in ood])
    return scores


def recommendation_stage(*, summary: str, metrics: Sequence[str], run_studies: Sequence[str], id_floor: str | float,
                         bootstrap: int, ci_level: float, out: str) -> None:
    """Rule recommendation: ``results/analysis/recommendation.parquet`` for the configured floor."""
    from robustft.io.tables import read_table, write_table
    from robustft.significance import run_paths

    floor = parse_id_floor(id_floor)
    frame = read_table(summary, _SUMMARY_NEEDS)
    table = recommendation_table(frame, Correctness(run_paths(metrics, run_studies)), floor, bootstrap, ci_level)
    print_recommendation(table)
    write_table(out, table, {"columns": list(RECOMMEND_COLUMNS), "id_floor": floor.text, "ci_level": ci_level,
                             "bootstrap": bootstrap, "correction": CORRECTION})


_SUMMARY_NEEDS = ("study", "method", "variant", "seed", "protocol", "eval_domain", "split", "alpha", "interpolation",
                  "calibration", "accuracy", "seen_accuracy", "is_ood", "train_domain")


def recommend_from_results(results: str | Path, id_floor: str | float, bootstrap: int = 1000, ci_level: float = 0.95,
                           study: str | None = None) -> pd.DataFrame:
    """The recommendation from a finished ``results/`` folder: its ``summary.parquet`` and each run's
    ``metrics.parquet`` (found from the summary's study, method, variant and seed)."""
    from robustft.io.tables import read_table
    from robustft.significance import metrics_path

    results = Path(results)
    path = results / "summary.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary; run the pipeline first (or pass --results <folder>)")
    summary = read_table(path, _SUMMARY_NEEDS)
    if study is not None:
        if study not in set(summary["study"]):
            raise ValueError(f"study {study!r} is not in {path} (studies: {sorted(set(summary['study']))})")
        summary = summary[summary["study"] == study]
    runs = summary[["study", "method", "variant", "seed"]].drop_duplicates()
    paths = {(r.study, r.method, r.variant, int(r.seed)): metrics_path(results, r.study, r.method, r.variant, r.seed)
             for r in runs.itertuples(index=False)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: missing ({len(missing)} metrics files missing); rerun the pipeline")
    return recommendation_table(summary, Correctness(paths), parse_id_floor(id_floor), bootstrap, ci_level)


def recommendation_display(table: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """For reading: the best point, every point tied with it, then the next ones up to ``top`` rows per study;
    accuracies in %."""
    shown = []
    for _, rows in table.groupby("study", sort=False):
        keep = rows["best"] | rows["tied_with_best"]
        if top is not None:
            keep |= rows["rank"] <= top
        shown.append(rows[keep])
    if not shown:
        return pd.DataFrame()
    rows = pd.concat(shown)

    def pct(v):
        return "–" if pd.isna(v) else f"{100 * v:.1f}"

    return pd.DataFrame({
        "study": rows["study"], "rank": rows["rank"], "method": rows["method"], "variant": rows["variant"],
        "α": [f"{a:g}" for a in rows["alpha"]], "calibration": rows["calibration"],
        "interp.": rows["interpolation"], "seeds": rows["n_seeds"],
        "ID val": [pct(v) for v in rows["id_val_accuracy"]], "ID test": [pct(v) for v in rows["id_test_accuracy"]],
        "OOD avg [CI]": [f"{pct(v)} [{pct(lo)}, {pct(hi)}]" for v, lo, hi in
                         zip(rows["ood_accuracy"], rows["ood_ci_low"], rows["ood_ci_high"])],
        "vs best [CI]": ["best" if b else f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" for b, d, lo, hi in
                         zip(rows["best"], rows["difference_to_best"], rows["diff_ci_low"], rows["diff_ci_high"])],
        "Holm p": ["–" if pd.isna(p) else f"{p:.3g}" for p in rows["p_holm"]],
        "tied": ["best" if b else ("tied" if t else "") for b, t in zip(rows["best"], rows["tied_with_best"])],
    }).reset_index(drop=True)


def print_recommendation(table: pd.DataFrame, top: int = 10, file: TextIO | None = None) -> None:
    """The recommendation as a plain-text table: per study, its ID floor, then :func:`recommendation_display`."""
    file = file or sys.stdout
    if table.empty:
        print("no point clears the ID floor", file=file, flush=True)
        return
    for study, rows in table.groupby("study", sort=False):
        first = rows.iloc[0]
        print(f"\n== {study}: ID floor {first['floor']} -> ID val >= {100 * first['id_floor']:.1f} % "
              f"({len(rows)} points clear it; tied = not distinguishable from the best at level {first['level']:g}, "
              f"{first['correction']} correction)", file=file)
        shown = recommendation_display(rows, top).drop(columns="study")
        print(shown.to_string(index=False), file=file, flush=True)
