"""Paired comparisons (robustft.significance): McNemar's exact test, the paired bootstrap, Holm's correction, and
the selected points of a study against the reference and full fine-tuning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustft.significance import (
    Correctness,
    compare,
    holm,
    leaderboard_marks,
    mcnemar_exact,
    paired_bootstrap_ci,
    paired_tests_table,
    run_paths,
    sign_test,
)


def test_mcnemar_exact_known_cases():
    # n10 = 10, n01 = 2: p = 2 P(X <= 2), X ~ Bin(12, 1/2) = 2 (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(3000, 2900) == pytest.approx(0.1963, abs=2e-3)  # normal approximation: z = 1.302
    with pytest.raises(ValueError, match="n10=-1"):
        mcnemar_exact(-1, 3)


def test_holm_on_a_known_vector():
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> 0.06 (monotone)
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    both = holm([0.01, np.nan, 0.02])
    assert np.isnan(both[1]) and both[[0, 2]] == pytest.approx([0.02, 0.02])


def test_a_model_against_itself_shows_no_difference():
    rng = np.random.default_rng(0)
    correct = rng.random((3, 500)) < 0.7  # three seeds
    result = compare([correct, correct[:, :200]], [correct, correct[:, :200]], n_boot=500, level=0.95)
    assert result["difference"] == 0 and result["p_value"] == 1.0
    assert result["diff_ci_low"] <= 0 <= result["diff_ci_high"]
    assert result["n_better"] == result["n_worse"] == 0 and result["n"] == 700


def test_paired_bootstrap_matches_resampling_images():
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 0.0, 1.0, 1.0], size=300)
    low, high = paired_bootstrap_ci([d], n_boot=4000, level=0.9, seed=3)
    idx = np.random.default_rng(4).integers(0, d.size, size=(4000, d.size))
    naive = np.quantile(d[idx].mean(axis=1), [0.05, 0.95])
    assert (low, high) == pytest.approx(tuple(naive), abs=0.01)
    p, better, worse = sign_test(d)
    assert (better, worse) == (int((d > 0).sum()), int((d < 0).sum())) and p < 0.05


def test_a_clearly_better_model_is_distinguishable():
    a = np.ones(400, bool)
    b = np.arange(400) % 4 != 0  # 75 %
    result = compare([a], [b], n_boot=1000, level=0.95)
    assert result["difference"] == pytest.approx(0.25) and result["diff_ci_low"] > 0.2
    assert result["p_value"] == pytest.approx(mcnemar_exact(100, 0)) and result["p_value"] < 1e-20
    with pytest.raises(ValueError, match="same"):
        compare([a], [b[:10]], n_boot=10, level=0.95)


# ----------------------------------------------------------------------------- on a synthetic results folder
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from test_report import make_results

    root = tmp_path_factory.mktemp("paired")
    inputs = make_results(root)
    metrics = [str(p).replace("calibration_curve.parquet", "metrics.parquet") for p in inputs["curves"]]
    return {**inputs, "metrics": metrics, "summary_frame": pd.read_parquet(inputs["summary"])}


def test_paired_tests_of_the_selected_points(results):
    from test_report import OOD, SEEDS, TRAINED

    summary = results["summary_frame"]
    correctness = Correctness(run_paths(results["metrics"], results["run_studies"]))
    table = paired_tests_table(summary, correctness, n_boot=200, ci_level=0.95)
    assert set(table["method"]) == {m for m, _ in TRAINED}  # the reference is not compared with itself
    assert set(table["against"]) == {"reference", "full_ft"}
    assert set(table["eval_domain"]) == {"photo", *OOD, "ood_average"}
    assert (table["correction"] == "holm").all() and np.allclose(table["level"], 0.05)
    assert (table["p_holm"] >= table["p_value"]).all() and (table["n_seeds"] == len(SEEDS)).all()
    # each row's accuracies are the summary's, seed means at each seed's chosen point
    row = table[(table["method"] == "kd") & (table["against"] == "reference") & (table["eval_domain"] == "sketch")]
    picked = summary[(summary["method"] == "kd") & summary["selected_alpha"] & (summary["eval_domain"] == "sketch")]
    ref = summary[(summary["method"] == "kd") & (summary["alpha"] == 0) & (summary["eval_domain"] == "sketch")]
    assert row["accuracy"].iloc[0] == pytest.approx(picked["accuracy"].mean())
    assert row["against_accuracy"].iloc[0] == pytest.approx(ref["accuracy"].mean())
    assert row["difference"].iloc[0] == pytest.approx(picked["accuracy"].mean() - ref["accuracy"].mean())
    # the class-subset protocol is compared with full_ft of its own protocol
    absent = table[(table["protocol"] == "class_subset") & (table["against"] == "full_ft")]
    assert set(absent["against_variant"]) == {"absent3"}
    marks = leaderboard_marks(table, summary["study"].iloc[0], "l2sp", "full")
    assert marks.count("/") == 1 and "%" not in marks
    ood = table[(table["method"] == "l2sp") & (table["eval_domain"] == "ood_average")].set_index("against")
    expected = " / ".join(("" if ood.loc[a, "distinguishable"] else "≈ ") + f"{100 * ood.loc[a, 'difference']:+.1f}"
                          for a in ("reference", "full_ft"))
    assert marks == expected


def test_missing_correctness_names_the_file(results, tmp_path):
    correctness = Correctness(run_paths(results["metrics"], results["run_studies"]))
    run = next(iter(correctness.paths))
    with pytest.raises(Exception, match="metrics.parquet: no test correctness"):
        correctness.points(run, [("photo", 0.33, "linear", "none")])
    with pytest.raises(KeyError, match="no metrics file"):
        correctness.points(("x", "y", "z", 0), [])


def test_a_sweep_without_alpha_0_or_1_skips_that_comparison(results):
    summary = results["summary_frame"]
    correctness = Correctness(run_paths(results["metrics"], results["run_studies"]))
    without_zero = paired_tests_table(summary[summary["alpha"] > 0], correctness, n_boot=50, ci_level=0.95)
    assert set(without_zero["against"]) == {"full_ft"}
    without_one = paired_tests_table(summary[summary["alpha"] < 1], correctness, n_boot=50, ci_level=0.95)
    assert set(without_one["against"]) == {"reference"}
