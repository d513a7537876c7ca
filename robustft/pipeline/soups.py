"""The soup stage: average a study's fine-tuned runs into one run of its own (robustft.soups), whose run directory
then gets the WiSE-FT sweep, calibration and summary rows of any run."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from robustft.evaluation import sweep_logits
from robustft.io.atomic import write_json_atomic
from robustft.pipeline.analysis import _checked_split, reference_model
from robustft.pipeline.stages import expected_feature_attrs
from robustft.soups import SOUP_FILE, SOUP_SEED, greedy_soup, soup_method, uniform_soup
from robustft.training.checkpoint import save_safetensors
from robustft.training.run import load_run_state

log = logging.getLogger("robustft")

#: run.json entries every ingredient must share (a soup averages models of one protocol and class list).
SHARED_KEYS = ("protocol", "absent_classes", "class_names", "backbone")


def _ingredients(run_jsons: Sequence[str]) -> tuple[list[str], dict[str, dict], dict[str, Path]]:
    names, records, dirs = [], {}, {}
    for path in run_jsons:
        record = json.loads(Path(path).read_text())
        name = f"{record['method']}/{record['variant']}/seed{record['seed']}"
        names.append(name)
        records[name], dirs[name] = record, Path(path).parent
    first = records[names[0]]
    for name in names[1:]:
        for key in SHARED_KEYS:
            if records[name].get(key) != first.get(key):
                raise ValueError(f"soup: {name} and {names[0]} differ in {key!r} ({records[name].get(key)!r} vs "
                                 f"{first.get(key)!r}); only runs of one protocol and backbone can be souped")
    return names, records, dirs


def val_accuracy_of(model, reference: Mapping[str, torch.Tensor], split, seen: np.ndarray, preprocessing, device,
                    batch_size: int):
    """``state`` -> its accuracy on the ID validation split, over the classes the runs were fine-tuned on."""

    def accuracy(state: Mapping[str, torch.Tensor]) -> float:
        correct = total = 0
        for _, _, start, logits in sweep_logits(model, reference, state, [1.0], [split], preprocessing, device,
                                                batch_size, cpu_freeze_min_pixels=None):
            labels = split.labels[start : start + logits.shape[0]]
            keep = seen[labels]
            correct += int((logits.argmax(1)[keep] == labels[keep]).sum())
            total += int(keep.sum())
        return correct / max(1, total)

    return accuracy


def soup_stage(
    *, manifest: str, backbone_spec: dict, kind: str, source: str, runs: Sequence[str], reference_head: str,
    val_pixels: str, val_features: str, batch_size: int, device: str, out_run: str,
) -> dict[str, Any]:
    """Build one soup (``kind``: uniform or greedy) of the runs ``runs`` (their run.json files) and write its run
    directory: ``model.safetensors`` (a full state dict) and ``run.json`` (last). Greedy selection, and the soup's
    recorded ID-validation accuracy, stream the ID validation pixels through the evaluation helpers."""
    started = time.perf_counter()
    names, records, dirs = _ingredients(runs)
    meta, backbone, dev, model, ref = reference_model(manifest, backbone_spec, reference_head, device)
    class_names = meta["class_names"]
    first = records[names[0]]
    absent = set(first.get("absent_classes") or [])
    seen = np.array([c not in absent for c in class_names])
    split = _checked_split("val", "", "val", val_pixels, val_features, expected_feature_attrs(meta, backbone))
    accuracy = val_accuracy_of(model, ref, split, seen, backbone.preprocessing, dev, batch_size)

    def load(name: str) -> dict[str, torch.Tensor]:
        return load_run_state(dirs[name], ref)  # LoRA merged, SAFT's sparse update applied: a full state dict

    if kind == "greedy":
        soup, steps = greedy_soup(names, load, accuracy)
        soup_accuracy = max(s["soup_val_accuracy"] for s in steps if s["kept"])
    elif kind == "uniform":
        soup = uniform_soup(load(name) for name in names)
        soup_accuracy = accuracy(soup)
        steps = [{"run": name, "kept": True} for name in names]
    else:
        raise ValueError(f"soup kind {kind!r} is not one of uniform, greedy")
    run_dir = Path(out_run).parent
    size = save_safetensors(run_dir / SOUP_FILE, soup, {"soup": kind})
    kept = [s["run"] for s in steps if s["kept"]]
    log.info("%s soup of %s: %d of %d runs kept, ID val accuracy %.4f", kind, source, len(kept), len(names),
             soup_accuracy)
    record = {
        "method": soup_method(kind), "variant": source, "seed": SOUP_SEED,
        **{key: first.get(key) for key in SHARED_KEYS},
        "soup": {"kind": kind, "source": source, "ingredients": steps, "kept": kept},
        "total_parameters": first.get("total_parameters"),
        "trainable_parameters": max(int(r.get("trainable_parameters") or 0) for r in records.values()),
        "best_val_accuracy": soup_accuracy, "last_val_accuracy": soup_accuracy,
        "checkpoint": {"file": SOUP_FILE, "size_bytes": int(size)},
        # what the soup cost: every ingredient's training (all were trained, kept or not) and the souping itself
        "wall_time_s": sum(float(r.get("wall_time_s") or 0.0) for r in records.values())
        + time.perf_counter() - started,
        "device": str(dev),
    }
    write_json_atomic(out_run, record)
    return record
