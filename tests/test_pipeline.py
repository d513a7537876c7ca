"""End to end: the Snakemake workflow on a tiny PACS subset (64 px, a few images per class, CPU).

Expensive runs happen once per module and are shared:

- ``session``: the tiny config (zeroshot, linear_probe, full_ft + the class-subset variant ``absent2`` with 2 PCV
  folds), uninterrupted;
- ``sub_uninterrupted``: the same config restricted to full_ft/default, uninterrupted;
- ``sub_killed``: that restricted config again, SIGKILLed once while a feature cache is being written and once
  while full_ft is fine-tuning, then rerun to completion.

Both configs set ``training.checkpoint_every: 1`` (a resume checkpoint after every step, so that a kill can land
between two of them) and ``training.batch_size: 8`` (6 steps for full_ft instead of 3: a wider window to kill in).
The restricted config differs from the session config only in its methods, so its runs must reproduce the session's
rows bit for bit (test 6), with and without interruption (test 5).

Run with ``pytest -m pipeline tests/test_pipeline.py``; set ``ROBUSTFT_KILL_SEED`` to replay a kill schedule.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline_utils import (
    DELETE,
    PACS_ROOT,
    REPO,
    TIMING_COLUMNS,
    comparable,
    dry_run_jobs,
    expected_jobs,
    only_study,
    output_tail,
    read_summary,
    run_dir,
    run_and_kill,
    run_pipeline,
    run_snakemake,
    study_dir,
    summaries_equal_message,
    tiny_config,
    workflow_profile,
    write_config,
)

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.skipif(not PACS_ROOT.is_dir(), reason=f"PACS not found at {PACS_ROOT}"),
]

COMMON = {"training": {"checkpoint_every": 1, "batch_size": 8}}
SUB = {"methods": {"zeroshot": DELETE, "linear_probe": DELETE, "full_ft": {"absent2": DELETE}}}
SUB_RUNS = {("full_ft", "default")}
ID_DOMAIN, OOD_DOMAINS = "photo", ["art_painting", "sketch"]
N_CLASSES = 7
KILL_SEED = int(os.environ.get("ROBUSTFT_KILL_SEED", random.SystemRandom().randrange(10**6)))
#: Rules that read the summary (rules/analyses.smk), one job each per config.
ANALYSES = {"effective_robustness", "paired_tests", "recommendation"}
#: Rules that follow the summary (per-class damage, the analyses, the report) and the target rule: allowed in every "what reruns" answer.
AFTER_SUMMARY = {"study_summary", "summary", "per_class", *ANALYSES, "report", "all"}
#: The restricted runs stop at the summary (the session's run builds the report as well).
SUMMARY = "results/summary.parquet"


def _resolved(config: dict) -> dict:
    from robustft.config import validate_config

    return validate_config(config)


def _backbone_spec(config: dict) -> dict:
    return {k: v for k, v in _resolved(config)["backbone"].items() if k != "templates"}


def _run_dir(workdir: Path, method: str, variant: str, seed: int = 0) -> Path:
    """A run of the tiny study (every config of this module has its dataset and backbone, hence its folder)."""
    return run_dir(workdir, tiny_config(COMMON), method, variant, seed)


def _timed_run(workdir: Path, config: dict, *targets: str) -> SimpleNamespace:
    write_config(workdir, config)
    started = time.monotonic()
    proc = run_pipeline(workdir, *targets)
    return SimpleNamespace(workdir=workdir, config=config, proc=proc, seconds=time.monotonic() - started)


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> SimpleNamespace:
    """The tiny config, run once, uninterrupted."""
    return _timed_run(tmp_path_factory.mktemp("session"), tiny_config(COMMON))


@pytest.fixture(scope="module")
def sub_config() -> dict:
    return tiny_config({**COMMON, **SUB})


@pytest.fixture(scope="module")
def sub_uninterrupted(tmp_path_factory, sub_config) -> SimpleNamespace:
    """The restricted config (full_ft/default only), run once, uninterrupted."""
    return _timed_run(tmp_path_factory.mktemp("sub_uninterrupted"), sub_config, SUMMARY)


@pytest.fixture(scope="module")
def summary(session) -> pd.DataFrame:
    return read_summary(session.workdir)


# ------------------------------------------------------------------------------------------------ 1. dry run, lint


def _embedded_config(workdir: Path) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["dataset"]["root"] = str(PACS_ROOT)
    write_config(workdir, config)
    return config


def test_dry_run_of_the_embedded_config_lists_every_job(tmp_path):
    config = _embedded_config(tmp_path)
    proc = run_snakemake(tmp_path, "-n", "--quiet", "rules", timeout=300)
    assert proc.returncode == 0, output_tail(proc)
    jobs = dry_run_jobs(proc)
    expected = expected_jobs(config)
    extra = {rule: n for rule, n in jobs.items() if rule not in expected}
    assert {rule: jobs.get(rule, 0) for rule in expected} == expected, f"dry run job counts {jobs}\n{output_tail(proc)}"
    assert set(extra) <= {"report", "per_class", *ANALYSES} and all(n == 1 for n in extra.values()), f"unexpected jobs {extra}"
    # writes nothing: no results/ folder, no metadata
    assert not (tmp_path / "results").exists()

    # every run's outputs are named in the dry run
    from robustft.config import run_table

    full = run_snakemake(tmp_path, "-n", timeout=300)
    text = full.stdout + full.stderr
    for run in run_table(_resolved(config)):
        folder = f"results/{run['study']}/runs/{run['method']}/{run['variant']}/seed{run['seed']}"
        for name in ("run.json", "sweep_logits.h5", "metrics.parquet", "calibration_curve.parquet"):
            assert f"{folder}/{name}" in text, f"{folder}/{name} missing from the dry run"


def test_lint_is_clean(tmp_path):
    _embedded_config(tmp_path)
    proc = run_snakemake(tmp_path, "--lint", timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations" in text, f"snakemake --lint findings:\n{text[-8000:]}"


# ------------------------------------------------------------------------------------------- 2. end to end, tiny


def test_summary_schema_and_one_row_per_cell(session, summary):
    from robustft.pipeline.analysis import SUMMARY_COLUMNS

    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    keys = ["method", "variant", "seed", "eval_domain", "split", "alpha", "interpolation", "calibration"]
    duplicated = summary[summary.duplicated(keys, keep=False)]
    assert duplicated.empty, duplicated[keys]

    alphas = session.config["sweep"]["alphas"]
    cells = [(ID_DOMAIN, "val"), (ID_DOMAIN, "test"), *[(d, "test") for d in OOD_DOMAINS], ("ood_average", "test")]
    runs = {("zeroshot", "default"): ["none"], ("linear_probe", "default"): ["none"],
            ("full_ft", "default"): ["none"], ("full_ft", "absent2"): ["none", "alg", "pcv"]}
    expected = {(m, v, 0, d, s, float(a), "linear", c)
                for (m, v), calibrations in runs.items() for d, s in cells for a in alphas for c in calibrations}
    got = set(summary[keys].itertuples(index=False, name=None))
    assert got == expected, f"missing {sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}"
    assert (summary["is_ood"] == summary["eval_domain"].isin([*OOD_DOMAINS, "ood_average"])).all()
    assert (summary["train_domain"] == ID_DOMAIN).all() and (summary["dataset"] == "pacs").all()
    protocol = summary.set_index(["method", "variant"])["protocol"]
    assert set(protocol.loc[("full_ft", "absent2")]) == {"class_subset"}
    assert set(protocol.drop(("full_ft", "absent2"))) == {"full"}
    assert (summary["n_seeds"] == 1).all() and (summary["accuracy_seed_std"] == 0).all()
    assert np.array_equal(summary["accuracy_seed_mean"], summary["accuracy"])
    finite = summary[["accuracy", "accuracy_ci_low", "accuracy_ci_high"]]
    assert ((finite["accuracy_ci_low"] <= finite["accuracy"] + 1e-12)
            & (finite["accuracy"] <= finite["accuracy_ci_high"] + 1e-12)).all()


def test_reference_accuracy(summary):
    """The reference model (zeroshot run = linear probe on 64 px features, 6 photos per class).

    What it reaches on this tiny subset (checked by hand): photo val 0.62, photo test 0.75, art_painting 0.39,
    sketch 0.07 (below chance: 64 px photos do not transfer to sketches). So: well above chance in-distribution,
    and the OOD average above chance; no claim per OOD domain.
    """
    ref = summary[(summary["method"] == "zeroshot") & (summary["calibration"] == "none")]
    acc = ref.groupby(["eval_domain", "split"])["accuracy"].agg(["min", "max"])
    assert (acc["min"] == acc["max"]).all(), "the zeroshot run must not depend on alpha"
    acc = acc["min"]
    chance = 1 / N_CLASSES
    assert acc[(ID_DOMAIN, "test")] > 0.4 and acc[(ID_DOMAIN, "val")] > 0.4, acc
    assert acc[("ood_average", "test")] > chance, acc
    # every run starts from the reference: alpha = 0 rows equal the zeroshot run's rows
    at0 = summary[(summary["alpha"] == 0) & (summary["calibration"] == "none")]
    per_run = at0.pivot_table(index=["eval_domain", "split"], columns=["method", "variant"], values="accuracy")
    assert per_run.sub(per_run[("zeroshot", "default")], axis=0).abs().to_numpy().max() == 0, per_run


def test_ood_average_is_the_mean_of_the_ood_domains(summary):
    keys = ["method", "variant", "seed", "alpha", "interpolation", "calibration"]
    ood = summary[summary["eval_domain"].isin(OOD_DOMAINS) & (summary["split"] == "test")]
    mean = ood.groupby(keys).agg(accuracy=("accuracy", "mean"), n=("n", "sum"), domains=("eval_domain", "nunique"))
    avg = summary[summary["eval_domain"] == "ood_average"].set_index(keys)
    assert (mean["domains"] == len(OOD_DOMAINS)).all()
    joined = avg.join(mean.add_suffix("_domains"), how="outer")
    assert not joined[["accuracy", "accuracy_domains"]].isna().any().any()
    np.testing.assert_allclose(joined["accuracy"], joined["accuracy_domains"], rtol=0, atol=1e-12)
    assert (joined["n"] == joined["n_domains"]).all()


def test_selected_alpha_is_one_alpha_per_run_chosen_on_id_val(summary):
    keys = ["method", "variant", "seed", "interpolation", "calibration"]
    for key, group in summary.groupby(keys):
        chosen = group.loc[group["selected_alpha"], "alpha"].unique()
        assert len(chosen) == 1, f"{key}: selected alphas {chosen}"
        # every row of the chosen alpha is flagged, no other row
        assert group["selected_alpha"].to_numpy().tolist() == (group["alpha"] == chosen[0]).to_numpy().tolist()
        val = group[(group["eval_domain"] == ID_DOMAIN) & (group["split"] == "val")].sort_values("alpha")
        # seen-class accuracy (= accuracy without absent classes): absent-class labels never choose alpha
        best = val.loc[val["seen_accuracy"] == val["seen_accuracy"].max(), "alpha"].min()  # ties: the smaller alpha
        assert chosen[0] == best, f"{key}: selected {chosen[0]}, ID val accuracies {val[['alpha', 'seen_accuracy']].values}"


def test_calibration_rows_only_for_the_class_subset_run(summary):
    calibrated = summary[summary["calibration"].isin(["alg", "pcv"])]
    assert set(zip(calibrated["method"], calibrated["variant"])) == {("full_ft", "absent2")}
    assert set(calibrated["calibration"]) == {"alg", "pcv"}
    subset = summary[summary["variant"] == "absent2"]
    assert (subset.loc[subset["calibration"] == "none", "gamma"] == 0).all()
    assert np.isfinite(calibrated["gamma"]).all()
    # absent classes (giraffe, house) are evaluated: every eval split has absent-class examples
    assert (subset["n_absent"] > 0).all() and (subset["n_seen"] + subset["n_absent"] == subset["n"]).all()
    others = summary[summary["variant"] != "absent2"]
    assert (others["n_absent"] == 0).all()


def test_every_run_dir_is_complete(session):
    from robustft.training.run import read_train_log

    config = _resolved(session.config)
    for method, variants in config["methods"].items():
        for variant in variants:
            run_dir = _run_dir(session.workdir, method, variant)
            for name in ("run.json", "train_log.parquet", "sweep_logits.h5", "metrics.parquet",
                         "calibration_curve.parquet"):
                assert (run_dir / name).is_file(), f"{run_dir / name} missing"
            assert not run_dir.with_name(run_dir.name + ".resume").exists(), "resume folder left after completion"
            run = json.loads((run_dir / "run.json").read_text())
            checkpoint = run["checkpoint"]["file"]
            if method == "zeroshot":
                assert checkpoint is None and run["checkpoint"]["size_bytes"] == 0
            else:
                assert (run_dir / checkpoint).is_file(), f"{run_dir / checkpoint} missing"
                assert (run_dir / checkpoint).stat().st_size == run["checkpoint"]["size_bytes"]
                assert len(read_train_log(run_dir)) == run["steps"] > 0
            versions = run["versions"]
            assert versions["torch"] == torch.__version__ and versions["numpy"] == np.__version__ and versions["python"]
            assert isinstance(run["pipeline_commit"], str) and len(run["pipeline_commit"].split("-")[0]) == 40
            hp = run["hyperparameters"]
            written = {**config["training"], **config["methods"][method][variant]}  # no defaults filled in
            sources = run["hyperparameter_sources"]
            for key in ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "checkpoint_every"):
                if key in written:
                    assert hp[key] == written[key], f"{method}/{variant}: {key} = {hp[key]}, config {written[key]}"
                    assert sources[key] in ("training", "variant"), (method, variant, key, sources[key])
                else:
                    assert sources[key] in ("method default", "shared default"), (method, variant, key, sources[key])
            assert hp["protocol"]["kind"] == ("class_subset" if variant == "absent2" else "full")
            assert run["resumed_at_step"] is None
    absent = json.loads((_run_dir(session.workdir, "full_ft", "absent2") / "run.json").read_text())
    assert sorted(absent["absent_classes"]) == ["giraffe", "house"]
    for fold in range(config["calibration"]["pcv_folds"]):
        fold_dir = _run_dir(session.workdir, "full_ft", "absent2") / "pcv" / f"fold{fold}"
        assert (fold_dir / "run.json").is_file() and (fold_dir / "val_logits.h5").is_file()


# --------------------------------------------------------------------------------------- 3. WiSE-FT exactness


def _sweep(path: Path) -> tuple[list[float], dict]:
    from robustft.pipeline.analysis import read_sweep_logits

    return read_sweep_logits(path)


def _model_and_reference(workdir: Path, config: dict):
    from robustft.backbones import build_backbone
    from robustft.evaluation import build_classifier
    from robustft.pipeline.analysis import reference_state

    backbone = build_backbone(_backbone_spec(config))
    model = build_classifier(backbone, N_CLASSES)
    heads = list((workdir / "results").glob("*/*/reference/head.safetensors"))
    assert heads == [study_dir(workdir, config) / "reference" / "head.safetensors"], heads
    return backbone, model, reference_state(model, heads[0])


def _pixels(workdir: Path, split_name: str):
    from robustft.data.pixels import load_pixel_split

    paths = list((workdir / "results" / "pixels").rglob(f"{split_name}-*.h5"))
    assert len(paths) == 1, paths
    return load_pixel_split(paths[0])


def _assert_logits_match(got: np.ndarray, want: np.ndarray, what: str, atol: float) -> None:
    """Close (bit-identical on one CPU so far; a tolerance for other thread counts) and the same predictions."""
    assert got.shape == want.shape, f"{what}: shapes {got.shape} vs {want.shape}"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=what)
    agree = got.argmax(1) == want.argmax(1)
    assert agree.all(), f"{what}: predictions differ on {int((~agree).sum())} of {len(agree)} images"


def test_wise_ft_endpoints_of_the_full_ft_sweep(session):
    from robustft.evaluation import predict_logits
    from robustft.training.run import load_run_state

    alphas, full = _sweep(_run_dir(session.workdir, "full_ft", "default") / "sweep_logits.h5")
    _, reference = _sweep(_run_dir(session.workdir, "zeroshot", "default") / "sweep_logits.h5")
    assert alphas[0] == 0.0 and alphas[-1] == 1.0
    backbone, model, ref_state = _model_and_reference(session.workdir, session.config)
    finetuned = load_run_state(_run_dir(session.workdir, "full_ft", "default"), ref_state)
    assert any(not torch.equal(ref_state[k], finetuned[k]) for k in ref_state if k.startswith("encoder."))
    model.load_state_dict(finetuned)
    assert set(full) == set(reference) == {f"{ID_DOMAIN}_val", f"{ID_DOMAIN}_test", *[f"{d}_test" for d in OOD_DOMAINS]}
    for name, split in full.items():
        # alpha = 0 is the reference model, i.e. the zeroshot run's predictions: both are the reference head on the
        # same cached features, so bit-identical
        zero = split["logits"]["linear"][0]
        assert np.array_equal(split["labels"], reference[name]["labels"])
        assert np.array_equal(zero, reference[name]["logits"]["linear"][0]), f"{name}: alpha=0 is not the reference"
        # alpha = 1 is the fine-tuned model itself, run on the pixel cache
        pixels = _pixels(session.workdir, name)
        assert np.array_equal(pixels.labels.numpy(), split["labels"])
        own = predict_logits(model, pixels.pixels, backbone.preprocessing, torch.device("cpu"), 256)
        _assert_logits_match(split["logits"]["linear"][-1], own, f"{name}: alpha=1 vs fine-tuned model", 1e-5)
        # in between: not simply one of the endpoints
        assert not np.array_equal(split["logits"]["linear"][1], zero)


def test_head_only_sweep_equals_interpolating_full_state_dicts(session):
    """linear_probe's sweep runs heads on cached features; it must equal theta(alpha) of the whole classifier."""
    from robustft.evaluation import predict_logits
    from robustft.interpolation import interpolate_state_dicts
    from robustft.training.run import load_run_state

    run_dir = _run_dir(session.workdir, "linear_probe", "default")
    alphas, sweep = _sweep(run_dir / "sweep_logits.h5")
    with h5py.File(run_dir / "sweep_logits.h5", "r") as handle:
        assert bool(handle.attrs["head_only"])
    backbone, model, ref_state = _model_and_reference(session.workdir, session.config)
    finetuned = load_run_state(run_dir, ref_state)
    assert not torch.equal(ref_state["head.weight"], finetuned["head.weight"])
    pixels = {name: _pixels(session.workdir, name) for name in sweep}
    for i, alpha in enumerate(alphas):
        model.load_state_dict(interpolate_state_dicts(ref_state, finetuned, alpha))
        for name, split in sweep.items():
            own = predict_logits(model, pixels[name].pixels, backbone.preprocessing, torch.device("cpu"), 256)
            _assert_logits_match(split["logits"]["linear"][i], own, f"{name} alpha={alpha}: features vs pixels", 1e-5)


