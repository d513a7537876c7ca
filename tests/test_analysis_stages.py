"""The analysis stages on tiny caches: the sweep streams from its caches (memory of one batch), the Fisher merge draws
a seeded sample over the whole training split, gamma can come from a training sample, PCV's floor is the reference
model wherever alpha 0 is, and calibration works on projected domains (ImageNet-R/-A subsets, ObjectNet groups)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from robustft.calibration import absent_class_mask, apply_logit_offset, pseudo_cv_gamma
from robustft.data.manifest import MANIFEST_COLUMNS
from robustft.data.pixels import pixel_cache_attrs
from robustft.data.registry import get_adapter
from robustft.evaluation import CachedColumn, build_classifier, predict_logits
from robustft.features import extract_features
from robustft.interpolation import interpolate_state_dicts
from robustft.io.arrays import array_writer
from robustft.io.logits import (
    GAMMA_SOURCE_ROLE,
    LogitSplit,
    fold_logits_writer,
    open_sweep_logits,
    read_sweep_logits,
    sweep_logits_writer,
)
from robustft.io.tables import read_table, write_table
from robustft.pipeline import analysis
from robustft.pipeline.stages import feature_attrs
from robustft.training.checkpoint import save_safetensors

sys.path.insert(0, str(Path(__file__).parent))
from tiny_backbone import CLASSES, TinyBackbone, tiny_data  # noqa: E402

MANIFEST_HASH = "tiny-manifest"
SIZES = {"photo_train": 20, "photo_val": 6, "photo_test": 7, "sketch_test": 5}  # images per class


def _write_manifest(path: Path, dataset: str, class_names: list[str]) -> None:
    frame = pd.DataFrame({c: pd.Series(dtype="int64" if c in ("row_id", "label", "rank", "bytes") else "object")
                          for c in MANIFEST_COLUMNS})
    write_table(path, frame, {"dataset": dataset, "class_names": class_names, "prompt_names": class_names,
                              "manifest_hash": MANIFEST_HASH, "root": str(path.parent)})


def _write_pixels(path: Path, data, domain: str, split: str) -> dict:
    attrs = pixel_cache_attrs(MANIFEST_HASH, "tiny", domain, split, None)
    columns = {"pixels": ((8, 8, 3), np.uint8), "labels": ((), np.int64), "row_ids": ((), np.int64)}
    with array_writer(path, len(data), columns, attrs) as handle:
        handle["pixels"][...] = data.pixels.numpy()
        handle["labels"][...] = data.labels.numpy()
        handle["row_ids"][...] = data.row_ids.numpy() + 1000 * hash((domain, split)) % 997
    return attrs


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """A manifest, pixel and feature caches (sorted by class, as real caches are), a reference head and a full_ft run
    whose every parameter moved; ``build_backbone`` returns the tiny backbone."""
    backbone = TinyBackbone()
    monkeypatch.setattr(analysis, "build_backbone", lambda spec: backbone)
    _write_manifest(tmp_path / "manifest.parquet", "imagefolder", CLASSES)
    pixels, features = {}, {}
    for i, (name, per_class) in enumerate(SIZES.items()):
        domain, split = name.rsplit("_", 1)
        data = tiny_data(per_class=per_class, seed=i)
        pixels[name] = tmp_path / f"{name}.h5"
        features[name] = tmp_path / f"{name}.features.h5"
        attrs = _write_pixels(pixels[name], data, domain, split)
        extract_features(backbone.build_encoder(), pixels[name], features[name], backbone.preprocessing,
                         feature_attrs(attrs, backbone), batch_size=16, device="cpu")
    g = torch.Generator().manual_seed(3)
    head = {"head.weight": 0.5 * torch.randn(len(CLASSES), backbone.feature_dim, generator=g),
            "head.bias": torch.zeros(len(CLASSES))}
    save_safetensors(tmp_path / "head.safetensors", head)
    model = build_classifier(backbone, len(CLASSES))
    reference = analysis.reference_state(model, tmp_path / "head.safetensors")
    trained = {n for n, _ in model.named_parameters()}
    finetuned = {k: v + 0.2 * torch.randn(v.shape, generator=g) if k in trained else v.clone()
                 for k, v in reference.items()}
    run_dir = tmp_path / "runs" / "full_ft" / "absent1" / "seed0"
    run_dir.mkdir(parents=True)
    save_safetensors(run_dir / "model.safetensors", finetuned)
    run = {"method": "full_ft", "variant": "absent1", "seed": 0, "absent_classes": ["bird"],
           "protocol": {"kind": "class_subset"}}
    (run_dir / "run.json").write_text(json.dumps(run))
    return {"root": tmp_path, "backbone": backbone, "pixels": pixels, "features": features, "run_dir": run_dir,
            "reference": reference, "finetuned": finetuned, "model": model}


def _sweep(world, out: Path, alphas=(0.0, 0.5, 1.0), **extra) -> None:
    evals = ("photo_val", "photo_test", "sketch_test")
    analysis.sweep_stage(
        manifest=str(world["root"] / "manifest.parquet"), backbone_spec={"name": "tiny"},
        run_json=str(world["run_dir"] / "run.json"), reference_head=str(world["root"] / "head.safetensors"),
        eval_pixels={n: str(world["pixels"][n]) for n in evals}, eval_features={n: str(world["features"][n]) for n in evals},
        alphas=list(alphas), batch_size=4, device="cpu", out_logits=str(out), **extra)


def test_sweep_streams_batches_and_equals_the_interpolated_models(world, monkeypatch, caplog):
    reads = []
    real_getitem = h5py.Dataset.__getitem__

    def spying_getitem(self, key):
        value = real_getitem(self, key)
        if self.name == "/pixels":
            reads.append(len(value))
        return value

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spying_getitem)
    monkeypatch.setenv("ROBUSTFT_PROGRESS_INTERVAL", "0")
    out = world["root"] / "sweep_logits.h5"
    with caplog.at_level(logging.INFO, logger="robustft"):
        _sweep(world, out)
    # pixels are read 4 rows at a time (the batch), never a whole split
    assert reads and max(reads) <= 4
    alphas, splits = read_sweep_logits(out)
    assert alphas == [0.0, 0.5, 1.0] and set(splits) == {"photo_val", "photo_test", "sketch_test"}
    check = build_classifier(world["backbone"], len(CLASSES)).eval()
    monkeypatch.setattr(h5py.Dataset, "__getitem__", real_getitem)
    for i, alpha in enumerate(alphas):
        check.load_state_dict(interpolate_state_dicts(world["reference"], world["finetuned"], alpha))
        for name, split in splits.items():
            want = predict_logits(check, CachedColumn(world["pixels"][name], "pixels"),
                                  world["backbone"].preprocessing, torch.device("cpu"), 64)
            np.testing.assert_allclose(split["logits"]["linear"][i], want, rtol=1e-5, atol=1e-5)
            assert split["role"] == "eval"
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("progress sweep full_ft/absent1/seed0:") for line in lines), lines
    assert any(line.startswith("done sweep full_ft/absent1/seed0: 162 images") for line in lines), lines


def _calibrate(world, sweep: Path, gamma_source: str, out: Path) -> None:
    analysis.calibrate_stage(
        manifest=str(world["root"] / "manifest.parquet"), run_json=str(world["run_dir"] / "run.json"),
        sweep_logits_path=str(sweep), id_domain="photo", gamma_source=gamma_source, bootstrap=0, ci_level=0.95,
        out_metrics=str(out), out_curve=str(world["root"] / "curve.parquet"))


def test_gamma_from_a_training_sample(world):
    """``calibration.gamma_source: train`` used to crash (no training logits were swept): the sweep now evaluates a
    seeded sample of the ID training split, calibration chooses ALG's gamma on it and never scores it."""
    plain, with_train = world["root"] / "plain.h5", world["root"] / "with_train.h5"
    metrics = world["root"] / "metrics.parquet"
    _sweep(world, plain)
    with pytest.raises(RuntimeError, match="no photo_train logits to choose gamma on"):
        _calibrate(world, plain, "train", metrics)
    _sweep(world, with_train, train_pixels=str(world["pixels"]["photo_train"]),
           train_features=str(world["features"]["photo_train"]), gamma_train_examples=25)
    with open_sweep_logits(with_train) as sweep:
        train = sweep.splits["photo_train"]
        assert train.role == GAMMA_SOURCE_ROLE and len(train.labels) == 25
        assert set(train.labels) == {0, 1, 2}  # a sample over the whole split, not its first (class-sorted) rows
        train_logits = sweep.logits("photo_train", "linear", 2)
        assert {s.name for s in sweep.eval_splits()} == {"photo_val", "photo_test", "sketch_test"}
    _calibrate(world, with_train, "train", metrics)
    frame = read_table(metrics)
    assert set(frame["split"]) == {"val", "test"}  # the training sample is never scored
    rows = frame[(frame["calibration"] == "alg") & (frame["alpha"] == 1.0)]
    want = analysis.average_logit_gap(train_logits, train.labels, absent_class_mask(3, [2]))
    assert len(rows) == 3 and np.allclose(rows["gamma"], want) and want != 0
    # gamma on the validation split from the same file differs: the source really switched
    _calibrate(world, with_train, "val", metrics)
    val_gamma = read_table(metrics).query("calibration == 'alg' and alpha == 1.0")["gamma"].iloc[0]
    assert val_gamma != pytest.approx(want)


