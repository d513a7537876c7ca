"""Analysis stages: the per-run WiSE-FT sweep, calibration with metrics, PCV fold logits, and the summary table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from robustft.backbones import build_backbone
from robustft.calibration import (
    absent_class_mask,
    apply_logit_offset,
    ausuc,
    average_logit_gap,
    projected_absent_mask,
    pseudo_cv_gamma,
    seen_absent_curve,
)
from robustft.data.adapters import EvalProjection
from robustft.data.registry import get_adapter
from robustft.devices import resolve_device
from robustft.evaluation import CachedColumn, EvalSplit, build_classifier, encoder_unchanged, sweep_logits
from robustft.io.logits import (
    EVAL_ROLE,
    GAMMA_SOURCE_ROLE,
    LogitSplit,
    fold_logits_writer,
    open_fold_logits,
    open_sweep_logits,
    read_sweep_logits,  # noqa: F401 (re-exported: tests read whole sweep files through robustft.pipeline.analysis)
    sweep_logits_writer,
)
from robustft.io.progress import ProgressLog
from robustft.io.tables import read_table, write_table
from robustft.metrics import bootstrap_ci, group_accuracies
from robustft.pipeline.stages import expected_feature_attrs, read_manifest
from robustft.soups import is_soup, load_soup_state
from robustft.training.checkpoint import load_safetensors

log = logging.getLogger("robustft")

#: Columns of ``results/summary.parquet`` (documented in the README; checked by tests).
SUMMARY_COLUMNS = (
    "study", "method", "variant", "seed", "backbone", "dataset", "protocol", "train_domain", "eval_domain", "split",
    "is_ood", "alpha", "interpolation", "selected_alpha", "selected_variant", "oracle_variant", "calibration",
    "gamma", "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "seen_accuracy", "absent_accuracy", "n_seen",
    "n_absent", "ausuc", "accuracy_seed_mean", "accuracy_seed_std", "n_seeds", "selected_seed_mean",
    "selected_seed_std", "trainable_params", "total_params", "checkpoint_bytes", "train_seconds",
)
#: The keys of one entry of ``summary_stage``'s ``studies`` (what the study of one metrics file is).
STUDY_KEYS = ("study", "dataset", "backbone", "id_domain", "ood_domains")
#: ID training images the sweep evaluates, as a seeded sample, when gamma is chosen on training data
#: (``calibration.gamma_source: train``). ALG is a difference of two means over examples: 10,000 examples put its
#: sampling error far below the spread of gaps, while the file stays ~A x 40 kB per class.
GAMMA_TRAIN_EXAMPLES = 10_000
#: Images per backward pass when the Fisher-weighted merge computes its Fishers (one example at a time inside).
FISHER_READ_BATCH = 32

def reference_state(model: torch.nn.Module, head_path: str | Path) -> dict[str, torch.Tensor]:
    """The reference model's full state dict: pre-trained encoder plus the reference head."""
    head = load_safetensors(Path(head_path))
    model.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_model(manifest: str, backbone_spec: dict, reference_head: str, device: str):
    """(manifest metadata, backbone, device, classifier, reference state dict) for a stage that evaluates models."""
    _, meta = read_manifest(manifest)
    backbone = build_backbone(backbone_spec)
    dev = resolve_device(device)
    model = build_classifier(backbone, len(meta["class_names"]))
    return meta, backbone, dev, model, reference_state(model, reference_head)


