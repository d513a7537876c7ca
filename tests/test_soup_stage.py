"""The soup stage (robustft.pipeline.soups) on the tiny backbone's caches: a soup is a run directory whose sweep,
calibration and summary work as any run's; a soup of identical runs is the run; a uniform soup is the mean."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robustft.io.logits import read_sweep_logits
from robustft.pipeline import analysis
from robustft.pipeline import soups as soup_stages
from robustft.training.checkpoint import save_safetensors

sys.path.insert(0, str(Path(__file__).parent))
from test_analysis_stages import _sweep, world  # noqa: E402,F401 (world: the tiny study fixture)
from tiny_backbone import CLASSES  # noqa: E402


def _run(world, variant: str, state: dict, **record) -> str:
    run_dir = world["root"] / "runs" / "full_ft" / variant / "seed0"
    run_dir.mkdir(parents=True)
    save_safetensors(run_dir / "model.safetensors", state)
    run = {"method": "full_ft", "variant": variant, "seed": 0, "absent_classes": [], "protocol": {"kind": "full"},
           "class_names": CLASSES, "backbone": {"name": "tiny"}, "total_parameters": 10, "trainable_parameters": 10,
           "wall_time_s": 2.0, **record}
    (run_dir / "run.json").write_text(json.dumps(run))
    return str(run_dir / "run.json")


def _soup(world, kind: str, runs: list[str], source: str = "full_ft") -> tuple[dict, Path]:
    out = world["root"] / "runs" / f"{kind}_soup" / source / "seed0" / "run.json"
    record = soup_stages.soup_stage(
        manifest=str(world["root"] / "manifest.parquet"), backbone_spec={"name": "tiny"}, kind=kind, source=source,
        runs=runs, reference_head=str(world["root"] / "head.safetensors"),
        val_pixels=str(world["pixels"]["photo_val"]), val_features=str(world["features"]["photo_val"]),
        batch_size=4, device="cpu", out_run=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    return record, out.parent


def test_a_soup_of_identical_runs_is_the_run_and_sweeps_as_it(world):
    runs = [_run(world, v, world["finetuned"]) for v in ("a", "b", "c")]
    for kind in ("uniform", "greedy"):
        record, soup_dir = _soup(world, kind, runs)
        state = load_file(str(soup_dir / "model.safetensors"))
        assert set(state) == set(world["finetuned"])
        assert all(torch.equal(state[k], v) for k, v in world["finetuned"].items())
        assert (record["method"], record["variant"], record["seed"]) == (f"{kind}_soup", "full_ft", 0)
        assert record["protocol"] == {"kind": "full"} and record["absent_classes"] == []
        assert record["wall_time_s"] >= 6.0  # every ingredient's training is part of a soup's cost
    greedy = json.loads((soup_dir / "run.json").read_text())["soup"]
    assert greedy["kept"] == ["full_ft/a/seed0"]  # equal ID-val accuracy is no improvement
    # the soup's sweep (rule sweep on its run directory) gives the run's logits
    _sweep({**world, "run_dir": soup_dir}, soup_dir / "sweep.h5")
    _sweep({**world, "run_dir": Path(runs[0]).parent}, Path(runs[0]).parent / "sweep.h5")
    soup_alphas, soup_splits = read_sweep_logits(soup_dir / "sweep.h5")
    _, run_splits = read_sweep_logits(Path(runs[0]).parent / "sweep.h5")
    for name, split in run_splits.items():
        np.testing.assert_array_equal(soup_splits[name]["logits"]["linear"], split["logits"]["linear"])


def test_a_uniform_soup_is_the_mean_and_greedy_scores_on_id_validation(world):
    g = torch.Generator().manual_seed(11)
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in world["finetuned"].items()} for _ in range(3)]
    runs = [_run(world, f"v{i}", s) for i, s in enumerate(states)]
    _, soup_dir = _soup(world, "uniform", runs)
    state = load_file(str(soup_dir / "model.safetensors"))
    for key, value in state.items():
        if value.is_floating_point():
            want = torch.stack([s[key].double() for s in states]).mean(0).float()
            assert torch.equal(value, want), key
    record, _ = _soup(world, "greedy", runs)
    steps = record["soup"]["ingredients"]
    alone = [s["val_accuracy"] for s in steps]
    assert alone == sorted(alone, reverse=True) and len(steps) == 3  # tried best first
    for i, step in enumerate(steps[1:], 1):
        best = max(s["soup_val_accuracy"] for s in steps[:i] if s["kept"])
        assert step["kept"] == (step["soup_val_accuracy"] > best)
    assert record["best_val_accuracy"] == max(s["soup_val_accuracy"] for s in steps if s["kept"])


def test_runs_of_another_protocol_cannot_be_souped(world):
    runs = [_run(world, "a", world["finetuned"]),
            _run(world, "b", world["finetuned"], absent_classes=["bird"], protocol={"kind": "class_subset"})]
    with pytest.raises(ValueError, match="full_ft/b/seed0 and full_ft/a/seed0 differ in 'protocol'"):
        _soup(world, "uniform", runs)


def test_calibration_and_summary_read_a_soup_as_a_run(world):
    runs = [_run(world, v, world["finetuned"]) for v in ("a", "b")]
    _, soup_dir = _soup(world, "uniform", runs)
    _sweep({**world, "run_dir": soup_dir}, soup_dir / "sweep.h5")
    analysis.calibrate_stage(manifest=str(world["root"] / "manifest.parquet"), run_json=str(soup_dir / "run.json"),
                             sweep_logits_path=str(soup_dir / "sweep.h5"), id_domain="photo", gamma_source="val",
                             bootstrap=0, ci_level=0.95, out_metrics=str(soup_dir / "metrics.parquet"),
                             out_curve=str(soup_dir / "curve.parquet"))
    out = world["root"] / "summary.parquet"
    analysis.summary_stage(metrics=[str(soup_dir / "metrics.parquet")], runs=[str(soup_dir / "run.json")],
                           studies=[{"study": "s", "dataset": "tiny", "backbone": "tiny", "id_domain": "photo",
                                     "ood_domains": ["sketch"]}], bootstrap=0, ci_level=0.95, out=str(out))
    summary = analysis.read_table(out)
    assert set(summary["method"]) == {"uniform_soup"} and set(summary["variant"]) == {"full_ft"}
    assert summary["selected_alpha"].sum() == 1 * 3 + 1  # one chosen alpha: photo val, photo test, sketch, OOD avg
    assert summary["train_seconds"].min() >= 4.0
