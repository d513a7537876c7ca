"""The recommendation under an ID floor (robustft.recommend) and its command, ``python -m robustft recommend``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustft.recommend import (
    IdFloor,
    candidates,
    parse_id_floor,
    rank_under_floor,
    recommend_from_results,
    recommendation_display,
)

REPO = Path(__file__).resolve().parents[1]


def test_parse_id_floor():
    assert parse_id_floor("0.9") == IdFloor("absolute", 0.9, "0.9")
    assert parse_id_floor(0.85).kind == "absolute"
    floor = parse_id_floor("best-2")
    assert floor.kind == "relative" and floor.value == pytest.approx(0.02) and floor.threshold(0.9) == pytest.approx(0.88)
    assert parse_id_floor(" best - 0.5 ").value == pytest.approx(0.005)
    with pytest.raises(ValueError, match="id floor '90': an absolute floor is an accuracy in"):
        parse_id_floor("90")
    with pytest.raises(ValueError, match="id floor 'top-2'"):
        parse_id_floor("top-2")


def _points():
    # (method, alpha, id_val, ood): the best OOD point (full_ft 0.5) misses a floor of best-2
    spec = [("zeroshot", 0.0, 0.80, 0.60), ("full_ft", 0.5, 0.86, 0.70), ("full_ft", 1.0, 0.90, 0.55),
            ("l2sp", 0.5, 0.885, 0.66), ("l2sp", 1.0, 0.895, 0.62)]
    return pd.DataFrame([{"study": "s", "method": m, "variant": "default", "protocol": "full",
                          "interpolation": "linear", "calibration": "none", "alpha": a, "id_val_accuracy": v,
                          "ood_accuracy": o} for m, a, v, o in spec])


def test_floor_is_checked_on_id_validation_and_ranks_by_ood():
    ranked = rank_under_floor(_points(), parse_id_floor("best-2"))
    assert ranked["id_floor"].iloc[0] == pytest.approx(0.88)
    assert list(zip(ranked["method"], ranked["alpha"])) == [("l2sp", 0.5), ("l2sp", 1.0), ("full_ft", 1.0)]
    assert list(ranked["rank"]) == [1, 2, 3]
    everything = rank_under_floor(_points(), parse_id_floor("0"))
    assert (everything["method"].iloc[0], everything["alpha"].iloc[0]) == ("full_ft", 0.5)
    assert rank_under_floor(_points(), parse_id_floor("0.95")).empty


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from test_report import make_results

    root = tmp_path_factory.mktemp("recommend")
    inputs = make_results(root)
    return {**inputs, "root": root, "summary_frame": pd.read_parquet(inputs["summary"])}


def test_candidates_average_seeds_and_keep_the_reference_once(results):
    summary = results["summary_frame"]
    points = candidates(summary)
    ref = points[points["method"] == "zeroshot"]
    assert len(ref) == 1 and ref["alpha"].iloc[0] == 0
    assert (points.loc[points["method"] != "zeroshot", "alpha"] > 0).all()
    one = points[(points["method"] == "kd") & (points["alpha"] == 0.5)].iloc[0]
    rows = summary[(summary["method"] == "kd") & (summary["alpha"] == 0.5)]
    assert one["id_val_accuracy"] == pytest.approx(rows.loc[rows["split"] == "val", "seen_accuracy"].mean())
    assert one["ood_accuracy"] == pytest.approx(rows.loc[rows["eval_domain"] == "ood_average", "accuracy"].mean())
    assert one["n_seeds"] == 2
    # the class-subset run's calibrations are candidates of their own
    assert set(points.loc[points["variant"] == "absent3", "calibration"]) == {"none", "alg", "pcv"}


def test_recommendation_table_on_a_synthetic_results_folder(results):
    table = recommend_from_results(results["root"] / "results", "best-3", bootstrap=300)
    points = candidates(results["summary_frame"])
    threshold = points["id_val_accuracy"].max() - 0.03
    cleared = points[points["id_val_accuracy"] >= threshold - 1e-12]
    assert len(table) == len(cleared) and (table["id_val_accuracy"] >= table["id_floor"] - 1e-12).all()
    best = table[table["best"]].iloc[0]
    assert best["rank"] == 1 and best["ood_accuracy"] == pytest.approx(cleared["ood_accuracy"].max())
    assert best["ood_ci_low"] < best["ood_accuracy"] < best["ood_ci_high"]
    others = table[~table["best"]]
    assert (others["difference_to_best"] <= 1e-12).all()
    assert (others["p_holm"] >= others["p_value"]).all()
    # tied exactly where Holm's adjusted p (McNemar / sign test) is not below the level
    assert (others["tied_with_best"] == (others["p_holm"] >= 0.05)).all()
    assert (table["floor"] == "best-3").all() and (table["correction"] == "holm").all()
    shown = recommendation_display(table, top=3)
    assert shown["tied"].iloc[0] == "best" and len(shown) >= min(3, len(table))


def test_recommend_command(results):
    proc = subprocess.run([sys.executable, "-m", "robustft", "recommend", "--id-floor", "best-3", "--results",
                           str(results["root"] / "results"), "--bootstrap", "200", "--top", "4"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ID floor best-3 -> ID val >=" in proc.stdout and "best" in proc.stdout and "holm" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "robustft", "recommend", "--id-floor", "95", "--results",
                          str(results["root"] / "results")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "id floor '95'" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "robustft", "recommend", "--id-floor", "0.5", "--results",
                              str(results["root"] / "nowhere")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert missing.returncode == 2 and "summary.parquet: no summary" in missing.stderr