def sample_rows(n_rows: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random sample of ``min(n, n_rows)`` rows drawn over the whole split (without
    replacement): caches are sorted by class, so the first rows would show few classes."""
    if n < 0 or n_rows < 0:
        raise ValueError(f"sample sizes must be non-negative, got n={n} of {n_rows} rows")
    if n >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=n, replace=False)).astype(np.int64)


def _checked_split(name: str, domain: str, split: str, pixels: str | None, features: str, expected: dict,
                   rows: np.ndarray | None = None, pixels_needed: bool = True) -> EvalSplit:
    """An :class:`EvalSplit` streaming from its caches, after checking that both list the same images."""
    feats = CachedColumn(features, "features", rows, expected)
    ids = CachedColumn(features, "row_ids", rows, expected).read()
    pix = None
    if pixels_needed:
        if pixels is None:
            raise ValueError(f"split {name}: no pixel cache to evaluate a changed encoder on")
        pix = CachedColumn(pixels, "pixels", rows)
        if not np.array_equal(CachedColumn(pixels, "row_ids", rows).read(), ids):
            raise RuntimeError(f"{pixels} and {features} list different images; rerun the features rule")
    labels = CachedColumn(features, "labels", rows, expected).read()
    return EvalSplit(name, domain, split, labels, pix, feats)


def _cache_domain_split(path: str) -> tuple[str, str]:
    from robustft.io.arrays import open_arrays, read_attrs

    with open_arrays(path, ()) as handle:
        attrs = read_attrs(handle)
    if "domain" not in attrs or "split" not in attrs:
        raise RuntimeError(f"{path}: a cache without domain and split attributes")
    return str(attrs["domain"]), str(attrs["split"])


def sweep_stage(
    *,
    manifest: str,
    backbone_spec: dict,
    run_json: str,
    reference_head: str,
    eval_pixels: Mapping[str, str],
    eval_features: Mapping[str, str],
    alphas: Sequence[float],
    batch_size: int,
    device: str,
    out_logits: str,
    train_pixels: str | None = None,
    train_features: str | None = None,
    fisher_examples: int = 0,
    gamma_train_examples: int = GAMMA_TRAIN_EXAMPLES,
) -> None:
    """Evaluate every alpha of the run's WiSE-FT path on every eval split; write all logits to one HDF5 file.

    Every split streams from its caches, one batch in memory. ``train_pixels`` with ``fisher_examples`` > 0 adds
    the Fisher-weighted merge, its Fishers computed on a seeded random sample of the ID training split.
    ``train_features`` (given when gamma is chosen on training data) adds a seeded sample of
    ``gamma_train_examples`` ID training images, stored with role ``gamma_source`` (used for gamma, never scored).
    """
    from robustft.training.run import load_run_state

    _, meta = read_manifest(manifest)
    num_classes = len(meta["class_names"])
    backbone = build_backbone(backbone_spec)
    dev = resolve_device(device)
    model = build_classifier(backbone, num_classes)
    ref = reference_state(model, reference_head)
    run_dir = Path(run_json).parent
    run = json.loads(Path(run_json).read_text())
    finetuned = load_soup_state(run_dir, ref) if is_soup(run) else load_run_state(run_dir, ref)
    head_only = encoder_unchanged(ref, finetuned)
    expected = expected_feature_attrs(meta, backbone)
    splits, roles = [], {}
    for name in eval_pixels:
        domain, split = name.rsplit("_", 1)
        splits.append(_checked_split(name, domain, split, eval_pixels[name], eval_features[name], expected,
                                     pixels_needed=not head_only))
        roles[name] = EVAL_ROLE
    if train_features is not None and gamma_train_examples > 0:
        domain, split = _cache_domain_split(train_features)
        rows = sample_rows(len(CachedColumn(train_features, "labels", None, expected)), gamma_train_examples,
                           int(run["seed"]))
        name = f"{domain}_{split}"
        splits.append(_checked_split(name, domain, split, train_pixels, train_features, expected, rows,
                                     pixels_needed=not head_only))
        roles[name] = GAMMA_SOURCE_ROLE
    variants: list[tuple[str, Any]] = [("linear", None)]
    if train_pixels and fisher_examples and not head_only:
        sample = fisher_sample(train_pixels, fisher_examples, int(run["seed"]))
        variants.append(("fisher", fisher_pair(model, ref, finetuned, sample, backbone.preprocessing, dev)))
    alphas = [float(a) for a in alphas]
    images = sum(len(s.labels) for s in splits)
    layout = [LogitSplit(s.name, s.domain, s.split, s.labels, roles[s.name]) for s in splits]
    what = f"sweep {run['method']}/{run['variant']}/seed{run['seed']}"
    with sweep_logits_writer(out_logits, alphas=alphas, interpolations=[v[0] for v in variants], splits=layout,
                             num_classes=num_classes, head_only=head_only) as out, \
            ProgressLog(what, images * len(alphas) * len(variants), "images") as progress:
        for interp, fisher in variants:
            correct: dict[tuple[float, str], int] = {}
            batches = sweep_logits(model, ref, finetuned, alphas, splits, backbone.preprocessing, dev, batch_size,
                                   fisher=fisher)
            for alpha, split, start, logits in batches:
                out.write(split.name, interp, alpha, start, logits)
                labels = split.labels[start : start + logits.shape[0]]
                key = (alpha, split.name)
                correct[key] = correct.get(key, 0) + int((logits.argmax(1) == labels).sum())
                progress.update(logits.shape[0], interpolation=interp, alpha=alpha)
                if start + logits.shape[0] == len(split.labels):
                    log.info("%s alpha=%.2f %s: accuracy %.4f", interp, alpha, split.name,
                             correct[key] / max(1, len(split.labels)))


def fisher_sample(train_pixels: str, n: int, seed: int) -> CachedColumn:
    """The Fisher-weighted merge's examples: a seeded random sample of ``n`` rows over the whole ID training split."""
    total = len(CachedColumn(train_pixels, "labels"))
    return CachedColumn(train_pixels, "pixels", sample_rows(total, n, seed))


def fisher_pair(model, ref, finetuned, sample: CachedColumn, preprocessing, device) -> tuple[dict, dict]:
    """Diagonal Fishers of the reference and fine-tuned models on the ``sample`` images (WiSE-FT code), computed on
    ``device``, streaming the sample in batches; the sampled labels come from a CPU generator, so they are the same
    on every device."""
    from robustft.fisher import diagonal_fisher

    def inputs() -> Iterator[torch.Tensor]:
        for batch in sample.batches(FISHER_READ_BATCH):
            yield preprocessing.normalize(batch.to(device))

    model.to(device)
    fishers = []
    for state in (ref, finetuned):
        model.load_state_dict(state)
        params = {k: p for k, p in model.named_parameters()}
        fishers.append(diagonal_fisher(model, inputs(), params=params, generator=torch.Generator().manual_seed(0)))
    model.load_state_dict(ref)
    return fishers[0], fishers[1]


# ------------------------------------------------------------------------------------------------ calibration
def _absent_indices(run: dict[str, Any], class_names: Sequence[str]) -> list[int]:
    absent = run.get("absent_classes") or []
    return [class_names.index(c) for c in absent]


def projection_columns(projection: EvalProjection, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(model columns, evaluation class of each) of a domain's projection: a class subset (ImageNet-R/-A), groups
    whose logit is the max over their members (ObjectNet), or every column as itself."""
    if projection.class_subset is not None:
        columns = np.asarray(projection.class_subset, dtype=np.int64)
        return columns, np.arange(columns.size)
    if projection.groups is not None:
        columns = np.concatenate([np.asarray(g, dtype=np.int64) for g in projection.groups])
        return columns, np.repeat(np.arange(len(projection.groups)), [len(g) for g in projection.groups])
    return np.arange(num_classes), np.arange(num_classes)


def calibrate_stage(
    *,
    manifest: str,
    run_json: str,
    sweep_logits_path: str,
    id_domain: str,
    gamma_source: str,
    bootstrap: int,
    ci_level: float,
    out_metrics: str,
    out_curve: str,
    pcv_fold_logits: Sequence[str] = (),
) -> None:
    """Per alpha and calibration (none, ALG, PCV): metrics with bootstrap CIs on every eval split; the γ curves.

    γ is added to the absent classes' logits in the model's class space, before a domain's projection
    (ImageNet-R/-A's class subset, ObjectNet's max over groups); an evaluation class is absent when all its model
    classes are (:func:`robustft.calibration.projected_absent_mask`).
    """
    _, meta = read_manifest(manifest)
    class_names = meta["class_names"]
    adapter = get_adapter(meta["dataset"])
    run = json.loads(Path(run_json).read_text())
    absent = _absent_indices(run, class_names)
    mask = absent_class_mask(len(class_names), absent)
    rows, curves = [], []
    with open_sweep_logits(sweep_logits_path) as sweep:
        source = _gamma_source(sweep, id_domain, gamma_source) if absent else None
        folds = _open_folds(pcv_fold_logits, sweep.alphas) if absent else []
        try:
            for interp in sweep.interpolations:
                for ai, alpha in enumerate(sweep.alphas):
                    gammas: dict[str, float] = {"none": 0.0}
                    if absent:
                        gammas["alg"] = average_logit_gap(sweep.logits(source.name, interp, ai), source.labels, mask)
                        if folds:
                            gammas["pcv"] = _pcv_gamma(folds, ai, mask)
                    for split in sweep.eval_splits():
                        new_rows, curve = _score_split(sweep.logits(split.name, interp, ai), split, mask, gammas,
                                                       adapter.projection(split.domain), bootstrap, ci_level)
                        for row in new_rows:
                            row.update(alpha=alpha, interpolation=interp)
                        rows += new_rows
                        if curve is not None:
                            curves.append(curve.assign(eval_domain=split.domain, split=split.split, alpha=alpha,
                                                       interpolation=interp))
        finally:
            for fold in folds:
                fold.close()
    frame = pd.DataFrame(rows)
    identity = {"method": run["method"], "variant": run["variant"], "seed": int(run["seed"])}
    frame = frame.assign(**identity)
    curve_frame = pd.concat(curves, ignore_index=True).assign(**identity) if curves else pd.DataFrame(
        columns=["gamma", "seen_accuracy", "absent_accuracy", "accuracy", "ausuc", "eval_domain", "split", "alpha",
                 "interpolation", *identity])
    write_table(out_metrics, frame, {"run": identity, "absent_classes": run.get("absent_classes") or []})
    write_table(out_curve, curve_frame, {"run": identity})


def _gamma_source(sweep, id_domain: str, gamma_source: str) -> LogitSplit:
    """The split gamma is chosen on: the ID validation split, or the ID training sample (never a test split)."""
    name = f"{id_domain}_{gamma_source}"
    if name not in sweep.splits:
        hint = " (the sweep evaluates an ID training sample only when calibration.gamma_source is train)" \
            if gamma_source == "train" else ""
        raise RuntimeError(f"{sweep.path}: no {name} logits to choose gamma on{hint}; rerun its sweep")
    return sweep.splits[name]


def _score_split(model_logits: np.ndarray, split: LogitSplit, mask: np.ndarray, gammas: Mapping[str, float],
                 projection: EvalProjection, bootstrap: int, ci_level: float) -> tuple[list[dict], pd.DataFrame | None]:
    """Metric rows per calibration of one split at one alpha, and its seen-vs-absent curve (None without both
    seen- and absent-class examples)."""
    columns, column_class = projection_columns(projection, mask.size)
    n_eval = int(column_class.max()) + 1
    eval_mask = projected_absent_mask(mask[columns], column_class, n_eval)
    labels = split.labels
    rows = []
    for calibration, gamma in gammas.items():
        calibrated = apply_logit_offset(model_logits, mask, gamma) if gamma else model_logits
        pred = projection.apply(calibrated).argmax(1)
        groups = group_accuracies(pred, labels, eval_mask)
        correct = pred == labels
        low, high = bootstrap_ci(correct, bootstrap, ci_level, seed=0) if bootstrap else (np.nan, np.nan)
        rows.append({"eval_domain": split.domain, "split": split.split, "calibration": calibration,
                     "gamma": float(gamma), "n": int(groups["n"]), "accuracy": float(groups["accuracy"]),
                     "accuracy_ci_low": float(low), "accuracy_ci_high": float(high),
                     "seen_accuracy": float(groups["seen_accuracy"]), "absent_accuracy": float(groups["absent_accuracy"]),
                     "n_seen": int(groups["n_seen"]), "n_absent": int(groups["n_absent"]), "ausuc": np.nan,
                     "correct": correct.astype(np.uint8).tobytes()})
    sub_mask = mask[columns]
    n_absent_examples = int(eval_mask[labels].sum())
    if len(gammas) == 1 or not (sub_mask.any() and not sub_mask.all()) or not 0 < n_absent_examples < len(labels):
        return rows, None
    curve = seen_absent_curve(model_logits[:, columns], labels, sub_mask, column_class=column_class)
    area = ausuc(curve["seen_accuracy"], curve["absent_accuracy"])
    for row in rows:
        row["ausuc"] = area
    return rows, curve.assign(ausuc=area)


def _open_folds(paths: Sequence[str], alphas: Sequence[float]) -> list:
    folds = []
    try:
        for path in paths:
            fold = open_fold_logits(path)
            folds.append(fold)
            if fold.alphas != list(alphas):
                raise RuntimeError(f"{path}: alphas {fold.alphas} differ from the sweep's {list(alphas)}; rerun it")
    except Exception:
        for fold in folds:
            fold.close()
        raise
    return folds


def _pcv_gamma(folds: Sequence, alpha_index: int, absent_mask: np.ndarray) -> float:
    """PCV γ at one alpha from the pseudo-absent fold models' ID-validation logits; each fold's floor is the
    reference model's pseudo-absent accuracy (the file's ``reference`` logits, whatever the alpha grid)."""
    logits, labels, masks, floors = [], [], [], []
    for fold in folds:
        keep = ~absent_mask[fold.labels]  # truly absent classes have no ID training data to validate on
        fold_labels = fold.labels[keep]
        logits.append(fold.logits(alpha_index)[keep])
        labels.append(fold_labels)
        masks.append(fold.pseudo_absent | absent_mask)
        pseudo = fold.pseudo_absent[fold_labels]
        reference = fold.reference()[keep]
        floors.append(float((reference.argmax(1) == fold_labels)[pseudo].mean()) if pseudo.any() else 0.0)
    return pseudo_cv_gamma(logits, labels, masks, floors)


def pcv_logits_stage(
    *, manifest: str, backbone_spec: dict, run_json: str, parent_run_json: str, reference_head: str, val_pixels: str,
    val_features: str, alphas: Sequence[float], batch_size: int, device: str, out: str,
) -> None:
    """A PCV fold model's ID-validation logits at every alpha, the reference model's, and its pseudo-absent mask."""
    from robustft.training.run import load_run_state

    meta, backbone, dev, model, ref = reference_model(manifest, backbone_spec, reference_head, device)
    class_names = meta["class_names"]
    record = json.loads(Path(run_json).read_text())
    finetuned = load_run_state(Path(run_json).parent, ref)
    fold_absent = set(record.get("absent_classes") or [])
    true_absent = set(json.loads(Path(parent_run_json).read_text()).get("absent_classes") or [])
    pseudo = np.array([c in fold_absent and c not in true_absent for c in class_names])
    head_only = encoder_unchanged(ref, finetuned)
    split = _checked_split("val", "", "val", val_pixels, val_features, expected_feature_attrs(meta, backbone),
                           pixels_needed=not head_only)
    alphas = [float(a) for a in alphas]
    what = f"pcv_logits {record['method']}/{record['variant']}/seed{record['seed']}/{Path(run_json).parent.name}"
    with fold_logits_writer(out, alphas=alphas, labels=split.labels, pseudo_absent=pseudo) as writer, \
            ProgressLog(what, len(split.labels) * (len(alphas) + 1), "images") as progress:
        for _, _, start, logits in sweep_logits(model, ref, ref, [0.0], [split], backbone.preprocessing, dev,
                                                batch_size):
            writer.write_reference(start, logits)
            progress.update(logits.shape[0])
        for alpha, _, start, logits in sweep_logits(model, ref, finetuned, alphas, [split], backbone.preprocessing,
                                                    dev, batch_size):
            writer.write(alpha, start, logits)
            progress.update(logits.shape[0], alpha=alpha)


# ---------------------------------------------------------------------------------------------------- summary
def _check_studies(metrics: Sequence[str], runs: Sequence[str], studies: Sequence[Mapping[str, Any]]) -> None:
    if not (len(metrics) == len(runs) == len(studies)):
        raise ValueError(f"summary: {len(metrics)} metrics files, {len(runs)} run records and {len(studies)} studies; "
                         "one study per metrics file expected")
    for i, study in enumerate(studies):
        missing = [k for k in STUDY_KEYS if k not in study]
        if missing:
            raise ValueError(f"summary: studies[{i}] lacks {missing} (keys: {list(STUDY_KEYS)})")
    described: dict[str, Mapping[str, Any]] = {}
    for study in studies:
        fixed = {k: (list(v) if k == "ood_domains" else v) for k, v in study.items() if k in STUDY_KEYS}
        if described.setdefault(study["study"], fixed) != fixed:
            raise ValueError(f"summary: study {study['study']!r} is described two ways: {described[study['study']]} "
                             f"and {fixed}")


def summary_stage(
    *,
    metrics: Sequence[str],
    runs: Sequence[str],
    studies: Sequence[Mapping[str, Any]],
    bootstrap: int,
    ci_level: float,
    out: str,
) -> None:
    """One row per (study, run, eval domain, alpha, calibration) plus the OOD average; alpha and variant chosen on ID
    validation; seeds aggregated. ``studies[i]`` (keys :data:`STUDY_KEYS`) describes the study of ``metrics[i]``;
    every grouping is within a study."""
    _check_studies(metrics, runs, studies)
    frames = []
    for metrics_path, run_json, study in zip(metrics, runs, studies):
        run = json.loads(Path(run_json).read_text())
        frame = read_table(metrics_path, ("eval_domain", "alpha", "calibration", "accuracy", "correct"))
        frame = frame.assign(
            study=study["study"], backbone=study["backbone"], dataset=study["dataset"],
            train_domain=study["id_domain"], protocol=(run.get("protocol") or {}).get("kind", "full"),
            trainable_params=run.get("trainable_parameters"), total_params=run.get("total_parameters"),
            checkpoint_bytes=(run.get("checkpoint") or {}).get("size_bytes"), train_seconds=run.get("wall_time_s"),
        )
        frame = _with_ood_average(frame, study["ood_domains"], bootstrap, ci_level)
        frame["is_ood"] = frame["eval_domain"].isin([*study["ood_domains"], "ood_average"])
        frames.append(frame)
    summary = pd.concat(frames, ignore_index=True)
    cell = ["study", "method", "variant", "seed", "eval_domain", "split", "alpha", "interpolation", "calibration"]
    duplicated = summary[summary.duplicated(cell, keep=False)]
    if len(duplicated):
        first = duplicated.iloc[0]
        raise ValueError(f"summary: two metrics files hold study {first['study']!r}, run {first['method']}/"
                         f"{first['variant']}/seed{first['seed']}")
    summary["selected_alpha"] = _selected_alpha(summary)
    summary["selected_variant"], summary["oracle_variant"] = _variant_choices(summary)
    keys = ["study", "method", "variant", "eval_domain", "split", "alpha", "interpolation", "calibration"]
    grouped = summary.groupby(keys)["accuracy"]
    summary["accuracy_seed_mean"] = grouped.transform("mean")
    summary["accuracy_seed_std"] = grouped.transform(_seed_std)
    summary["n_seeds"] = grouped.transform("size").astype(int)
    summary["selected_seed_mean"], summary["selected_seed_std"] = _selected_seed_spread(summary)
    order = {study: i for i, study in enumerate(pd.unique(summary["study"]))}  # studies in the order given
    summary = summary[list(SUMMARY_COLUMNS)].sort_values(
        ["study", "method", "variant", "seed", "interpolation", "calibration", "alpha", "is_ood", "eval_domain"],
        key=lambda column: column.map(order) if column.name == "study" else column,
    ).reset_index(drop=True)
    write_table(out, summary, {"columns": list(SUMMARY_COLUMNS), "studies": [dict(s) for s in studies]})


def _seed_std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _with_ood_average(frame: pd.DataFrame, ood_domains: Sequence[str], bootstrap: int, ci_level: float) -> pd.DataFrame:
    """Append ``eval_domain='ood_average'`` rows: the mean of OOD test accuracies, its CI by resampling each domain."""
    tests = frame[(frame["split"] == "test") & frame["eval_domain"].isin(ood_domains)]
    extra = []
    for _, group in tests.groupby(["alpha", "interpolation", "calibration"]):
        if set(group["eval_domain"]) != set(ood_domains):
            continue
        corrects = [np.frombuffer(b, dtype=np.uint8).astype(bool) for b in group["correct"]]
        low, high = _mean_of_domains_ci(corrects, bootstrap, ci_level) if bootstrap else (np.nan, np.nan)
        first = group.iloc[0].to_dict()
        first.update({"eval_domain": "ood_average", "n": int(group["n"].sum()), "accuracy": float(group["accuracy"].mean()),
                      "accuracy_ci_low": low, "accuracy_ci_high": high,
                      "seen_accuracy": float(group["seen_accuracy"].mean()),
                      "absent_accuracy": float(group["absent_accuracy"].mean()),
                      "n_seen": int(group["n_seen"].sum()), "n_absent": int(group["n_absent"].sum()),
                      "ausuc": float(group["ausuc"].mean())})
        extra.append(first)
    return pd.concat([frame, pd.DataFrame(extra)], ignore_index=True) if extra else frame


def _mean_of_domains_ci(corrects: Sequence[np.ndarray], n_boot: int, level: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean of per-domain accuracies, resampling each domain's examples independently."""
    rng = np.random.default_rng(seed)
    means = np.zeros(n_boot)
    for correct in corrects:
        idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
        means += correct[idx].mean(axis=1)
    means /= len(corrects)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


_RUN_CHOICE = ["study", "method", "variant", "seed", "interpolation", "calibration"]


def _id_val(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[(summary["eval_domain"] == summary["train_domain"]) & (summary["split"] == "val")]


def _selected_alpha(summary: pd.DataFrame) -> np.ndarray:
    """True on rows whose alpha maximises ID *validation* accuracy for their run and calibration (ties: smaller alpha).

    Only the classes a run was fine-tuned on count (``seen_accuracy``; equal to ``accuracy`` without absent
    classes): a class-subset run must not choose its alpha with labels of the classes it never saw.
    """
    best = (_id_val(summary).sort_values(["alpha"]).sort_values("seen_accuracy", ascending=False, kind="stable")
            .drop_duplicates(_RUN_CHOICE)[[*_RUN_CHOICE, "alpha"]].assign(_best=True))
    merged = summary.merge(best, on=[*_RUN_CHOICE, "alpha"], how="left")
    return merged["_best"].astype("boolean").fillna(False).astype(bool).to_numpy()


def _variant_choices(summary: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per (study, method, protocol, seed, interpolation, calibration): the variant chosen on ID validation and the
    "oracle" variant chosen on OOD test, each variant at its own ID-validation-chosen alpha.

    DomainBed's training-domain validation (``model_selection.py``): within each seed, the variant whose selected point
    has the best ID-validation accuracy (seen classes; ties: ``default``, then the first name). The oracle takes
    the best OOD-average test accuracy instead: not a valid selection (it looks at the test data), shown as the
    upper reference that measures the selection gap. With one variant, both are that variant.
    """
    group = ["study", "method", "protocol", "seed", "interpolation", "calibration"]
    at_alpha = summary[summary["selected_alpha"]]
    picks = []
    for column, rows, score in (("selected_variant", _id_val(at_alpha), "seen_accuracy"),
                                ("oracle_variant", at_alpha[at_alpha["eval_domain"] == "ood_average"], "accuracy")):
        ranked = rows.assign(_default=rows["variant"] != "default").sort_values(
            [score, "_default", "variant"], ascending=[False, True, True], kind="stable")
        picks.append(ranked.drop_duplicates(group)[[*group, "variant"]].assign(**{column: True}))
    merged = summary.merge(picks[0], on=[*group, "variant"], how="left").merge(picks[1], on=[*group, "variant"],
                                                                              how="left")
    return tuple(merged[c].astype("boolean").fillna(False).astype(bool).to_numpy()
                 for c in ("selected_variant", "oracle_variant"))


def _selected_seed_spread(summary: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """On the rows of each seed's ID-validation-chosen alpha: the mean and s.d. over seeds of the accuracy, each seed
    at its own chosen alpha (NaN on other rows). ``accuracy_seed_mean`` instead holds one alpha fixed."""
    keys = ["study", "method", "variant", "eval_domain", "split", "interpolation", "calibration"]
    chosen = summary[summary["selected_alpha"]]
    grouped = chosen.groupby(keys)["accuracy"]
    mean = pd.Series(np.nan, index=summary.index)
    std = pd.Series(np.nan, index=summary.index)
    mean[chosen.index] = grouped.transform("mean")
    std[chosen.index] = grouped.transform(_seed_std)
    return mean.to_numpy(), std.to_numpy()