# ------------------------------------------------------------------------------------- 4. rerun only what changed


def _dry_run_blocks(proc) -> list[dict]:
    """(rule, wildcards, reason) of every job a ``snakemake -n`` would run."""
    jobs, current = [], None
    for line in (proc.stdout + proc.stderr).splitlines():
        stripped = line.strip()
        if (line.startswith("rule ") or line.startswith("localrule ")) and stripped.endswith(":"):
            current = {"rule": stripped.split()[1].rstrip(":"), "wildcards": {}, "reason": ""}
            jobs.append(current)
        elif current is not None and stripped.startswith("reason:"):
            current["reason"] = stripped[len("reason:"):].strip()
        elif current is not None and stripped.startswith("wildcards:"):
            for part in stripped[len("wildcards:"):].split(","):
                key, _, value = part.strip().partition("=")
                current["wildcards"][key] = value
        elif not line.startswith(" "):
            current = None if not stripped.startswith("[") else current
    return jobs


def test_a_changed_hyperparameter_reruns_only_its_variant(session, tmp_path):
    config = json.loads(json.dumps(session.config))
    config["methods"]["full_ft"]["default"]["lr"] = 3.0e-4
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = run_snakemake(session.workdir, "-n", configfile=changed, timeout=300)
    assert proc.returncode == 0, output_tail(proc)
    jobs = _dry_run_blocks(proc)
    stats = dry_run_jobs(proc)
    assert sum(stats.values()) == len(jobs), (stats, jobs)
    per_run = {(j["rule"], j["wildcards"].get("method"), j["wildcards"].get("variant")) for j in jobs
               if j["rule"] not in AFTER_SUMMARY}
    assert per_run == {(rule, "full_ft", "default") for rule in ("finetune", "sweep", "calibrate")}, \
        f"would rerun {sorted(per_run)}\n{output_tail(proc)}"
    assert {j["rule"] for j in jobs} - {"finetune", "sweep", "calibrate"} <= AFTER_SUMMARY
    assert "summary" in stats
    # the finetune job reruns because of its params (the variant's resolved settings), not for any other reason.
    # (`snakemake --list-changes params` is no help here: in Snakemake 9.27 it lists every output that has
    # metadata, changed or not - persistence.ParamsChange.__or__ keeps the files of an empty change.)
    finetune = next(j for j in jobs if j["rule"] == "finetune")
    assert finetune["reason"].startswith("Params have changed since last execution"), finetune["reason"]
    assert '"lr":0.0003' in finetune["reason"], finetune["reason"]


