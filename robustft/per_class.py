"""Per-class damage: how each run's test accuracy on every class changed against the reference model (alpha = 0), per
domain, at alpha = 1 (the fine-tuned model) and at the alpha chosen on ID validation; read from the sweep logits.

A fine-tuned model can gain on average and still lose a few classes outright; the report draws these deltas as a
heatmap and names the classes each method damaged most. Logits are taken without calibration (the raw model) and
with linear interpolation; projected domains (ImageNet-R/-A class subsets, ObjectNet's groups) are scored in their
own class space, as the metrics are.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger("robustft")

#: Columns of ``results/<dataset>/<backbone>/per_class.parquet`` (documented in the README).
PER_CLASS_COLUMNS = (
    "study", "method", "variant", "seed", "eval_domain", "split", "class_index", "class_name", "n", "point", "alpha",
    "reference_accuracy", "accuracy", "delta",
)
#: The points compared with the reference: the fine-tuned model (alpha = 1) and the alpha chosen on ID validation.
POINTS = ("fine-tuned", "chosen")


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(examples, accuracy) per class; accuracy is NaN for a class without examples."""
    labels = np.asarray(labels, dtype=np.int64)
    n = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels, weights=(np.asarray(predictions) == labels).astype(np.float64),
                          minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n, np.where(n > 0, correct / np.maximum(n, 1), np.nan)


def class_deltas(reference: np.ndarray, predictions: Mapping[str, tuple[float, np.ndarray]], labels: np.ndarray,
                 class_names: Sequence[str]) -> pd.DataFrame:
    """One row per (point, class): ``n``, ``reference_accuracy``, ``accuracy`` and ``delta`` = accuracy - reference
    accuracy, for the reference's predictions and each point's (``predictions[point] = (alpha, predictions)``)."""
    k = len(class_names)
    n, ref_acc = per_class_accuracy(reference, labels, k)
    frames = []
    for point, (alpha, pred) in predictions.items():
        _, acc = per_class_accuracy(pred, labels, k)
        frames.append(pd.DataFrame({"class_index": np.arange(k), "class_name": list(class_names), "n": n,
                                    "point": point, "alpha": float(alpha), "reference_accuracy": ref_acc,
                                    "accuracy": acc, "delta": acc - ref_acc}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PER_CLASS_COLUMNS)


def eval_class_names(projection, class_names: Sequence[str]) -> list[str]:
    """The names of a domain's evaluation classes: the model's classes, a subset of them, or groups (``a/b``)."""
    if projection.class_subset is not None:
        return [class_names[i] for i in projection.class_subset]
    if projection.groups is not None:
        return ["/".join(class_names[i] for i in group) for group in projection.groups]
    return list(class_names)


def chosen_alphas(summary: pd.DataFrame) -> dict[tuple[str, str, int], float]:
    """(method, variant, seed) -> the alpha chosen on ID validation (linear interpolation, no calibration)."""
    rows = summary[summary["selected_alpha"] & (summary["interpolation"] == "linear")
                   & (summary["calibration"] == "none") & (summary["eval_domain"] == summary["train_domain"])
                   & (summary["split"] == "val")]
    return {(r.method, r.variant, int(r.seed)): float(r.alpha) for r in rows.itertuples()}


def _alpha_index(alphas: Sequence[float], alpha: float) -> int | None:
    hits = [i for i, a in enumerate(alphas) if abs(a - alpha) < 1e-9]
    return hits[0] if hits else None


def per_class_stage(*, manifest: str, summary: str, sweep_logits: Sequence[str], runs: Sequence[str], out: str
                    ) -> None:
    """The per-class table of one study: every run's (and soup's) test splits, at alpha = 1 and its chosen alpha,
    against alpha = 0 of the same sweep (the reference model). Reads one split's logits at a time."""
    from robustft.data.registry import get_adapter
    from robustft.io.logits import open_sweep_logits
    from robustft.io.tables import read_table, write_table
    from robustft.pipeline.stages import read_manifest

    if len(sweep_logits) != len(runs):
        raise ValueError(f"per_class: {len(sweep_logits)} sweep files and {len(runs)} run records; one each expected")
    _, meta = read_manifest(manifest)
    class_names = meta["class_names"]
    adapter = get_adapter(meta["dataset"])
    table = read_table(summary, ("study", "method", "variant", "seed", "alpha", "selected_alpha"))
    study = str(table["study"].iloc[0]) if len(table) else ""
    chosen = chosen_alphas(table)
    frames = []
    for path, run_json in zip(sweep_logits, runs):
        run = json.loads(Path(run_json).read_text())
        identity = (run["method"], run["variant"], int(run["seed"]))
        with open_sweep_logits(path) as sweep:
            ref_i = _alpha_index(sweep.alphas, 0.0)
            if ref_i is None or "linear" not in sweep.interpolations:
                log.warning("%s: no alpha = 0 (the reference) in the sweep; no per-class rows for %s", path, identity)
                continue
            points = {"fine-tuned": 1.0, "chosen": chosen.get(identity)}
            indices = {p: _alpha_index(sweep.alphas, a) for p, a in points.items() if a is not None}
            for split in sweep.eval_splits():
                if split.split != "test":
                    continue
                projection = adapter.projection(split.domain)

                def predict(index: int) -> np.ndarray:
                    return projection.apply(sweep.logits(split.name, "linear", index)).argmax(1)

                preds = {p: (sweep.alphas[i], predict(i)) for p, i in indices.items() if i is not None}
                frame = class_deltas(predict(ref_i), preds, split.labels, eval_class_names(projection, class_names))
                frames.append(frame.assign(study=study, method=identity[0], variant=identity[1], seed=identity[2],
                                           eval_domain=split.domain, split=split.split))
    result = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PER_CLASS_COLUMNS))
    result = result[list(PER_CLASS_COLUMNS)]
    write_table(out, result, {"columns": list(PER_CLASS_COLUMNS)})


def most_damaged(table: pd.DataFrame, point: str = "chosen", k: int = 1) -> pd.DataFrame:
    """Per (study, method, variant, domain): the ``k`` classes whose accuracy fell most at ``point`` (seed mean of
    the deltas; ties: class order), with their reference and new accuracy. Only classes that lost accuracy."""
    rows = table[(table["point"] == point) & table["delta"].notna()]
    keys = ["study", "method", "variant", "eval_domain"]
    mean = (rows.groupby([*keys, "class_index", "class_name"], as_index=False, sort=False)
            .agg(reference_accuracy=("reference_accuracy", "mean"), accuracy=("accuracy", "mean"),
                 delta=("delta", "mean"), n=("n", "first"), alpha=("alpha", "mean")))
    mean = mean[mean["delta"] < 0].sort_values([*keys, "delta", "class_index"], kind="stable")
    return mean.groupby(keys, sort=False).head(k).reset_index(drop=True)