def test_fisher_sample_covers_every_class_of_a_class_sorted_split(world):
    path = world["pixels"]["photo_train"]  # 3 classes x 20 rows, sorted by class
    first = CachedColumn(path, "labels", np.arange(20)).read()
    assert set(first) == {0}  # what the first n rows showed before
    sample = analysis.fisher_sample(str(path), 20, seed=0)
    labels = CachedColumn(path, "labels", sample.rows).read()
    assert len(labels) == 20 and set(labels) == {0, 1, 2}
    assert np.array_equal(analysis.fisher_sample(str(path), 20, seed=0).rows, sample.rows)
    assert not np.array_equal(analysis.fisher_sample(str(path), 20, seed=1).rows, sample.rows)
    # PACS's preset: fisher_examples 256 of 7 classes sorted by class covered 3 classes; every one now
    rows = analysis.sample_rows(7 * 180, 256, seed=0)
    assert len(np.unique(rows // 180)) == 7 and len(rows) == 256 and np.all(np.diff(rows) > 0)


def test_fisher_pair_streams_the_sample(world):
    from robustft.fisher import diagonal_fisher

    sample = analysis.fisher_sample(str(world["pixels"]["photo_train"]), 9, seed=0)
    model = world["model"]
    got = analysis.fisher_pair(model, world["reference"], world["finetuned"], sample, world["backbone"].preprocessing,
                               torch.device("cpu"))
    pixels = torch.from_numpy(CachedColumn(world["pixels"]["photo_train"], "pixels", sample.rows).read())
    model.load_state_dict(world["finetuned"])
    want = diagonal_fisher(model, [world["backbone"].preprocessing.normalize(pixels)],
                           params=dict(model.named_parameters()), generator=torch.Generator().manual_seed(0))
    for key in want:
        torch.testing.assert_close(got[1][key], want[key])
    assert any(not torch.equal(got[0][k], got[1][k]) for k in want)


def _fold_file(path: Path, alphas, labels, pseudo, reference, per_alpha) -> None:
    with fold_logits_writer(path, alphas=alphas, labels=labels, pseudo_absent=pseudo) as writer:
        writer.write_reference(0, reference)
        for alpha, logits in zip(alphas, per_alpha):
            writer.write(alpha, 0, logits)


def test_pcv_floor_is_the_reference_model_wherever_alpha_0_is(tmp_path):
    """The alpha grid need not start at 0 (or hold it): the floor comes from the reference logits stored with the
    fold, never from ``logits[0]``."""
    rng = np.random.default_rng(0)
    n, classes = 60, 4  # class 3 truly absent; class 2 pseudo-absent in the fold
    labels = rng.integers(0, 3, size=n)
    pseudo = np.array([False, False, True, False])
    reference = rng.normal(size=(n, classes))
    reference[np.arange(n), labels] += 3.0  # the reference model gets the pseudo-absent class right
    alphas = [1.0, 0.5]  # alpha 1 first: the old floor read the fine-tuned model
    finetuned = rng.normal(size=(n, classes))
    finetuned[np.arange(n), np.where(labels == 2, 0, labels)] += 2.0  # forgets class 2
    per_alpha = [finetuned, (reference + finetuned) / 2]
    _fold_file(tmp_path / "fold0.h5", alphas, labels, pseudo, reference, per_alpha)
    absent = absent_class_mask(classes, [3])
    folds = analysis._open_folds([str(tmp_path / "fold0.h5")], alphas)
    try:
        got = analysis._pcv_gamma(folds, 0, absent)
    finally:
        folds[0].close()
    pseudo_rows = labels == 2
    ref_floor = float((reference.argmax(1) == labels)[pseudo_rows].mean())
    wrong_floor = float((finetuned.argmax(1) == labels)[pseudo_rows].mean())
    assert ref_floor > wrong_floor
    mask = pseudo | absent
    want = pseudo_cv_gamma([finetuned], [labels], [mask], [ref_floor])
    assert got == pytest.approx(want)
    assert got != pytest.approx(pseudo_cv_gamma([finetuned], [labels], [mask], [wrong_floor]))


def test_pcv_logits_stage_stores_the_reference_model(world):
    fold_dir = world["run_dir"] / "pcv" / "fold0"
    fold_dir.mkdir(parents=True)
    save_safetensors(fold_dir / "model.safetensors", world["finetuned"])
    (fold_dir / "run.json").write_text(json.dumps({"method": "full_ft", "variant": "absent1", "seed": 0,
                                                   "absent_classes": ["bird", "dog"]}))
    out = fold_dir / "val_logits.h5"
    analysis.pcv_logits_stage(
        manifest=str(world["root"] / "manifest.parquet"), backbone_spec={"name": "tiny"},
        run_json=str(fold_dir / "run.json"), parent_run_json=str(world["run_dir"] / "run.json"),
        reference_head=str(world["root"] / "head.safetensors"), val_pixels=str(world["pixels"]["photo_val"]),
        val_features=str(world["features"]["photo_val"]), alphas=[1.0, 0.5], batch_size=4, device="cpu", out=str(out))
    from robustft.io.logits import open_fold_logits

    check = build_classifier(world["backbone"], len(CLASSES)).eval()
    with open_fold_logits(out) as fold:
        assert fold.alphas == [1.0, 0.5] and fold.pseudo_absent.tolist() == [True, False, False]
        for state, logits in ((world["reference"], fold.reference()), (world["finetuned"], fold.logits(0))):
            check.load_state_dict(state)
            want = predict_logits(check, CachedColumn(world["pixels"]["photo_val"], "pixels"),
                                  world["backbone"].preprocessing, torch.device("cpu"), 64)
            np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- projected domains (ImageNet)
def _preset_absent() -> list[str]:
    import yaml

    preset = Path(__file__).parents[1] / "config" / "presets" / "imagenet_r_subset.yaml"
    return yaml.safe_load(preset.read_text())["protocol"]["absent_classes"]


def test_calibration_on_projected_imagenet_domains(tmp_path):
    """imagenet_r_subset.yaml: every ALG/PCV job raised "absent_mask must mark at least one absent and one seen
    class" on ImageNet-R, whose logits are projected to 200 classes, and ImageNet-R reported n_absent = 0. gamma is now
    added on the model's 1000 classes before each projection; an evaluation class is absent when all its ImageNet
    classes are (ObjectNet groups mixing seen and absent classes count as seen)."""
    adapter = get_adapter("imagenet")
    wnids = adapter.class_names(pd.DataFrame())
    _write_manifest(tmp_path / "manifest.parquet", "imagenet", wnids)
    absent = _preset_absent()
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"method": "full_ft", "variant": "default", "seed": 0, "absent_classes": absent}))
    mask = absent_class_mask(1000, [wnids.index(w) for w in absent])
    rng = np.random.default_rng(0)
    r_sub = np.asarray(adapter.projection("imagenet_r").class_subset)
    groups = adapter.projection("objectnet").groups
    layout = [("imagenet", "val", 1000, 400), ("imagenet", "test", 1000, 300), ("imagenet_r", "test", 200, 400),
              ("objectnet", "test", len(groups), 300)]
    splits, logits = [], {}
    for domain, split, n_eval, n in layout:
        labels = rng.integers(0, n_eval, size=n)
        model_logits = rng.normal(size=(n, 1000)).astype(np.float32)
        model_logits[:, mask] -= 1.5  # fine-tuning pushed the absent classes down
        if domain == "imagenet_r":
            model_logits[np.arange(n), r_sub[labels]] += 2.5
        elif domain == "objectnet":
            model_logits[np.arange(n), [groups[g][0] for g in labels]] += 2.5
        else:
            model_logits[np.arange(n), labels] += 2.5
        splits.append(LogitSplit(f"{domain}_{split}", domain, split, labels))
        logits[f"{domain}_{split}"] = model_logits
    with sweep_logits_writer(tmp_path / "sweep.h5", alphas=[1.0], interpolations=["linear"], splits=splits,
                             num_classes=1000, head_only=False) as writer:
        for name, value in logits.items():
            writer.write(name, "linear", 1.0, 0, value)
    metrics = tmp_path / "metrics.parquet"
    analysis.calibrate_stage(manifest=str(tmp_path / "manifest.parquet"), run_json=str(run_json),
                             sweep_logits_path=str(tmp_path / "sweep.h5"), id_domain="imagenet", gamma_source="val",
                             bootstrap=0, ci_level=0.95, out_metrics=str(metrics), out_curve=str(tmp_path / "c.parquet"))
    frame = read_table(metrics)

    def row(domain: str, calibration: str, split: str = "test") -> pd.Series:
        rows = frame[(frame["eval_domain"] == domain) & (frame["calibration"] == calibration) & (frame["split"] == split)]
        assert len(rows) == 1
        return rows.iloc[0]

    gamma = float(row("imagenet", "alg", "val")["gamma"])
    assert gamma > 0
    for (domain, split, _, _), lsplit in zip(layout, splits):
        projection = adapter.projection(domain)
        for calibration in ("none", "alg"):
            g = gamma if calibration == "alg" else 0.0
            pred = projection.apply(apply_logit_offset(logits[lsplit.name], mask, g)).argmax(1)
            assert row(domain, calibration, split)["accuracy"] == pytest.approx(float((pred == lsplit.labels).mean()))
    r_absent = mask[r_sub]
    assert r_absent.sum() == 100
    r_labels = splits[2].labels
    r_row = row("imagenet_r", "alg")
    assert r_row["n_absent"] == int(r_absent[r_labels].sum()) > 0
    assert r_row["n_seen"] + r_row["n_absent"] == len(r_labels) and np.isfinite(r_row["ausuc"])
    # calibration moves ImageNet-R's absent-class accuracy up
    assert r_row["absent_accuracy"] > row("imagenet_r", "none")["absent_accuracy"]
    o_absent = np.array([mask[list(g)].all() for g in groups])
    o_row = row("objectnet", "alg")
    assert o_row["n_absent"] == int(o_absent[splits[3].labels].sum()) > 0
    curves = read_table(tmp_path / "c.parquet")
    assert {"imagenet", "imagenet_r"} <= set(curves["eval_domain"])