def test_unchanged_config_has_nothing_to_do(session):
    proc = run_snakemake(session.workdir, "-n", timeout=300)
    assert proc.returncode == 0, output_tail(proc)
    assert dry_run_jobs(proc) == {}, (
        "a no-op rerun would run jobs (did library code or a rule change while the tests ran?)\n" + output_tail(proc))
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_snakemake_report_of_the_finished_pipeline(session):
    """``snakemake --report report.html`` on the finished pipeline: one page holding every registered figure and the
    leaderboard (issue #18 item 6)."""
    from robustft.report import CHART_NAMES

    out = session.workdir / "report.html"
    proc = run_snakemake(session.workdir, "--report", str(out), timeout=300)
    assert proc.returncode == 0 and out.is_file(), output_tail(proc)
    page = out.read_text(errors="replace")
    for name in (*CHART_NAMES, "leaderboard"):
        assert f"{name}" in page, f"{name} missing from snakemake's report"
    assert len(page) > 100_000  # the figures are embedded


def test_analysis_tables_of_the_finished_pipeline(session, summary):
    """results/analysis/: effective robustness of every OOD point (fitted lines on PACS), the paired tests of every
    trained method's selected point, the recommendation under the config's default floor (best-1)."""
    folder = session.workdir / "results" / "analysis"
    er = pd.read_parquet(folder / "effective_robustness.parquet")
    assert set(er["eval_domain"]) == {*OOD_DOMAINS, "ood_average"}
    assert set(er.loc[er["eval_domain"] != "ood_average", "baseline_kind"]) <= {"fitted", "none"}
    paired = pd.read_parquet(folder / "paired_tests.parquet")
    assert set(paired["method"]) == {"linear_probe", "full_ft"} and set(paired["against"]) == {"reference", "full_ft"}
    assert (paired["correction"] == "holm").all() and paired["p_holm"].between(0, 1).all()
    rec = pd.read_parquet(folder / "recommendation.parquet")
    assert len(rec) and rec["best"].sum() == 1 and (rec["id_val_accuracy"] >= rec["id_floor"] - 1e-12).all()


