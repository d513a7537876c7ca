"""Analysis stages: the per-run WiSE-FT sweep, calibration with metrics, and the summary table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd
import torch

from robustft.backbones import build_backbone
from robustft.calibration import (
    absent_class_mask,
    apply_logit_offset,
    ausuc,
    average_logit_gap,
    pseudo_cv_gamma,
    seen_absent_curve,
)
from robustft.data.registry import get_adapter
from robustft.data.pixels import load_pixel_split
from robustft.devices import resolve_device
from robustft.evaluation import EvalSplit, build_classifier, encoder_unchanged, sweep_logits
from robustft.features import load_features
from robustft.io.atomic import atomic_path
from robustft.io.tables import read_table, write_table
from robustft.metrics import bootstrap_ci, group_accuracies
from robustft.pipeline.stages import expected_feature_attrs, read_manifest
from robustft.training.checkpoint import load_safetensors

log = logging.getLogger("robustft")

#: Columns of ``results/summary.parquet`` (documented in the README; checked by tests).
SUMMARY_COLUMNS = (
    "method", "variant", "seed", "backbone", "dataset", "protocol", "train_domain", "eval_domain", "split", "is_ood",
    "alpha", "interpolation", "selected_alpha", "calibration", "gamma", "n", "accuracy", "accuracy_ci_low",
    "accuracy_ci_high", "seen_accuracy", "absent_accuracy", "n_seen", "n_absent", "ausuc",
    "accuracy_seed_mean", "accuracy_seed_std", "n_seeds", "trainable_params", "total_params", "checkpoint_bytes",
    "train_seconds",
)


def reference_state(model: torch.nn.Module, head_path: str | Path) -> dict[str, torch.Tensor]:
    """The reference model's full state dict: pre-trained encoder plus the reference head."""
    head = load_safetensors(Path(head_path))
    model.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sweep_stage(
    manifest: str,
    backbone_spec: dict,
    run_json: str,
    reference_head: str,
    eval_pixels: dict[str, str],
    eval_features: dict[str, str],
    alphas: Sequence[float],
    batch_size: int,
    device: str,
    out_logits: str,
    fisher_pixels: str | None = None,
    fisher_examples: int = 0,
) -> None:
    """Evaluate every alpha of the run's WiSE-FT path on every eval split; write all logits to one HDF5 file."""
    from robustft.training.run import load_run_state

    frame, meta = read_manifest(manifest)
    backbone = build_backbone(backbone_spec)
    dev = resolve_device(device)
    model = build_classifier(backbone, len(meta["class_names"]))
    ref = reference_state(model, reference_head)
    run_dir = Path(run_json).parent
    finetuned = load_run_state(run_dir, ref)
    head_only = encoder_unchanged(ref, finetuned)
    expected = expected_feature_attrs(meta, backbone)
    splits = []
    for name in eval_pixels:
        domain, split = name.rsplit("_", 1)
        feats = load_features(eval_features[name], expected)
        pixels = None if head_only else load_pixel_split(eval_pixels[name])
        if pixels is not None and not torch.equal(pixels.row_ids, feats["row_ids"]):
            raise RuntimeError(f"{eval_pixels[name]} and {eval_features[name]} list different images")
        splits.append(EvalSplit(name, domain, split, feats["labels"].numpy(), pixels, feats["features"]))
    variants: list[tuple[str, Any]] = [("linear", None)]
    if fisher_pixels and fisher_examples and not head_only:
        variants.append(("fisher", _fisher_pair(model, ref, finetuned, fisher_pixels, fisher_examples, backbone, dev)))
    alphas = [float(a) for a in alphas]
    with atomic_path(out_logits) as tmp, h5py.File(tmp, "w") as out:
        out.attrs["alphas"] = np.asarray(alphas)
        out.attrs["interpolations"] = json.dumps([v[0] for v in variants])
        out.attrs["head_only"] = head_only
        for split in splits:
            group = out.create_group(split.name)
            group["labels"] = split.labels
            group.attrs.update({"domain": split.domain, "split": split.split})
            for interp, _ in variants:
                group.create_dataset(interp, shape=(len(alphas), len(split.labels), len(meta["class_names"])), dtype=np.float32)
        for interp, fisher in variants:
            for alpha, split, logits in sweep_logits(model, ref, finetuned, alphas, splits, backbone.preprocessing,
                                                     dev, batch_size, fisher=fisher):
                out[split.name][interp][alphas.index(alpha)] = logits
                acc = float((logits.argmax(1) == split.labels).mean())
                log.info("%s alpha=%.2f %s: accuracy %.4f", interp, alpha, split.name, acc)
        out.attrs["complete"] = True


