"""summary_stage: several studies in one table (every grouping within a study), alpha and variant chosen on ID
validation per seed (DomainBed's training-domain validation) beside an oracle pick on OOD test, and seeds
aggregated at each seed's own chosen alpha."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustft.io.tables import read_table, read_table_metadata, write_table
from robustft.pipeline.analysis import SUMMARY_COLUMNS, summary_stage

ALPHAS = [0.0, 0.5, 1.0]
N = 40  # examples per split
ID, OOD = "photo", ["sketch", "cartoon"]


def _metrics(path: Path, method: str, variant: str, seed: int, accuracy) -> None:
    """A run's metrics.parquet as calibrate_stage writes it, from ``accuracy(domain, split, alpha)``."""
    rows = []
    for alpha in ALPHAS:
        for domain, split in [(ID, "val"), (ID, "test"), *[(d, "test") for d in OOD]]:
            acc = accuracy(domain, split, alpha)
            hits = int(round(acc * N))
            correct = np.zeros(N, np.uint8)
            correct[:hits] = 1
            rows.append({"eval_domain": domain, "split": split, "calibration": "none", "gamma": 0.0, "n": N,
                         "accuracy": hits / N, "accuracy_ci_low": np.nan, "accuracy_ci_high": np.nan,
                         "seen_accuracy": hits / N, "absent_accuracy": np.nan, "n_seen": N, "n_absent": 0,
                         "ausuc": np.nan, "correct": correct.tobytes(), "alpha": alpha, "interpolation": "linear",
                         "method": method, "variant": variant, "seed": seed})
    write_table(path, pd.DataFrame(rows))


def _run(root: Path, study: str, method: str, variant: str, seed: int, accuracy, protocol: str = "full"):
    run_dir = root / study / method / variant / f"seed{seed}"
    run_dir.mkdir(parents=True)
    _metrics(run_dir / "metrics.parquet", method, variant, seed, accuracy)
    (run_dir / "run.json").write_text(json.dumps({
        "method": method, "variant": variant, "seed": seed, "protocol": {"kind": protocol},
        "trainable_parameters": 10, "total_parameters": 20, "checkpoint": {"size_bytes": 80}, "wall_time_s": 1.5}))
    return str(run_dir / "metrics.parquet"), str(run_dir / "run.json")


def _study(name: str, backbone: str, dataset: str = "pacs") -> dict:
    return {"study": name, "dataset": dataset, "backbone": backbone, "id_domain": ID, "ood_domains": list(OOD)}


def _summarise(tmp_path: Path, entries) -> pd.DataFrame:
    metrics, runs, studies = zip(*[(m, r, s) for (m, r), s in entries])
    out = tmp_path / "summary.parquet"
    summary_stage(metrics=list(metrics), runs=list(runs), studies=list(studies), bootstrap=20, ci_level=0.95,
                  out=str(out))
    frame = read_table(out, SUMMARY_COLUMNS)
    assert list(frame.columns) == list(SUMMARY_COLUMNS)
    assert read_table_metadata(out)["studies"][0]["study"] == studies[0]["study"]
    return frame


def peaked(best_alpha: float, id_gain: float = 0.0, ood_gain: float = 0.0, val_shift: float = 0.0):
    """Accuracies that peak at ``best_alpha`` on ID validation."""
    def accuracy(domain, split, alpha):
        base = 0.5 - 0.3 * abs(alpha - best_alpha)
        if split == "val":
            return base + val_shift
        return base + (id_gain if domain == ID else ood_gain)
    return accuracy


def test_studies_are_kept_apart(tmp_path):
    """Two backbones on one dataset, the same run names: selection, seed aggregation and the OOD average never mix
    the studies."""
    small, big = _study("pacs/small", "small"), _study("pacs/big", "big")
    entries = []
    for seed in (0, 1):
        entries.append((_run(tmp_path, "small", "full_ft", "default", seed, peaked(0.5, id_gain=0.1 * seed)), small))
        entries.append((_run(tmp_path, "big", "full_ft", "default", seed, peaked(1.0, id_gain=0.2)), big))
    frame = _summarise(tmp_path, entries)
    assert set(frame["study"]) == {"pacs/small", "pacs/big"}
    assert (frame.groupby("study")["backbone"].nunique() == 1).all()
    chosen = frame[frame["selected_alpha"]].groupby("study")["alpha"].unique()
    assert list(chosen["pacs/small"]) == [0.5] and list(chosen["pacs/big"]) == [1.0]
    assert (frame["n_seeds"] == 2).all()  # two seeds per study, not four
    cell = frame[(frame["eval_domain"] == ID) & (frame["split"] == "test") & (frame["alpha"] == 0.5)]
    for study, rows in cell.groupby("study"):
        assert rows["accuracy_seed_mean"].iloc[0] == pytest.approx(rows["accuracy"].mean())
    ood = frame[frame["eval_domain"] == "ood_average"]
    assert len(ood) == 2 * 2 * len(ALPHAS) and ood["is_ood"].all()
    assert set(frame.loc[frame["is_ood"], "eval_domain"]) == {*OOD, "ood_average"}


