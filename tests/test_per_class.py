"""Per-class damage (robustft.per_class): per-class accuracy deltas against the reference model on synthetic logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustft.data.adapters import EvalProjection
from robustft.per_class import (
    PER_CLASS_COLUMNS,
    chosen_alphas,
    class_deltas,
    eval_class_names,
    most_damaged,
    per_class_accuracy,
)


def _logits_for(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    logits = np.zeros((len(predictions), num_classes), np.float32)
    logits[np.arange(len(predictions)), predictions] = 1.0
    return logits


def test_per_class_accuracy_counts_each_class_alone():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 2, 1, 0, 2])
    n, acc = per_class_accuracy(preds, labels, 4)
    assert n.tolist() == [4, 2, 1, 0]
    np.testing.assert_allclose(acc[:3], [0.5, 0.5, 1.0])
    assert np.isnan(acc[3])  # no examples: no accuracy


def test_class_deltas_are_accuracy_changes_against_the_reference():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    reference = np.array([0, 0, 0, 1, 1, 1, 0, 0, 2, 2])  # per class: 3/4, 2/4, 2/2
    finetuned = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])  # 4/4, 4/4, 0/2: class 2 destroyed
    chosen = np.array([0, 0, 0, 0, 1, 1, 1, 0, 2, 0])     # 4/4, 3/4, 1/2
    frame = class_deltas(reference, {"fine-tuned": (1.0, finetuned), "chosen": (0.5, chosen)}, labels,
                         ["dog", "cat", "horse"])
    ft = frame[frame["point"] == "fine-tuned"].set_index("class_name")
    np.testing.assert_allclose(ft.loc[["dog", "cat", "horse"], "delta"], [0.25, 0.5, -1.0])
    np.testing.assert_allclose(ft["reference_accuracy"], [0.75, 0.5, 1.0])
    ch = frame[frame["point"] == "chosen"].set_index("class_name")
    np.testing.assert_allclose(ch.loc[["dog", "cat", "horse"], "delta"], [0.25, 0.25, -0.5])
    assert (ch["alpha"] == 0.5).all() and ft["n"].tolist() == [4, 4, 2]
    # the same predictions as the reference: no change anywhere
    same = class_deltas(reference, {"fine-tuned": (1.0, reference)}, labels, ["dog", "cat", "horse"])
    assert (same["delta"] == 0).all()


def test_projected_domains_name_their_evaluation_classes():
    names = ["a", "b", "c", "d"]
    assert eval_class_names(EvalProjection(), names) == names
    assert eval_class_names(EvalProjection(class_subset=(1, 3)), names) == ["b", "d"]
    assert eval_class_names(EvalProjection(groups=((0, 2), (3,))), names) == ["a/c", "d"]


def test_chosen_alphas_come_from_id_validation_rows():
    rows = []
    for domain, split, alpha, selected in [("photo", "val", 0.5, True), ("photo", "val", 1.0, False),
                                           ("sketch", "test", 1.0, True)]:
        rows.append({"method": "full_ft", "variant": "default", "seed": 0, "eval_domain": domain, "split": split,
                     "train_domain": "photo", "alpha": alpha, "selected_alpha": selected,
                     "interpolation": "linear", "calibration": "none"})
    assert chosen_alphas(pd.DataFrame(rows)) == {("full_ft", "default", 0): 0.5}


def test_most_damaged_names_the_class_that_lost_most_averaged_over_seeds():
    rows = []
    for seed, deltas in ((0, [-0.2, -0.5, 0.1]), (1, [-0.4, -0.1, 0.3])):  # means: -0.3, -0.3, +0.2 -> tie: class 0
        for c, d in enumerate(deltas):
            rows.append({"study": "s", "method": "full_ft", "variant": "default", "seed": seed, "eval_domain": "sketch",
                         "split": "test", "class_index": c, "class_name": "abc"[c], "n": 10, "point": "chosen",
                         "alpha": 1.0, "reference_accuracy": 0.8, "accuracy": 0.8 + d, "delta": d})
    worst = most_damaged(pd.DataFrame(rows, columns=PER_CLASS_COLUMNS), k=2)
    assert worst["class_name"].tolist() == ["a", "b"]
    assert worst["delta"].tolist() == pytest.approx([-0.3, -0.3])


def test_per_class_stage_reads_the_reference_the_fine_tuned_and_the_chosen_alpha(tmp_path):
    from robustft.io.logits import LogitSplit, sweep_logits_writer
    from robustft.io.tables import read_table, write_table
    from robustft.per_class import per_class_stage

    sys.path.insert(0, str(Path(__file__).parent))
    from test_analysis_stages import _write_manifest

    names = ["dog", "cat", "bird"]
    _write_manifest(tmp_path / "manifest.parquet", "imagefolder", names)
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = {0.0: [0, 1, 1, 1, 2, 2], 0.5: [0, 0, 1, 0, 2, 2], 1.0: [0, 0, 1, 1, 0, 0]}
    splits = [LogitSplit(n, n.split("_")[0], n.split("_")[1], labels) for n in ("photo_val", "photo_test", "sketch_test")]
    with sweep_logits_writer(tmp_path / "sweep.h5", alphas=[0.0, 0.5, 1.0], interpolations=["linear"], splits=splits,
                             num_classes=3, head_only=False) as writer:
        for split in splits:
            for alpha, pred in predictions.items():
                writer.write(split.name, "linear", alpha, 0, _logits_for(np.array(pred), 3))
    (tmp_path / "run.json").write_text(json.dumps({"method": "full_ft", "variant": "default", "seed": 0}))
    summary = pd.DataFrame([{"study": "s", "method": "full_ft", "variant": "default", "seed": 0, "eval_domain": "photo",
                             "split": "val", "train_domain": "photo", "alpha": a, "selected_alpha": a == 0.5,
                             "interpolation": "linear", "calibration": "none"} for a in (0.0, 0.5, 1.0)])
    write_table(tmp_path / "summary.parquet", summary)
    per_class_stage(manifest=str(tmp_path / "manifest.parquet"), summary=str(tmp_path / "summary.parquet"),
                    sweep_logits=[str(tmp_path / "sweep.h5")], runs=[str(tmp_path / "run.json")],
                    out=str(tmp_path / "per_class.parquet"))
    table = read_table(tmp_path / "per_class.parquet", PER_CLASS_COLUMNS)
    assert set(table["eval_domain"]) == {"photo", "sketch"} and set(table["split"]) == {"test"}  # never val
    sketch = table[table["eval_domain"] == "sketch"].set_index(["point", "class_name"])
    # reference per class: 1/2, 1, 1; alpha 1: 1, 1, 0; alpha 0.5 (chosen on photo val): 1, 1/2, 1
    np.testing.assert_allclose(sketch.loc["fine-tuned"].loc[names, "delta"], [0.5, 0.0, -1.0])
    np.testing.assert_allclose(sketch.loc["chosen"].loc[names, "delta"], [0.5, -0.5, 0.0])
    assert set(sketch.loc["chosen", "alpha"]) == {0.5} and (sketch["study"] == "s").all()


def test_report_heatmap_and_most_damaged_table():
    from robustft.report import charts as C
    from robustft.report.page import _most_damaged_table

    rows = []
    for method, deltas in (("full_ft", [0.1, -0.2, -0.9]), ("greedy_soup", [0.0, -0.3, 0.2])):
        for domain in ("photo", "sketch"):
            for c, d in enumerate(deltas):
                rows.append({"study": "s", "method": method, "variant": "default" if method == "full_ft" else "full_ft",
                             "seed": 0, "eval_domain": domain, "split": "test", "class_index": c,
                             "class_name": ["dog", "cat", "horse"][c], "n": 10, "point": "chosen", "alpha": 0.5,
                             "reference_accuracy": 0.9, "accuracy": 0.9 + d, "delta": d})
    table = pd.DataFrame(rows, columns=PER_CLASS_COLUMNS)
    data = C.per_class_damage(table, max_classes=2)
    assert set(data["class_name"]) == {"horse", "cat"}  # the two classes that lost most under any method
    spec = json.dumps(C.per_class_damage_chart(table).to_dict())
    assert '"per_class_cells"' in spec and "greedy_soup (full_ft)" in spec
    html = _most_damaged_table(table)
    assert html.count("<tr class=") == 4  # one row per (method, domain)
    assert "horse" in html and "-90.0" in html and "cat" in html and "-30.0" in html
    assert "No per-class table" in json.dumps(C.per_class_damage_chart(None).to_dict())
