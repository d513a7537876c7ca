"""Studies: several datasets and backbones in one working directory, without one config overwriting another's results.

One module-scoped sequence of runs in ONE working directory (tiny PACS, zeroshot + full_ft, alphas 0 and 1):

1. config A: PACS photo -> sketch with EfficientNet-Lite0 (64 px);
2. config B: PACS sketch -> photo, the same backbone: only the ID domain differs, which used to write into A's
   folders. B shares A's manifest and the pixel and feature caches of the splits both use;
3. config AB: both datasets (``datasets:``): nothing to compute but the combined summary and the report;
4. config M: AB with a second backbone (a tiny open_clip model): the 2 x 2 matrix, computing only the new studies;
5. AB again, then M again: removing a backbone and adding it back recomputes no cache and no run.

After every step, every file of the earlier steps (caches, runs, per-study summaries) is unchanged bit for bit, with
its modification time. The steps target the combined summary; the report over the matrix is built last. Plus a dry
run of a 3-backbone x 2-dataset x every-method matrix (job counts per rule).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from pipeline_utils import (
    AFTER_SUMMARY_RULES,
    PACS_ROOT,
    dry_run_jobs,
    expected_jobs,
    output_tail,
    read_summary,
    run_pipeline,
    run_snakemake,
    study_dir,
    tiny_config,
    write_config,
)

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.skipif(not PACS_ROOT.is_dir(), reason=f"PACS not found at {PACS_ROOT}"),
]

PHOTO = {"id_domain": "photo", "ood_domains": ["sketch"]}
SKETCH = {"id_domain": "sketch", "ood_domains": ["photo"]}
METHODS = {"zeroshot": {"default": {}}, "full_ft": {"default": {}}}
#: Files that are rewritten whenever the config's set of studies changes (the combined summary, the report, logs).
CONFIG_LEVEL = ("results/summary.parquet", "results/report/", "results/logs/")


def _config(dataset: dict) -> dict:
    config = tiny_config({"dataset": dataset, "sweep": {"alphas": [0.0, 1.0]}, "eval": {"bootstrap": 20}})
    return {**config, "methods": METHODS}


def _matrix(a: dict, b: dict, backbones: dict | None = None) -> dict:
    """A and B's datasets side by side (``datasets:``), with A's backbone or ``backbones``."""
    config = {k: v for k, v in a.items() if k not in ("dataset", "backbone") or (k == "backbone" and not backbones)}
    config["datasets"] = {"photo": a["dataset"], "sketch": b["dataset"]}
    if backbones:
        config["backbones"] = backbones
    return config


def _snapshot(workdir: Path) -> dict[str, tuple[str, int]]:
    """Every result file but the config-level ones: relative path -> (sha256, mtime_ns)."""
    files = {}
    for path in sorted((workdir / "results").rglob("*")):
        rel = str(path.relative_to(workdir))
        if path.is_file() and not rel.startswith(CONFIG_LEVEL):
            files[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return files


def _assert_untouched(before: dict, after: dict, what: str) -> None:
    missing = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    assert not missing and not changed, f"{what}: files removed {missing[:5]}, changed {changed[:5]}"


#: The target of the runs below: the combined summary (the report across studies is checked on its own, last).
SUMMARY = "results/summary.parquet"


def _dry_run(workdir: Path, config: dict, *targets: str) -> dict[str, int]:
    write_config(workdir, config)
    proc = run_snakemake(workdir, *(targets or [SUMMARY]), "-n", "--quiet", "rules", timeout=300)
    assert proc.returncode == 0, output_tail(proc)
    return dry_run_jobs(proc)


def _run(workdir: Path, config: dict) -> None:
    write_config(workdir, config)
    run_pipeline(workdir, SUMMARY, timeout=1800)


@pytest.fixture(scope="module")
def studies(tmp_path_factory, tiny_open_clip) -> SimpleNamespace:
    workdir = tmp_path_factory.mktemp("studies")
    a, b = _config(PHOTO), _config(SKETCH)
    ab = _matrix(a, b)
    clip = {"name": "open_clip", "model": tiny_open_clip["model"], "model_config": tiny_open_clip["model_config"],
            "pretrained": tiny_open_clip["checkpoint"]}
    m = _matrix(a, b, backbones={"lite0": a["backbone"], "clip": clip})
    out = SimpleNamespace(workdir=workdir, a=a, b=b, ab=ab, m=m, dry={}, snap={})

    _run(workdir, a)
    out.snap["a"] = _snapshot(workdir)
    out.dry["b"] = _dry_run(workdir, b)
    _run(workdir, b)
    out.snap["b"] = _snapshot(workdir)
    out.summary_b = read_summary(workdir)
    out.dry["ab"] = _dry_run(workdir, ab)
    _run(workdir, ab)
    out.snap["ab"] = _snapshot(workdir)
    out.summary_ab = read_summary(workdir)
    out.dry["m"] = _dry_run(workdir, m)
    _run(workdir, m)
    out.snap["m"] = _snapshot(workdir)
    out.summary_m = read_summary(workdir)
    out.dry["ab_again"] = _dry_run(workdir, ab)  # a backbone removed ...
    _run(workdir, ab)
    out.dry["m_again"] = _dry_run(workdir, m)  # ... and added back
    _run(workdir, m)
    out.snap["m_again"] = _snapshot(workdir)
    return out


def _study_of(config: dict, dataset: str | None = None, backbone: str | None = None) -> dict:
    from robustft.config import study_table, validate_config

    found = [s for s in study_table(validate_config(config))
             if dataset in (None, s["dataset_label"]) and backbone in (None, s["backbone_label"])]
    assert len(found) == 1, found
    return found[0]


def test_a_second_config_leaves_the_first_ones_results_untouched(studies):
    _assert_untouched(studies.snap["a"], studies.snap["b"], "config B after config A")
    a_dir, b_dir = study_dir(studies.workdir, studies.a), study_dir(studies.workdir, studies.b)
    assert a_dir != b_dir and a_dir.parent != b_dir.parent and a_dir.name == b_dir.name  # same backbone folder
    for folder in (a_dir, b_dir):
        assert (folder / "summary.parquet").is_file() and (folder / "runs" / "full_ft" / "default" / "seed0").is_dir()
    # B reuses A's manifest and the caches of the splits both evaluate (photo test, sketch test): it builds only its
    # ID training and validation caches
    new_b = {rule: n for rule, n in studies.dry["b"].items()}
    assert new_b == {"pixel_cache": 2, "features": 2, "reference": 1, "finetune": 2, "sweep": 2, "calibrate": 2,
                     "study_summary": 1, "summary": 1}, new_b
    manifests = sorted((studies.workdir / "results" / "data").glob("*/manifest.parquet"))
    assert len(manifests) == 1, manifests


def test_a_config_listing_both_computes_only_the_combined_summary_and_report(studies):
    assert studies.dry["ab"] == {"summary": 1}, studies.dry["ab"]
    _assert_untouched(studies.snap["b"], studies.snap["ab"], "config AB after A and B")
    per_study = [pd.read_parquet(study_dir(studies.workdir, cfg) / "summary.parquet") for cfg in (studies.a, studies.b)]
    combined = studies.summary_ab
    assert len(combined) == sum(len(f) for f in per_study)
    pd.testing.assert_frame_equal(combined, pd.concat(per_study, ignore_index=True), check_exact=True)
    # B's own run wrote the combined summary of B alone
    pd.testing.assert_frame_equal(studies.summary_b, per_study[1], check_exact=True)
    assert set(combined["train_domain"]) == {"photo", "sketch"} and set(combined["dataset"]) == {"pacs"}


def test_the_matrix_computes_only_the_new_studies(studies):
    # the tiny CLIP's studies: its pixel caches (own preprocessing) and features for the six splits, two references,
    # two runs per study; the manifest and every Lite0 result are reused
    new = {"weights": 1, "pixel_cache": 6, "features": 6, "reference": 2, "finetune": 4,
           "sweep": 4, "calibrate": 4, "study_summary": 2, "summary": 1}
    assert studies.dry["m"] == new, studies.dry["m"]
    _assert_untouched(studies.snap["ab"], studies.snap["m"], "the 2 x 2 matrix after AB")


def test_the_matrix_summary_holds_every_study(studies):
    from robustft.config import study_table, validate_config

    summary, config = studies.summary_m, validate_config(studies.m)
    table = study_table(config)
    assert len(table) == 4
    per_study = []
    for study in table:
        frame = pd.read_parquet(studies.workdir / "results" / study["dataset"] / study["backbone"] / "summary.parquet")
        assert set(frame["backbone"]) == {study["backbone"]} and set(frame["train_domain"]) == {study["id_domain"]}
        if "study" in frame.columns:
            assert set(frame["study"]) == {study["study"]}
        cells = frame[(frame["calibration"] == "none")].groupby(["method", "eval_domain", "split", "alpha"]).size()
        assert len(cells) == 2 * 4 * 2 and (cells == 1).all(), cells  # 2 methods x (ID val, ID test, OOD, avg) x 2
        # within a study, every run starts from the study's reference: alpha = 0 is the zeroshot run
        zero = frame[frame["alpha"] == 0].pivot_table(index=["eval_domain", "split"], columns="method",
                                                      values="accuracy")
        assert (zero["full_ft"] == zero["zeroshot"]).all(), zero
        per_study.append(frame)
    pd.testing.assert_frame_equal(summary, pd.concat(per_study, ignore_index=True), check_exact=True)
    # the two backbones are different models: their reference accuracies differ somewhere
    ref = summary[(summary["method"] == "zeroshot") & (summary["alpha"] == 0)]
    by_backbone = ref.pivot_table(index=["train_domain", "eval_domain", "split"], columns="backbone", values="accuracy")
    assert by_backbone.shape[1] == 2 and (by_backbone.iloc[:, 0] != by_backbone.iloc[:, 1]).any()


def test_removing_a_backbone_and_adding_it_back_recomputes_nothing(studies):
    assert studies.dry["ab_again"] == {"summary": 1}, studies.dry["ab_again"]
    assert studies.dry["m_again"] == {"summary": 1}, studies.dry["m_again"]
    _assert_untouched(studies.snap["m"], studies.snap["m_again"], "the matrix after removing and re-adding a backbone")


def test_the_matrix_report_is_built(studies):
    """The report over the 2 x 2 matrix: it reads the summary, the runs' curves and logs and each study's per-class
    table (built from the sweeps already there)."""
    assert _dry_run(studies.workdir, studies.m, "results/report/index.html") == {
        "per_class": 4, "effective_robustness": 1, "paired_tests": 1, "recommendation": 1, "report": 1}
    run_pipeline(studies.workdir, timeout=1800)
    report = studies.workdir / "results" / "report"
    page = (report / "index.html").read_text()
    summary = read_summary(studies.workdir)
    study_names = sorted(summary["study"].unique())
    assert len(study_names) == 4, study_names
    # a leaderboard per study, one across backbones per dataset
    for name in study_names:
        assert f"<h3>{name}</h3>" in page, name
    # both datasets are PACS (ID photo, ID sketch): told apart by their ID domain, never averaged together
    for label in ("pacs (ID photo)", "pacs (ID sketch)"):
        assert f"{label}: across backbones</h3>" in page, label
    board = pd.read_csv(report / "leaderboard.csv")
    assert sorted(board["study"].unique()) == study_names
    # ID vs OOD per dataset with a column per backbone
    spec = (report / "id_vs_ood.vl.json").read_text()
    assert "one column per backbone" in spec
    _assert_untouched(studies.snap["m_again"], _snapshot(studies.workdir), "the matrix after its report")


# ---------------------------------------------------------------------------------------------- a large dry run

EVERY_METHOD = {
    "zeroshot": {"default": {}}, "linear_probe": {"default": {}}, "full_ft": {"default": {}, "absent2": {
        "protocol": {"kind": "class_subset", "absent_classes": ["dog", "horse"]}}},
    "lp_ft": {"default": {}}, "l2sp": {"default": {}}, "l1sp": {"default": {}}, "kd": {"default": {}},
    "ewc": {"default": {}}, "lora": {"default": {}}, "saft": {"default": {}}, "flyp": {"default": {}},
}


def test_dry_run_of_a_3_backbone_2_dataset_every_method_matrix(tmp_path):
    backbones = {name: {"name": "open_clip", "model": model, "pretrained": "openai"}
                 for name, model in (("b32", "ViT-B-32"), ("b16", "ViT-B-16"), ("l14", "ViT-L-14"))}
    caps = {"train": 16, "val": 8, "test": 8}
    datasets = {"photo": {"name": "pacs", "root": str(PACS_ROOT), "max_per_class": caps, **PHOTO},
                "sketch": {"name": "pacs", "root": str(PACS_ROOT), "max_per_class": caps, **SKETCH}}
    config = {"datasets": datasets, "backbones": backbones, "methods": EVERY_METHOD, "seeds": [0, 1],
              "calibration": {"pcv_folds": 2}}
    jobs = _dry_run(tmp_path, config, "all")
    studies, runs = 3 * 2, 3 * 2 * 12 * 2  # 12 variants, 2 seeds
    by_hand = {"weights": 3, "manifest": 1, "pixel_cache": 3 * 6, "features": 3 * 6, "reference": studies,
               "finetune": runs, "finetune_pcv": studies * 2 * 2, "pcv_logits": studies * 2 * 2, "sweep": runs, "calibrate": runs,
               "study_summary": studies, "summary": 1, "all": 1,
               # soups per study: uniform and greedy of full_ft's 2 seeds, and of the mixed soup's 6 methods x 2 seeds
               "soup": studies * 4, "soup_sweep": studies * 4, "soup_calibrate": studies * 4}
    assert expected_jobs(config) == by_hand
    assert {rule: jobs.get(rule, 0) for rule in by_hand} == by_hand, jobs
    assert set(jobs) - set(by_hand) <= AFTER_SUMMARY_RULES
    assert not (tmp_path / "results").exists()