def test_seeds_are_aggregated_at_their_own_chosen_alpha(tmp_path):
    study = _study("pacs/b", "b")
    entries = [(_run(tmp_path, "s", "full_ft", "default", 0, peaked(0.5)), study),
               (_run(tmp_path, "s", "full_ft", "default", 1, peaked(1.0, id_gain=0.1)), study)]
    frame = _summarise(tmp_path, entries)
    test = frame[(frame["eval_domain"] == ID) & (frame["split"] == "test")]
    seed0 = test[(test["seed"] == 0) & (test["alpha"] == 0.5)]["accuracy"].iloc[0]
    seed1 = test[(test["seed"] == 1) & (test["alpha"] == 1.0)]["accuracy"].iloc[0]
    chosen = test[test["selected_alpha"]]
    assert sorted(zip(chosen["seed"], chosen["alpha"])) == [(0, 0.5), (1, 1.0)]
    assert chosen["selected_seed_mean"].tolist() == pytest.approx([(seed0 + seed1) / 2] * 2)
    assert chosen["selected_seed_std"].tolist() == pytest.approx([np.std([seed0, seed1], ddof=1)] * 2)
    # the fixed-alpha aggregate is another number: at alpha 0.5 seed 1 is far from its best
    fixed = test[(test["alpha"] == 0.5)]["accuracy_seed_mean"].iloc[0]
    assert fixed != pytest.approx((seed0 + seed1) / 2)
    assert test.loc[~test["selected_alpha"], "selected_seed_mean"].isna().all()


def test_variants_are_chosen_on_id_validation_beside_an_oracle(tmp_path):
    """A grid of two learning rates: ``lr_small`` wins on ID validation, ``lr_big`` on OOD test. The class-subset
    variant is another protocol, never compared with them."""
    study = _study("pacs/b", "b")
    entries = []
    for seed in (0, 1):
        entries.append((_run(tmp_path, "s", "full_ft", "lr_small", seed, peaked(1.0, val_shift=0.1)), study))
        entries.append((_run(tmp_path, "s", "full_ft", "lr_big", seed, peaked(0.5, ood_gain=0.2)), study))
        entries.append((_run(tmp_path, "s", "full_ft", "absent3", seed, peaked(0.5, val_shift=0.3),
                             protocol="class_subset"), study))
        entries.append((_run(tmp_path, "s", "zeroshot", "default", seed, lambda d, s, a: 0.4), study))
    frame = _summarise(tmp_path, entries)
    by_variant = frame.groupby("variant")[["selected_variant", "oracle_variant"]].agg(["all", "any"])
    assert by_variant.loc["lr_small", ("selected_variant", "all")] and not by_variant.loc["lr_small", ("oracle_variant", "any")]
    assert by_variant.loc["lr_big", ("oracle_variant", "all")] and not by_variant.loc["lr_big", ("selected_variant", "any")]
    # alone in its protocol (class_subset) and alone in its method (zeroshot): chosen by both
    assert by_variant.loc["absent3", ("selected_variant", "all")] and by_variant.loc["absent3", ("oracle_variant", "all")]
    assert by_variant.loc["default", ("selected_variant", "all")]


def test_a_tie_on_id_validation_goes_to_default(tmp_path):
    study = _study("pacs/b", "b")
    entries = [(_run(tmp_path, "s", "kd", "a_weight", 0, peaked(1.0)), study),
               (_run(tmp_path, "s", "kd", "default", 0, peaked(1.0)), study)]
    frame = _summarise(tmp_path, entries)
    assert set(frame.loc[frame["selected_variant"], "variant"]) == {"default"}


def test_studies_must_describe_every_metrics_file(tmp_path):
    study = _study("pacs/b", "b")
    metrics, run = _run(tmp_path, "s", "full_ft", "default", 0, peaked(1.0))
    kwargs = dict(bootstrap=0, ci_level=0.95, out=str(tmp_path / "out.parquet"))
    with pytest.raises(ValueError, match="one study per metrics file"):
        summary_stage(metrics=[metrics], runs=[run], studies=[], **kwargs)
    with pytest.raises(ValueError, match=r"studies\[0\] lacks \['ood_domains'\]"):
        summary_stage(metrics=[metrics], runs=[run], studies=[{k: v for k, v in study.items() if k != "ood_domains"}],
                      **kwargs)
    with pytest.raises(ValueError, match="two metrics files hold study 'pacs/b', run full_ft/default/seed0"):
        summary_stage(metrics=[metrics, metrics], runs=[run, run], studies=[study, study], **kwargs)
    with pytest.raises(ValueError, match="described two ways"):
        summary_stage(metrics=[metrics, metrics], runs=[run, run],
                      studies=[study, {**study, "backbone": "other"}], **kwargs)