def test_fisher_sweep_reruns_only_the_sweeps_and_shares_the_linear_end_points(session, tmp_path):
    """``sweep.fisher`` adds the Fisher-weighted merge: only the sweeps (and what reads them) rerun, the sweep now
    reads the ID training pixels, and the merge's end points are the reference and the fine-tuned model."""
    workdir = tmp_path / "fisher"
    shutil.copytree(session.workdir, workdir, symlinks=True)  # keeps mtimes; .snakemake's metadata comes along
    config = json.loads(json.dumps(session.config))
    config.setdefault("sweep", {}).update(fisher=True, fisher_examples=16)
    write_config(workdir, config)
    proc = run_snakemake(workdir, "-n", timeout=300)
    assert proc.returncode == 0, output_tail(proc)
    per_run = {j["rule"] for j in _dry_run_blocks(proc)} - AFTER_SUMMARY
    assert per_run == {"sweep", "calibrate"}, f"would rerun {sorted(per_run)}\n{output_tail(proc)}"
    run_pipeline(workdir, SUMMARY)
    alphas, sweep = _sweep(_run_dir(workdir, "full_ft", "default") / "sweep_logits.h5")
    for name, split in sweep.items():
        fisher, linear = split["logits"]["fisher"], split["logits"]["linear"]
        assert fisher.shape == linear.shape == (len(alphas), len(split["labels"]), N_CLASSES)
        assert np.array_equal(fisher[0], linear[0]), f"{name}: alpha=0 is not the reference model"
        _assert_logits_match(fisher[-1], linear[-1], f"{name}: alpha=1 is not the fine-tuned model", 1e-4)
    rows = read_summary(workdir)
    fisher_runs = set(rows.loc[rows["interpolation"] == "fisher", "method"])
    assert fisher_runs == {"full_ft"}, f"Fisher rows for {sorted(fisher_runs)} (head-only runs have no Fisher merge)"
    assert set(rows.loc[rows["interpolation"] == "linear", "method"]) == {"zeroshot", "linear_probe", "full_ft"}