def _fisher_pair(model, ref, finetuned, pixels_path, n, backbone, device):
    """Diagonal Fishers of the reference and fine-tuned models on ``n`` ID training images (WiSE-FT code), computed
    on ``device``; the sampled labels come from a CPU generator, so they are the same on every device."""
    from robustft.fisher import diagonal_fisher

    pixels = load_pixel_split(pixels_path).pixels[:n]
    model.to(device)
    inputs = [backbone.preprocessing.normalize(pixels[i : i + 32].to(device)) for i in range(0, len(pixels), 32)]
    fishers = []
    for state in (ref, finetuned):
        model.load_state_dict(state)
        params = {k: p for k, p in model.named_parameters()}
        fishers.append(diagonal_fisher(model, inputs, params=params, generator=torch.Generator().manual_seed(0)))
    model.load_state_dict(ref)
    return fishers[0], fishers[1]


def read_sweep_logits(path: str | Path) -> tuple[list[float], dict[str, dict[str, Any]]]:
    """Alphas and, per eval split, its labels, domain, split and logits per interpolation kind."""
    with h5py.File(path, "r") as handle:
        if not handle.attrs.get("complete"):
            raise RuntimeError(f"{path}: incomplete sweep file")
        alphas = [float(a) for a in handle.attrs["alphas"]]
        interps = json.loads(handle.attrs["interpolations"])
        splits = {}
        for name, group in handle.items():
            splits[name] = {"labels": group["labels"][...], "domain": group.attrs["domain"], "split": group.attrs["split"],
                            "logits": {k: group[k][...] for k in interps}}
    return alphas, splits


def _absent_indices(run: dict[str, Any], class_names: Sequence[str]) -> list[int]:
    absent = run.get("absent_classes") or []
    return [class_names.index(c) for c in absent]


