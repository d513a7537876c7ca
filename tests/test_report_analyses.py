"""The report's analysis sections (issue #18 items 1-3): effective robustness chart and table, paired comparisons,
the recommendation, the leaderboard's marks; the page rendered in headless Chromium at 1400 px."""

from __future__ import annotations

import pandas as pd
import pytest

from robustft.recommend import recommendation_stage
from robustft.report import CHART_NAMES
from robustft.report.analyses import MARKS_COLUMN, effective_robustness_points
from robustft.report.page import write_report
from robustft.robustness import effective_robustness_stage
from robustft.significance import paired_tests_stage
from test_report import CONFIG, OOD, TRAINED, assert_fits_and_shows, make_results, render_in_chromium


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysed")
    inputs = make_results(root)
    metrics = [str(p).replace("calibration_curve.parquet", "metrics.parquet") for p in inputs["curves"]]
    folder = root / "results" / "analysis"
    paths = {name: folder / f"{name}.parquet" for name in ("effective_robustness", "paired_tests", "recommendation")}
    effective_robustness_stage(summary=str(inputs["summary"]), bootstrap=200, ci_level=0.95,
                               out=str(paths["effective_robustness"]))
    paired_tests_stage(summary=str(inputs["summary"]), metrics=metrics, run_studies=inputs["run_studies"],
                       bootstrap=200, ci_level=0.95, out=str(paths["paired_tests"]))
    recommendation_stage(summary=str(inputs["summary"]), metrics=metrics, run_studies=inputs["run_studies"],
                         id_floor="best-3", bootstrap=200, ci_level=0.95, out=str(paths["recommendation"]))
    out = root / "results" / "report"
    written = write_report(inputs["summary"], inputs["curves"], inputs["logs"], CONFIG, out, png_scale=1.0,
                           analysis_paths=paths, per_class_paths=inputs["per_class"])
    return {"root": root, "out": out, "written": written, "paths": paths,
            "tables": {k: pd.read_parquet(v) for k, v in paths.items()}}


def test_tables_are_written_with_their_columns(analysed):
    from robustft.recommend import RECOMMEND_COLUMNS
    from robustft.robustness import ER_COLUMNS
    from robustft.significance import PAIRED_COLUMNS

    tables = analysed["tables"]
    assert tuple(tables["effective_robustness"].columns) == ER_COLUMNS
    assert tuple(tables["paired_tests"].columns) == PAIRED_COLUMNS
    assert tuple(tables["recommendation"].columns) == RECOMMEND_COLUMNS
    er = tables["effective_robustness"]
    assert set(er["eval_domain"]) == {*OOD, "ood_average"} and (er["baseline_kind"].str.contains("fitted")).all()


def test_page_shows_every_analysis(analysed):
    page = (analysed["out"] / "index.html").read_text()
    for section in ("effective_robustness", "paired_tests", "recommendation"):
        assert f"<section id=\"{section}\">" in page
    assert "Holm" in page and "McNemar" in page and "fitted" in page and "best-3" in page
    assert page.count(MARKS_COLUMN) >= 2  # the leaderboard's column and its caption
    assert set(analysed["written"]) >= {f"{name}.png" for name in CHART_NAMES}
    points = effective_robustness_points(analysed["tables"]["effective_robustness"])
    # per OOD domain: every trained series' alphas and the reference once
    from test_report import ALPHAS

    assert len(points) == len(OOD) * (len(TRAINED) * len(ALPHAS) + 1)


@pytest.mark.browser
def test_page_with_analyses_renders_in_chromium(analysed, tmp_path):
    rendered = render_in_chromium(analysed["out"] / "index.html", tmp_path / "profile")
    assert_fits_and_shows(rendered)
    counts = rendered["found"]["effective_robustness"]["counts"]
    points = effective_robustness_points(analysed["tables"]["effective_robustness"])
    assert counts["er_points_marks"] == len(points)
    assert counts["er_paths_marks"] == len(OOD) * (len(TRAINED) + 1)
    assert counts["er_baseline_marks"] == len(OOD)