# ------------------------------------------------------------------------------------------ 5. kill and resume


@pytest.fixture(scope="module")
def sub_killed(tmp_path_factory, sub_config) -> SimpleNamespace:
    """The restricted config, SIGKILLed mid feature extraction, then mid fine-tuning, then run to completion."""
    assert workflow_profile().get("rerun-incomplete") is True, (
        "profiles/default/config.yaml no longer sets rerun-incomplete: a plain rerun after a kill then stops at the "
        "killed job's incomplete output")
    workdir = tmp_path_factory.mktemp("sub_killed")
    write_config(workdir, sub_config)
    rng = random.Random(KILL_SEED)
    features = workdir / "results" / "features"
    run_dir = _run_dir(workdir, "full_ft", "default")
    resume = run_dir.with_name(run_dir.name + ".resume") / "resume.pt"
    notes = {"kill_seed": KILL_SEED}

    # 1. while a feature cache is being written (its temporary file exists)
    def feature_tmp() -> list[Path]:
        return sorted(features.rglob(".*.tmp")) if features.is_dir() else []

    delay = rng.uniform(0.0, 0.15)  # the cache is written within a fraction of a second
    first = run_and_kill(workdir, lambda: bool(feature_tmp()), delay, SUMMARY)
    notes["features"] = {"delay_s": round(delay, 3), "killed": first["killed"],
                         "tmp_after_kill": [p.name for p in feature_tmp()],
                         "complete_after_kill": sorted(p.name for p in features.rglob("*.h5"))}
    assert first["killed"], f"snakemake ended before a feature extraction was seen ({notes})\n{first['output'][-4000:]}"

    unlock = run_snakemake(workdir, "--unlock", timeout=120)
    assert unlock.returncode == 0, output_tail(unlock)

    # 2. while full_ft is training (its first resume checkpoint exists, its run.json does not)
    delay = rng.uniform(0.0, 0.6)
    second = run_and_kill(workdir, resume.is_file, delay, SUMMARY)
    saved = torch.load(resume, map_location="cpu", weights_only=True) if resume.is_file() else None
    notes["finetune"] = {"delay_s": round(delay, 3), "killed": second["killed"],
                         "run_json_after_kill": (run_dir / "run.json").exists(),
                         "checkpoint_step": None if saved is None else int(saved["step"])}
    assert second["killed"] and saved is not None and not (run_dir / "run.json").exists(), \
        f"the kill did not land inside the fine-tuning job ({notes})\n{second['output'][-4000:]}"
    del saved

    unlock = run_snakemake(workdir, "--unlock", timeout=120)
    assert unlock.returncode == 0, output_tail(unlock)
    # 3. rerun to completion (plain `snakemake`: the profile adds --rerun-incomplete)
    final = run_pipeline(workdir, SUMMARY)
    print(f"kill schedule: {notes}")
    return SimpleNamespace(workdir=workdir, config=sub_config, notes=notes, final=final,
                           outputs=[first["output"], second["output"]])