def calibrate_stage(
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
    """Per alpha and calibration (none, ALG, PCV): metrics with bootstrap CIs on every eval split; the γ curves."""
    _, meta = read_manifest(manifest)
    class_names = meta["class_names"]
    adapter = get_adapter(meta["dataset"])
    run = json.loads(Path(run_json).read_text())
    alphas, splits = read_sweep_logits(sweep_logits_path)
    absent = _absent_indices(run, class_names)
    mask = absent_class_mask(len(class_names), absent)
    source = f"{id_domain}_{gamma_source}"
    if absent and source not in splits:
        raise RuntimeError(f"{sweep_logits_path}: no {source} logits to choose gamma on")
    rows, curves = [], []
    for interp in next(iter(splits.values()))["logits"]:
        for ai, alpha in enumerate(alphas):
            gammas: dict[str, float] = {"none": 0.0}
            if absent:
                src = splits[source]
                gammas["alg"] = average_logit_gap(src["logits"][interp][ai], src["labels"], mask)
                if pcv_fold_logits:
                    gammas["pcv"] = _pcv_gamma(pcv_fold_logits, ai, mask)
            for name, data in splits.items():
                logits = adapter.projection(data["domain"]).apply(data["logits"][interp][ai])
                labels = data["labels"]
                eval_mask = mask if logits.shape[1] == len(class_names) else np.zeros(logits.shape[1], bool)
                for calibration, gamma in gammas.items():
                    calibrated = apply_logit_offset(logits, eval_mask, gamma) if gamma else logits
                    pred = calibrated.argmax(1)
                    groups = group_accuracies(pred, labels, eval_mask)
                    correct = pred == labels
                    low, high = bootstrap_ci(correct, bootstrap, ci_level, seed=0) if bootstrap else (np.nan, np.nan)
                    rows.append({"eval_domain": data["domain"], "split": data["split"], "alpha": alpha,
                                 "interpolation": interp, "calibration": calibration, "gamma": float(gamma),
                                 "n": int(groups["n"]), "accuracy": float(groups["accuracy"]),
                                 "accuracy_ci_low": float(low), "accuracy_ci_high": float(high),
                                 "seen_accuracy": float(groups["seen_accuracy"]),
                                 "absent_accuracy": float(groups["absent_accuracy"]),
                                 "n_seen": int(groups["n_seen"]), "n_absent": int(groups["n_absent"]),
                                 "correct": correct.astype(np.uint8).tobytes()})
                if absent and eval_mask.any() and 0 < int(eval_mask[labels].sum()) < len(labels):
                    curve = seen_absent_curve(logits, labels, eval_mask)
                    area = ausuc(curve["seen_accuracy"], curve["absent_accuracy"])
                    curve = curve.assign(eval_domain=data["domain"], split=data["split"], alpha=alpha,
                                         interpolation=interp, ausuc=area)
                    curves.append(curve)
                    for row in rows[-len(gammas):]:
                        row["ausuc"] = area
    frame = pd.DataFrame(rows)
    if "ausuc" not in frame:
        frame["ausuc"] = np.nan
    identity = {"method": run["method"], "variant": run["variant"], "seed": int(run["seed"])}
    frame = frame.assign(**identity)
    curve_frame = pd.concat(curves, ignore_index=True).assign(**identity) if curves else pd.DataFrame(
        columns=["gamma", "seen_accuracy", "absent_accuracy", "accuracy", "eval_domain", "split", "alpha",
                 "interpolation", "ausuc", *identity])
    write_table(out_metrics, frame, {"run": identity, "absent_classes": run.get("absent_classes") or []})
    write_table(out_curve, curve_frame, {"run": identity})


def _pcv_gamma(fold_paths: Sequence[str], alpha_index: int, absent_mask: np.ndarray) -> float:
    """PCV γ at one alpha from the pseudo-absent fold models' ID-validation logits."""
    logits, labels, masks, floors = [], [], [], []
    for path in fold_paths:
        with h5py.File(path, "r") as handle:
            if not handle.attrs.get("complete"):
                raise RuntimeError(f"{path}: incomplete PCV logits file")
            arrays = {k: handle[k][...] for k in ("logits", "labels", "pseudo_absent")}
        fold_mask = arrays["pseudo_absent"].astype(bool) | absent_mask
        keep = ~absent_mask[arrays["labels"]]  # truly absent classes have no ID training data to validate on
        fold_logits = arrays["logits"][alpha_index][keep]
        logits.append(fold_logits)
        labels.append(arrays["labels"][keep])
        masks.append(fold_mask)
        reference = arrays["logits"][0][keep]  # alpha 0: the reference model's absent accuracy is the floor
        pseudo = arrays["pseudo_absent"].astype(bool)[arrays["labels"][keep]]
        floors.append(float((reference.argmax(1) == arrays["labels"][keep])[pseudo].mean()) if pseudo.any() else 0.0)
    return pseudo_cv_gamma(logits, labels, masks, floors)


def summary_stage(
    metrics_paths: Sequence[str], run_jsons: Sequence[str], backbone: str, dataset: str, id_domain: str,
    ood_domains: Sequence[str], bootstrap: int, ci_level: float, out: str,
) -> None:
    """One row per (run, eval domain, alpha, calibration) plus the OOD average; seeds aggregated; alpha chosen on ID val."""
    frames = []
    for metrics_path, run_json in zip(metrics_paths, run_jsons):
        run = json.loads(Path(run_json).read_text())
        frame = read_table(metrics_path, ("eval_domain", "alpha", "calibration", "accuracy", "correct"))
        frame = frame.assign(
            backbone=backbone, dataset=dataset, train_domain=id_domain,
            protocol=(run.get("protocol") or {}).get("kind", "full"),
            trainable_params=run.get("trainable_parameters"), total_params=run.get("total_parameters"),
            checkpoint_bytes=(run.get("checkpoint") or {}).get("size_bytes"), train_seconds=run.get("wall_time_s"),
        )
        frames.append(_with_ood_average(frame, ood_domains, bootstrap, ci_level))
    summary = pd.concat(frames, ignore_index=True)
    summary["is_ood"] = summary["eval_domain"].isin([*ood_domains, "ood_average"])
    summary["selected_alpha"] = _selected_alpha(summary, id_domain)
    keys = ["method", "variant", "eval_domain", "split", "alpha", "interpolation", "calibration"]
    grouped = summary.groupby(keys)["accuracy"]
    summary["accuracy_seed_mean"] = grouped.transform("mean")
    summary["accuracy_seed_std"] = grouped.transform(lambda s: float(s.std(ddof=1)) if len(s) > 1 else 0.0)
    summary["n_seeds"] = grouped.transform("size").astype(int)
    summary = summary[list(SUMMARY_COLUMNS)].sort_values(
        ["method", "variant", "seed", "interpolation", "calibration", "alpha", "is_ood", "eval_domain"]).reset_index(drop=True)
    write_table(out, summary, {"columns": list(SUMMARY_COLUMNS)})


def _with_ood_average(frame: pd.DataFrame, ood_domains: Sequence[str], bootstrap: int, ci_level: float) -> pd.DataFrame:
    """Append ``eval_domain='ood_average'`` rows: the mean of OOD test accuracies, its CI by resampling each domain."""
    tests = frame[(frame["split"] == "test") & frame["eval_domain"].isin(ood_domains)]
    extra = []
    for key, group in tests.groupby(["alpha", "interpolation", "calibration"]):
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


def _selected_alpha(summary: pd.DataFrame, id_domain: str) -> pd.Series:
    """True on rows whose alpha maximises ID *validation* accuracy for their run and calibration (ties: smaller alpha).

    Only the classes a run was fine-tuned on count (``seen_accuracy``; equal to ``accuracy`` without absent
    classes): a class-subset run must not choose its alpha with labels of the classes it never saw.
    """
    val = summary[(summary["eval_domain"] == id_domain) & (summary["split"] == "val")]
    best = (val.sort_values(["alpha"]).sort_values("seen_accuracy", ascending=False, kind="stable")
            .drop_duplicates(["method", "variant", "seed", "interpolation", "calibration"])
            [["method", "variant", "seed", "interpolation", "calibration", "alpha"]].assign(_best=True))
    merged = summary.merge(best, on=["method", "variant", "seed", "interpolation", "calibration", "alpha"], how="left")
    return merged["_best"].fillna(False).astype(bool).to_numpy()


def pcv_logits_stage(
    manifest: str, backbone_spec: dict, run_json: str, parent_run_json: str, reference_head: str, val_pixels: str,
    val_features: str, alphas: Sequence[float], batch_size: int, device: str, out: str,
) -> None:
    """A PCV fold model's ID-validation logits at every alpha, with its pseudo-absent class mask."""
    from robustft.training.run import load_run_state

    _, meta = read_manifest(manifest)
    class_names = meta["class_names"]
    backbone = build_backbone(backbone_spec)
    model = build_classifier(backbone, len(class_names))
    ref = reference_state(model, reference_head)
    finetuned = load_run_state(Path(run_json).parent, ref)
    fold_absent = set(json.loads(Path(run_json).read_text()).get("absent_classes") or [])
    true_absent = set(json.loads(Path(parent_run_json).read_text()).get("absent_classes") or [])
    pseudo = np.array([c in fold_absent and c not in true_absent for c in class_names])
    feats = load_features(val_features, expected_feature_attrs(meta, backbone))
    head_only = encoder_unchanged(ref, finetuned)
    pixels = None if head_only else load_pixel_split(val_pixels)
    split = EvalSplit("val", "", "val", feats["labels"].numpy(), pixels, feats["features"])
    alphas = [float(a) for a in alphas]
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as handle:
        handle["labels"] = split.labels
        handle["pseudo_absent"] = pseudo
        stack = handle.create_dataset("logits", shape=(len(alphas), len(split.labels), len(class_names)), dtype=np.float32)
        for alpha, _, logits in sweep_logits(model, ref, finetuned, alphas, [split], backbone.preprocessing,
                                             resolve_device(device), batch_size):
            stack[alphas.index(alpha)] = logits
        handle.attrs["alphas"] = np.asarray(alphas)
        handle.attrs["complete"] = True
