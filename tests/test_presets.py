"""Every preset in config/presets/ runs end to end, through summary and report, on a miniature of its dataset.

For each preset (found by a glob, so a new preset is covered without editing this file) the test generates a
miniature copy of the dataset's on-disk layout (tests/miniature.py: real folder names, a few tiny images per class
and domain), loads the preset and overrides only

- the dataset root (the miniature) and ``dataset.expected_counts`` (the images written, instead of the published
  sizes);
- the backbone: a tiny random open_clip model saved to a local file (``templates: simple`` for the 1000- and
  345-class datasets, whose 80-template heads would cost minutes of text encoding);
- the cost knobs: one epoch (also in variants that set their own), warmup, k of a k-shot protocol (2), Fisher
  examples, bootstrap resamples, and the first seed only.

Methods, variants, domains, protocols, alphas and calibration stay the preset's, so the test checks what the preset
promises: one summary row for every (run, eval domain, split, alpha, interpolation, calibration).
"""

from __future__ import annotations

import copy
from pathlib import Path

import h5py
import pytest
import yaml

from miniature import LAYOUTS
from pipeline_utils import REPO, read_summary, run_pipeline, study_dir, write_config

from robustft.config import study_table, validate_config
from robustft.soups import soup_table

pytestmark = pytest.mark.pipeline

PRESETS = sorted((REPO / "config" / "presets").glob("*.yaml"))
#: Prompt templates of the tiny model, per dataset: ``simple`` where classes x 80 templates is large.
TEMPLATES = {"imagenet": "simple", "domainnet": "simple"}
#: Cost knobs: upper bounds on the preset's values (training keys apply to the training block and every variant).
#: Batch sizes stay the preset's: on 32 px images a batch of 512 is small, and fewer steps are cheaper (SAFT encodes
#: every class prompt at each step).
TRAINING_CAPS = {"epochs": 1, "warmup_steps": 1}
KSHOT_K = 2  # the ImageNet miniature has 2 training images in every class (tests/miniature.py)


def test_every_preset_is_covered():
    assert len(PRESETS) >= 6, PRESETS
    names = {yaml.safe_load(p.read_text())["dataset"]["name"] for p in PRESETS}
    assert names <= set(LAYOUTS), f"no miniature layout for {sorted(names - set(LAYOUTS))}"


def _capped(block: dict) -> dict:
    out = dict(block)
    for key, cap in TRAINING_CAPS.items():
        if key in out and out[key] is not None:
            out[key] = min(out[key], cap)
    if isinstance(out.get("protocol"), dict):
        out["protocol"] = _small_protocol(out["protocol"])
    return out


def _small_protocol(protocol: dict) -> dict:
    return {**protocol, "k": min(protocol["k"], KSHOT_K)} if protocol.get("kind") == "kshot" else dict(protocol)


def miniature_config(preset: dict, root: Path, counts: dict[str, int], tiny: dict) -> dict:
    """The preset with the miniature dataset, the tiny backbone and small cost knobs (see the module docstring)."""
    config = copy.deepcopy(preset)
    dataset = config["dataset"]
    domains = {dataset["id_domain"], *dataset["ood_domains"]}
    dataset["root"] = str(root)
    dataset["expected_counts"] = {k: v for k, v in counts.items() if k.partition("/")[0] in domains}
    config["backbone"] = {"name": "open_clip", "model": tiny["model"], "model_config": tiny["model_config"],
                          "pretrained": tiny["checkpoint"], "image_size": None,
                          "templates": TEMPLATES.get(dataset["name"], preset["backbone"].get("templates", "simple"))}
    config["training"] = {**_capped(config.get("training", {})), "epochs": TRAINING_CAPS["epochs"]}
    if "protocol" in config:
        config["protocol"] = _small_protocol(config["protocol"])
    config["methods"] = {method: {variant: _capped(values or {}) for variant, values in variants.items()}
                         for method, variants in config["methods"].items()}
    config["seeds"] = config.get("seeds", [0])[:1]
    sweep = config.setdefault("sweep", {})
    if sweep.get("fisher"):
        sweep["fisher_examples"] = min(sweep.get("fisher_examples", 16), 16)
    config.setdefault("eval", {}).update(bootstrap=20)
    return config