def test_killed_fine_tuning_resumes_from_its_checkpoint(sub_killed, sub_uninterrupted):
    from robustft.training.checkpoint import load_safetensors
    from robustft.training.run import read_train_log

    notes = sub_killed.notes
    killed_dir = _run_dir(sub_killed.workdir, "full_ft", "default")
    clean_dir = _run_dir(sub_uninterrupted.workdir, "full_ft", "default")
    run = json.loads((killed_dir / "run.json").read_text())
    clean = json.loads((clean_dir / "run.json").read_text())
    assert run["resumed_at_step"] == notes["finetune"]["checkpoint_step"], f"restarted instead of resuming: {notes}"
    assert clean["resumed_at_step"] is None
    assert run["steps"] == clean["steps"] and run["best_val_accuracy"] == clean["best_val_accuracy"], notes
    assert not killed_dir.with_name(killed_dir.name + ".resume").exists()
    # the same weights and the same per-step log (but its throughput column) as the uninterrupted run
    a, b = load_safetensors(killed_dir / "model.safetensors"), load_safetensors(clean_dir / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after resuming, e.g. {different[:3]} ({notes})"
    log_a = read_train_log(killed_dir).drop(columns="samples_per_s")
    log_b = read_train_log(clean_dir).drop(columns="samples_per_s")
    pd.testing.assert_frame_equal(log_a, log_b, check_exact=True, obj=f"train log ({notes})")


def test_killed_pipeline_accepts_no_corrupt_file_and_ends_with_the_same_summary(sub_killed, sub_uninterrupted):
    from robustft.data.pixels import load_pixel_split
    from robustft.features import load_features

    notes = sub_killed.notes
    for kind, loader in (("features", load_features), ("pixels", load_pixel_split)):
        killed = sorted((sub_killed.workdir / "results" / kind).rglob("*.h5"))
        clean = sorted((sub_uninterrupted.workdir / "results" / kind).rglob("*.h5"))
        assert [p.relative_to(sub_killed.workdir) for p in killed] == [p.relative_to(sub_uninterrupted.workdir)
                                                                       for p in clean]
        for x, y in zip(killed, clean):
            got, want = loader(x), loader(y)
            items = got.items() if isinstance(got, dict) else vars(got).items()
            for key, value in items:
                other = want[key] if isinstance(want, dict) else getattr(want, key)
                assert torch.equal(value, other), f"{x}: {key} differs from the uninterrupted run ({notes})"
    message = summaries_equal_message(read_summary(sub_killed.workdir),
                                      read_summary(sub_uninterrupted.workdir))
    assert message is None, f"{message} (kill schedule {notes})"


def test_sigkill_leaves_only_temporary_files_behind(sub_killed):
    """A SIGKILL cannot clean up after itself; list what it left (for the report), fail only on accepted garbage."""
    leftovers = sorted(str(p.relative_to(sub_killed.workdir)) for p in (sub_killed.workdir / "results").rglob(".*.tmp"))
    if leftovers:
        print(f"temporary files left by SIGKILL (never read): {leftovers}")
    # whatever was left is named as a temporary file: no final output name was ever given to a partial file
    for path in leftovers:
        assert Path(path).name.startswith(".") and path.endswith(".tmp")


# ------------------------------------------------------------------------------------------ 6. reproducibility


def test_two_runs_of_the_same_config_give_identical_summaries(session, summary, sub_uninterrupted):
    """The restricted config's runs against the same runs in the session's run (another folder, same settings)."""
    other = read_summary(sub_uninterrupted.workdir)
    mine = summary[[(m, v) in SUB_RUNS for m, v in zip(summary["method"], summary["variant"])]]
    assert len(mine) == len(other) > 0
    message = summaries_equal_message(mine, other)
    assert message is None, message
    differing = [c for c in TIMING_COLUMNS if not comparable(mine, ())[c].equals(comparable(other, ())[c])]
    print(f"timing columns that differ between the two runs: {differing}")


# --------------------------------------------------------------------------------------- 7. corrupt image input


def test_a_corrupt_image_fails_the_manifest_job_and_leaves_nothing(tmp_path):
    root = _linked_pacs(tmp_path / "PACS", [ID_DOMAIN, OOD_DOMAINS[0]])  # links: one file can be replaced
    victim = sorted((root / ID_DOMAIN / "dog").iterdir())[3]
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[: len(data) // 3])  # a truncated JPEG
    workdir = tmp_path / "work"
    write_config(workdir, tiny_config({"dataset": {"root": str(root), "ood_domains": [OOD_DOMAINS[0]]}}))
    proc = run_snakemake(workdir, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, output_tail(proc)
    lines = [line for line in text.splitlines() if line.startswith("robustft: ")]
    assert lines and str(victim) in lines[0], f"no one-line robustft message naming {victim}:\n{output_tail(proc)}"
    data_dir = workdir / "results" / "data"
    assert not list(data_dir.rglob("manifest.parquet")) if data_dir.exists() else True
    leftovers = list((workdir / "results").rglob(".*.tmp")) if (workdir / "results").exists() else []
    assert not leftovers, leftovers
    assert not (workdir / "results" / "pixels").exists()


# ------------------------------------------------------------------------------------- bad input through the pipeline


def _linked_pacs(root: Path, domains: list[str]) -> Path:
    """A copy of ``domains`` of PACS made of symbolic links (folders real, so they can be emptied or removed)."""
    for domain in domains:
        shutil.copytree(PACS_ROOT / domain, root / domain, symlinks=True,
                        copy_function=lambda src, dst: os.symlink(os.path.realpath(src), dst))
    return root


def _manifest_of(config: dict) -> str:
    return f"results/data/{only_study(config)['data']}/manifest.parquet"


def _reference_of(config: dict) -> str:
    return f"results/{only_study(config)['study']}/reference"


def _bad_input_case(case: str, tmp_path: Path, tiny_clip: dict) -> tuple[dict, str, list[str]]:
    """(config, text the one-line message must contain, outputs that must not exist) for one kind of bad input."""
    domains = [ID_DOMAIN, OOD_DOMAINS[0]]
    dataset = {"ood_domains": [OOD_DOMAINS[0]]}
    config = tiny_config({"dataset": dataset})
    if case == "missing_root":
        config["dataset"].update(root=str(tmp_path / "nowhere" / "PACS"), fetch=False)  # fetch: tested apart
        return config, str(tmp_path / "nowhere" / "PACS"), [_manifest_of(config)]
    root = _linked_pacs(tmp_path / "PACS", domains)
    config["dataset"]["root"] = str(root)
    if case == "empty_class_folder":
        for link in (root / OOD_DOMAINS[0] / "horse").iterdir():
            link.unlink()
        return config, str(root / OOD_DOMAINS[0] / "horse"), [_manifest_of(config)]
    if case == "classes_differ":
        shutil.rmtree(root / OOD_DOMAINS[0] / "guitar")
        return config, "guitar", [_manifest_of(config)]
    if case == "non_image_file":
        victim = sorted((root / ID_DOMAIN / "house").iterdir())[0]  # same count: replaced, not added
        victim.unlink()
        victim.write_text("not an image\n")
        return config, str(victim), [_manifest_of(config)]
    if case == "kshot_larger_than_a_class":  # k-shot needs an open_clip backbone (config validation)
        config["backbone"] = {"name": "open_clip", "model": tiny_clip["model"],
                              "model_config": tiny_clip["model_config"], "pretrained": tiny_clip["checkpoint"]}
        config["methods"] = {"full_ft": {"k50": {"protocol": {"kind": "kshot", "k": 50}}}}
        return config, "fewer than k=50", [f"results/{only_study(config)['study']}/runs/full_ft/k50/seed0/run.json"]
    if case == "weights_file_not_a_checkpoint":
        weights = tmp_path / "weights.bin"
        weights.write_bytes(b"\x80\x04 not a checkpoint")
        config["backbone"]["weights"] = str(weights)
        return config, str(weights), [_reference_of(config)]
    if case == "open_clip_tag_offline":
        config["backbone"] = {"name": "open_clip", "model": "RN50", "pretrained": "openai", "image_size": 64}
        config["methods"] = {"zeroshot": {"default": {}}}
        return config, "RN50", [_reference_of(config)]
    raise ValueError(case)


BAD_INPUTS = ["missing_root", "empty_class_folder", "classes_differ", "non_image_file", "kshot_larger_than_a_class",
              "weights_file_not_a_checkpoint", "open_clip_tag_offline"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_stops_the_run_with_one_line_and_leaves_no_partial_output(case, tmp_path, monkeypatch,
                                                                           tiny_open_clip):
    """Each: a non-zero exit, one ``robustft: ...`` line naming the offending file, value or class, no partial file."""
    config, named, absent = _bad_input_case(case, tmp_path, tiny_open_clip)
    workdir = tmp_path / "work"
    write_config(workdir, config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # open_clip: no network here, and none wanted in a test
    proc = run_snakemake(workdir, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, output_tail(proc)
    lines = [line for line in text.splitlines() if line.startswith("robustft: ")]
    assert lines, f"no one-line robustft message:\n{output_tail(proc)}"
    assert any(named in line for line in lines), f"no message naming {named!r}: {lines}"
    assert all("\n" not in line and "(log: " in line for line in lines), lines
    results = workdir / "results"
    for path in absent:
        assert not (workdir / path).exists(), f"{path} exists after the failure"
    leftovers = [p for p in results.rglob("*.tmp")] if results.exists() else []
    assert not leftovers, leftovers
    assert not (results / "summary.parquet").exists()
