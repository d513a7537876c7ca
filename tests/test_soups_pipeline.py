"""End to end on the tiny PACS config: two full_ft variants give a uniform and a greedy soup, each a run of its own
with sweep, calibration and rows in the summary, and the study's per-class table covers runs and soups."""

from __future__ import annotations

import json

import pytest

from pipeline_utils import DELETE, PACS_ROOT, read_summary, run_pipeline, study_dir, tiny_config, write_config

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.skipif(not PACS_ROOT.is_dir(), reason=f"PACS not found at {PACS_ROOT}"),
]

#: Two full-protocol variants of full_ft (the soup's ingredients), a 2-point alpha grid: the cheapest soup study.
CONFIG = {"methods": {"zeroshot": DELETE, "linear_probe": DELETE,
                      "full_ft": {"absent2": DELETE, "lr3": {"lr": 3.0e-4}}},
          "soups": {"methods": ["full_ft"], "mixed": []}, "sweep": {"alphas": [0.0, 1.0]}, "eval": {"bootstrap": 0}}


def test_soups_are_runs_with_summary_rows_and_per_class_damage(tmp_path):
    from robustft.io.tables import read_table
    from robustft.per_class import PER_CLASS_COLUMNS

    config = tiny_config(CONFIG)
    write_config(tmp_path, config)
    study = study_dir(tmp_path, config)
    per_class = study / "per_class.parquet"
    run_pipeline(tmp_path, "results/summary.parquet", str(per_class.relative_to(tmp_path)), timeout=2400)
    summary = read_summary(tmp_path)
    runs = summary[["method", "variant", "seed"]].drop_duplicates()
    assert set(map(tuple, runs.values.tolist())) == {("full_ft", "default", 0), ("full_ft", "lr3", 0),
                                                     ("uniform_soup", "full_ft", 0), ("greedy_soup", "full_ft", 0)}
    for kind in ("uniform", "greedy"):
        soup_dir = study / "runs" / f"{kind}_soup" / "full_ft" / "seed0"
        record = json.loads((soup_dir / "run.json").read_text())
        assert [s["run"] for s in record["soup"]["ingredients"]] != [] and record["checkpoint"]["size_bytes"] > 0
        rows = summary[summary["method"] == f"{kind}_soup"]
        assert set(rows["alpha"]) == {0.0, 1.0} and rows["selected_alpha"].any()
        # alpha = 0 is the reference model, the same for a soup as for its ingredients
        ref = rows[(rows["alpha"] == 0.0) & (rows["calibration"] == "none")].set_index("eval_domain")["accuracy"]
        run_ref = summary[(summary["method"] == "full_ft") & (summary["variant"] == "default")
                          & (summary["alpha"] == 0.0)].set_index("eval_domain")["accuracy"]
        assert ref.sort_index().equals(run_ref.sort_index())
        val = rows[(rows["alpha"] == 1.0) & (rows["eval_domain"] == "photo") & (rows["split"] == "val")]
        assert float(val["accuracy"].iloc[0]) == pytest.approx(record["best_val_accuracy"])
    greedy = json.loads((study / "runs" / "greedy_soup" / "full_ft" / "seed0" / "run.json").read_text())["soup"]
    assert greedy["kept"][0] == greedy["ingredients"][0]["run"] and len(greedy["ingredients"]) == 2
    table = read_table(per_class, PER_CLASS_COLUMNS)
    assert set(table["method"]) == {"full_ft", "uniform_soup", "greedy_soup"}
    assert set(table["split"]) == {"test"} and set(table["point"]) == {"fine-tuned", "chosen"}
    assert set(table["eval_domain"]) == {"photo", "art_painting", "sketch"} and table["class_name"].nunique() == 7