def expected_rows(config: dict, head_only: dict[tuple[str, str], bool]) -> set[tuple]:
    """(method, variant, seed, eval domain, split, alpha, interpolation, calibration) the preset promises.

    Calibrations: ``none`` for every run, plus ``alg`` and (with ``pcv_folds`` > 0) ``pcv`` for class-subset runs.
    Interpolations: ``linear``, plus ``fisher`` with ``sweep.fisher`` for runs that change the image encoder.
    """
    dataset = config["dataset"]
    cells = [(dataset["id_domain"], "val"), (dataset["id_domain"], "test"),
             *[(d, "test") for d in dataset["ood_domains"]], ("ood_average", "test")]
    folds = config.get("calibration", {}).get("pcv_folds", 3)
    rows = set()
    for method, variants in config["methods"].items():
        for variant, values in variants.items():
            protocol = {**config.get("protocol", {"kind": "full"}), **(values.get("protocol") or {})}
            calibrations = ["none"] + (["alg"] + (["pcv"] if folds else []) if protocol["kind"] == "class_subset"
                                       else [])
            interpolations = ["linear"] + (["fisher"] if config["sweep"].get("fisher")
                                           and not head_only[(method, variant)] else [])
            for seed in config["seeds"]:
                rows |= {(method, variant, seed, d, s, float(a), i, c) for d, s in cells
                         for a in config["sweep"]["alphas"] for i in interpolations for c in calibrations}
    for soup in soup_table(validate_config(config), study_table(validate_config(config))):
        # a soup is a run of its own: every cell and alpha; ALG only where its protocol leaves classes out (a soup has
        # no PCV fold models)
        calibrations = ["none"] + (["alg"] if soup["protocol"]["kind"] == "class_subset" else [])
        interpolations = ["linear"] + (["fisher"] if config["sweep"].get("fisher")
                                       and not head_only[(soup["method"], soup["source"])] else [])
        rows |= {(soup["method"], soup["source"], soup["seed"], d, s, float(a), i, c) for d, s in cells
                 for a in config["sweep"]["alphas"] for i in interpolations for c in calibrations}
    return rows


@pytest.fixture(scope="module")
def miniatures(tmp_path_factory):
    """dataset name -> (miniature root, its counts, a working directory), each made on first use.

    The presets of one dataset share the working directory, as a user's configs may: a cache or run that two of them
    share is computed once (with the tiny backbone, imagenet_vitb16 and imagenet_vitb32 are the same study).
    """
    made: dict[str, tuple[Path, dict[str, int], Path]] = {}

    def get(name: str) -> tuple[Path, dict[str, int], Path]:
        if name not in made:
            base = tmp_path_factory.mktemp(f"preset_{name}")
            made[name] = (base / "data", LAYOUTS[name](base / "data"), base / "work")
        return made[name]

    return get


@pytest.mark.parametrize("preset_path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_runs_end_to_end_on_a_miniature(preset_path, miniatures, tiny_open_clip):
    preset = yaml.safe_load(preset_path.read_text())
    root, counts, workdir = miniatures(preset["dataset"]["name"])
    config = miniature_config(preset, root, counts, tiny_open_clip)
    write_config(workdir, config)
    run_pipeline(workdir, timeout=3600)  # minutes on 2 free cores; the limit allows for a busy machine

    summary = read_summary(workdir)
    seed = config["seeds"][0]
    runs = study_dir(workdir, config) / "runs"
    head_only = {}
    soups = soup_table(validate_config(config), study_table(validate_config(config)))
    for method, variant, run_seed in ([(m, v, seed) for m, variants in config["methods"].items() for v in variants]
                                      + [(soup["method"], soup["source"], soup["seed"]) for soup in soups]):
        with h5py.File(runs / method / variant / f"seed{run_seed}" / "sweep_logits.h5", "r") as sweep:
            head_only[(method, variant)] = bool(sweep.attrs["head_only"])
    keys = ["method", "variant", "seed", "eval_domain", "split", "alpha", "interpolation", "calibration"]
    got = set(summary[keys].itertuples(index=False, name=None))
    expected = expected_rows(config, head_only)
    assert got == expected, f"missing {sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}"
    assert not summary.duplicated(keys).any()
    assert summary["accuracy"].between(0, 1).all() and (summary["n"] > 0).all()
    if config["sweep"].get("fisher"):
        assert not head_only[("full_ft", "default")], "full_ft left the image encoder unchanged"
    assert (workdir / "results" / "report" / "index.html").stat().st_size > 0


#: Methods whose penalty toward the pre-trained weights replaces weight decay (their papers train without it).
PENALTY_METHODS = ("l2sp", "l1sp", "ewc")


@pytest.mark.parametrize("preset_path", PRESETS, ids=[p.stem for p in PRESETS])
def test_penalty_methods_run_without_weight_decay(preset_path):
    """The ``training:`` block's weight decay beats a method's own default (0 for L2-SP, L1-SP, EWC), so a preset
    that sets one must set ``weight_decay: 0.0`` on these methods' variants itself."""
    from robustft.config import resolved_variant, validate_config
    from robustft.methods import get_method
    from robustft.methods.base import resolve_hyperparameters

    config = validate_config(yaml.safe_load(preset_path.read_text()))
    for method in PENALTY_METHODS:
        for variant in config["methods"].get(method, {}):
            resolved = resolved_variant(config, method, variant)
            hyper = resolve_hyperparameters(get_method(method), resolved["training"], resolved["overrides"])
            assert hyper.weight_decay == 0.0, f"{preset_path.name}: {method}/{variant} weight_decay {hyper.weight_decay}"
