"""Effective robustness (robustft.robustness): probit axes, baseline lines, ER and its bootstrap interval."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustft.robustness import (
    NO_BASELINE,
    PUBLISHED_BASELINES,
    Baseline,
    clip_accuracy,
    effective_robustness,
    effective_robustness_ci,
    effective_robustness_table,
    fit_probit_line,
    inverse_probit,
    probit,
)


def test_probit_is_the_normal_quantile():
    assert probit(0.5) == pytest.approx(0.0)
    assert probit(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert inverse_probit(probit(np.array([0.01, 0.3, 0.99]))) == pytest.approx([0.01, 0.3, 0.99])
    with pytest.raises(ValueError, match="strictly inside"):
        probit([0.2, 1.0])
    assert clip_accuracy([0.0, 1.0], 10) == pytest.approx([0.05, 0.95])


def test_probit_fit_recovers_a_known_line():
    x = np.linspace(0.3, 0.95, 9)
    y = inverse_probit(0.8 * probit(x) - 0.4)
    line = fit_probit_line(x, y)
    assert line.kind == "fitted" and line.n_points == 9 and "fitted" in line.source
    assert line.slope == pytest.approx(0.8, abs=1e-9) and line.intercept == pytest.approx(-0.4, abs=1e-9)
    assert fit_probit_line([0.7, 0.7], [0.4, 0.5]) is NO_BASELINE  # one distinct ID accuracy: no line


def test_er_of_a_point_on_the_line_is_zero_and_above_it_positive():
    line = Baseline(((0.0, 0.9, -0.5),), "fitted", "test")
    x = np.array([0.4, 0.6, 0.85])
    on = inverse_probit(0.9 * probit(x) - 0.5)
    assert effective_robustness(x, on, line) == pytest.approx([0, 0, 0], abs=1e-12)
    assert effective_robustness(x, on + 0.03, line) == pytest.approx([0.03] * 3)
    low, high = effective_robustness_ci(0.6, 2000, [(float(on[1]), 2000, line)], 2000, 0.95)
    assert low < 0 < high and high - low < 0.06
    # the OOD-average interval (two domains) is narrower than one domain's
    low2, high2 = effective_robustness_ci(0.6, 2000, [(float(on[1]), 2000, line)] * 2, 2000, 0.95)
    assert high2 - low2 < high - low


def test_published_imagenet_a_line_is_piecewise():
    line = PUBLISHED_BASELINES[("imagenet", "imagenet_a")]
    below, above = line.predict([0.70, 0.80])
    assert below == pytest.approx(float(inverse_probit(0.64294 * probit(0.70) - 2.34481)))
    assert above == pytest.approx(float(inverse_probit(5.11468 * probit(0.80) - 5.42853)))
    v2 = PUBLISHED_BASELINES[("imagenet", "imagenet_v2")]
    assert v2.kind == "published" and "Taori" in v2.source
    # WiSE-FT Table 8, B/16 zero-shot: IN 68.3, V2 61.9 lies well above the line (CLIP's effective robustness)
    assert float(effective_robustness(0.683, 0.619, v2)) == pytest.approx(0.619 - float(v2.predict(0.683)))
    assert float(effective_robustness(0.683, 0.619, v2)) > 0.05


def _summary(study="s", id_domain="photo", ood=("art", "sketch"), lines=None, er=0.0):
    """A summary whose end points lie on ``lines`` (per domain) and whose alpha = 0.5 points sit ``er`` above."""
    lines = lines or {"art": (0.9, -0.3), "sketch": (1.1, -0.9)}
    rows = []
    ids = {("zeroshot", 0.0): 0.55, ("full_ft", 0.0): 0.55, ("full_ft", 0.5): 0.75, ("full_ft", 1.0): 0.85,
           ("l2sp", 0.0): 0.55, ("l2sp", 0.5): 0.7, ("l2sp", 1.0): 0.80}
    for (method, alpha), x in ids.items():
        point = dict(study=study, method=method, variant="default", seed=0, protocol="full", interpolation="linear",
                     calibration="none", alpha=alpha, selected_alpha=alpha == 0.5, train_domain=id_domain, n=20000)
        rows.append({**point, "eval_domain": id_domain, "split": "test", "is_ood": False, "accuracy": x})
        accs = []
        for d in ood:
            slope, intercept = lines[d]
            y = float(inverse_probit(slope * probit(x) + intercept)) + (er if alpha == 0.5 else 0.0)
            accs.append(y)
            rows.append({**point, "eval_domain": d, "split": "test", "is_ood": True, "accuracy": y})
        rows.append({**point, "eval_domain": "ood_average", "split": "test", "is_ood": True, "accuracy": np.mean(accs),
                     "n": 40000})
    return pd.DataFrame(rows)


def test_table_fits_the_study_end_points_and_measures_the_wise_ft_bump():
    table = effective_robustness_table(_summary(er=0.04), n_boot=500, ci_level=0.95)
    ends = table[table["end_point"]]
    assert ends["effective_robustness"].abs().max() < 1e-9  # the end points lie on the fitted line
    assert (table["baseline_kind"].isin(["fitted"]) | (table["eval_domain"] == "ood_average")).all()
    art = table[(table["eval_domain"] == "art")].iloc[0]
    assert art["baseline_slope"] == pytest.approx(0.9) and art["baseline_intercept"] == pytest.approx(-0.3)
    assert art["baseline_points"] == 3  # the reference once, two fine-tuned models
    mids = table[table["alpha"] == 0.5]
    assert mids["effective_robustness"].to_numpy() == pytest.approx([0.04] * len(mids))
    assert (mids["er_ci_low"] < 0.04).all() and (mids["er_ci_high"] > 0.04).all() and (mids["er_ci_low"] > 0).all()
    avg = mids[mids["eval_domain"] == "ood_average"]
    assert len(avg) == 2 and (avg["baseline_kind"] == "fitted").all() and avg["baseline_slope"].isna().all()


def test_table_uses_the_published_line_for_imagenet_shifts():
    v2 = PUBLISHED_BASELINES[("imagenet", "imagenet_v2")]
    summary = _summary(id_domain="imagenet", ood=("imagenet_v2",), lines={"imagenet_v2": (0.5, 0.0)})
    table = effective_robustness_table(summary, n_boot=0, ci_level=0.95)
    row = table[(table["eval_domain"] == "imagenet_v2") & (table["method"] == "full_ft") & (table["alpha"] == 1)]
    assert (table.loc[table["eval_domain"] == "imagenet_v2", "baseline_kind"] == "published").all()
    expected = float(inverse_probit(0.5 * probit(0.85))) - float(v2.predict(0.85))
    assert row["effective_robustness"].iloc[0] == pytest.approx(expected)
    assert table["er_ci_low"].isna().all()  # bootstrap 0: no intervals


def test_each_domain_keeps_its_reference_point_when_two_domains_agree():
    """Two OOD domains on the same line give the same (ID, OOD) pairs: each domain's fit still has the reference."""
    table = effective_robustness_table(_summary(lines={"art": (0.9, -0.3), "sketch": (0.9, -0.3)}), 0, 0.95)
    per_domain = table[table["eval_domain"] != "ood_average"].drop_duplicates("eval_domain")
    assert per_domain["baseline_points"].tolist() == [3, 3]
