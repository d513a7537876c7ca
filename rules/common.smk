# Config validation, the studies and their folders, and input functions. Parsing stays cheap: nothing here opens
# data or imports torch.

import functools
import os
import re
import sys
from pathlib import Path

# The library lives beside the Snakefile: make it importable here and in every script and cluster job (we set
# PYTHONPATH, we do not require it, so there is nothing for an envvars directive to assert).
sys.path.insert(0, workflow.basedir)
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")])))

from robustft.config import (
    ConfigError,
    cap_key,
    cap_value,
    canonical_json,
    is_file_reference,
    load_yaml_strict,
    manifest_domains,
    pixel_spec,
    resolved_variant,
    run_table,
    study_table,
    validate_config,
    variant_protocol,
)
from robustft.code_closure import CodeClosure
from robustft.soups import soup_table
from robustft.network import set_jobs_offline
from snakemake.utils import validate

# Jobs never touch the network (GPU nodes usually have none): the model hub's offline switches are set here, so
# every job inherits them, locally or on a cluster node (where the job parses this file again). Rule weights, on the
# submit node, gets the user's own settings back.
set_jobs_offline()


def _validated_config(raw):
    """Check every config file for duplicate keys, then the merged config against the schema (one-line errors)."""
    try:
        for path in workflow.configfiles:
            load_yaml_strict(path)
        checked = validate_config(raw)
    except ConfigError as exc:
        raise WorkflowError(f"config error: {exc}") from None
    # Checks only: the training block's defaults must not be filled in (see robustft.config._fill_defaults).
    validate(checked, "../config/schema.yaml", set_default=False)
    return checked


config.update(_validated_config(config))

# One study per (dataset, backbone) pair; its folder results/<dataset>/<backbone>/ holds its reference head, runs
# and summary. The path keys are named from what the results depend on (robustft.config.study_table).
STUDIES = study_table(config)
RUNS = run_table(config)
STUDY = {s["study"]: s for s in STUDIES}
SOUPS = soup_table(config, STUDIES)  # model soups of each study's runs (rules/soups.smk)
BACKBONES = {s["backbone"]: s["backbone_spec"] for s in STUDIES}  # backbone key -> backbone block
DATA = {s["data"]: s["dataset_spec"] for s in STUDIES}  # manifest key -> a dataset block with its settings
PREPROCESS = {s["preprocess"]: pixel_spec(s["backbone_spec"]) for s in STUDIES}  # pixel cache key -> spec
PREPROCESS_OF = {s["backbone"]: s["preprocess"] for s in STUDIES}  # backbone key -> its pixel cache key
LOCAL_PACS = "results/data/PACS"  # where rule fetch_pacs puts PACS when a configured root is absent


def _alternatives(names):
    """A regex matching exactly one of ``names`` (longest first)."""
    return "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))


# Names built from hashes (dataset, backbone, data, preprocess) are one path segment each (input functions look them
# up); the others are constrained to what the config allows. (Long alternations of every key cost dry-run time on
# every file, measured with bench/bench_snakemake.py.)
wildcard_constraints:
    dataset=r"[^/]+",
    backbone=r"[^/]+",
    data=r"[^/]+",
    preprocess=r"[^/]+",
    domain=_alternatives(d for s in STUDIES for d in [s["id_domain"], *s["ood_domains"]]),
    split="train|val|test",
    cap=r"all|max\d+",
    method=_alternatives(config["methods"]),
    seed=r"\d+",
    fold=r"\d+",
    variant=r"[A-Za-z0-9][A-Za-z0-9_-]*",


CODE = CodeClosure(workflow.basedir, cache=".snakemake/robustft/code_closure.json")


def code_version(script):
    """A hash of a workflow script and every library file it imports (robustft.code_closure), a param of the rule
    that runs it: a change in that code reruns the rule's jobs, a change elsewhere none."""
    version = CODE.version(Path(workflow.basedir) / "workflow_scripts" / script)
    CODE.save_cache()
    return version


# ------------------------------------------------------------------------------------------------ names and paths


def study(wildcards):
    """The study of a job with ``dataset`` and ``backbone`` wildcards."""
    return STUDY[f"{wildcards.dataset}/{wildcards.backbone}"]


def backbone_spec(key):
    """A backbone's settings as the library takes them (``templates`` is a separate param)."""
    return {k: v for k, v in BACKBONES[key].items() if k != "templates"}


def per_backbone(value_of):
    """A param that depends on the job's backbone: the value itself where every backbone gives the same one (a
    callable param costs every job some dry-run time)."""
    values = {key: value_of(key) for key in BACKBONES}
    if len({canonical_json(v) for v in values.values()}) == 1:
        return next(iter(values.values()))
    return lambda wildcards: values[wildcards.backbone]


def per_study(value_of):
    """A param that depends on the job's study: the value itself where every study gives the same one."""
    values = {key: value_of(s) for key, s in STUDY.items()}
    if len({canonical_json(v) for v in values.values()}) == 1:
        return next(iter(values.values()))
    return lambda wildcards: values[f"{wildcards.dataset}/{wildcards.backbone}"]


@functools.cache
def job_backbone(key):
    """The backbone of a job that builds the model: its settings and the weights record it loads the file from."""
    return backbone_spec(key) | {"weights_record": rules.weights.output.record.format(backbone=key)}


def weights_inputs(wildcards):
    """The local files a backbone's weights come from (a changed file reruns rule weights and what follows)."""
    spec = BACKBONES[wildcards.backbone]
    files = {"model_config": spec.get("model_config")}
    if spec["name"] == "open_clip" and spec.get("pretrained") and is_file_reference(spec["pretrained"]):
        files["checkpoint"] = spec["pretrained"]
    if spec["name"] != "open_clip" and spec.get("weights"):
        files["checkpoint"] = spec["weights"]
    return {k: v for k, v in files.items() if v}


def dataset_root(dataset):
    """The configured dataset root, or the fetched copy where it is absent and fetching is allowed."""
    root = Path(dataset["root"])
    if root.is_dir() or not dataset["fetch"] or dataset["name"] != "pacs":
        return str(root)
    return LOCAL_PACS


def eval_splits(s):
    """(domain, split) of every evaluated split of a study: ID val and test, each OOD domain's test."""
    return [(s["id_domain"], "val"), (s["id_domain"], "test")] + [(d, "test") for d in s["ood_domains"]]


def run_path(template, run):
    """``template`` (a run rule's output) for one row of the run table."""
    return template.format(dataset=run["dataset"], backbone=run["backbone"], method=run["method"],
                           variant=run["variant"], seed=run["seed"])


def soup_path(template, soup):
    """``template`` (a soup rule's output) for one row of SOUPS."""
    return template.format(dataset=soup["dataset"], backbone=soup["backbone"], kind=soup["kind"], source=soup["source"])


def study_runs(s):
    return [r for r in RUNS if r["study"] == s["study"]]


def study_soups(s):
    return [soup for soup in SOUPS if soup["study"] == s["study"]]


# ----------------------------------------------------------------------------------------------- input functions


def manifest_inputs(wildcards):
    """The fetched-PACS marker when the configured root is absent."""
    if dataset_root(DATA[wildcards.data]) == LOCAL_PACS:
        return {"fetched": rules.fetch_pacs.output.marker}
    return {}


def manifest_params(wildcards):
    """What the manifest depends on: dataset adapter, root, the domains it scans, split, bad-image policy, and the
    image counts it checks the copy against (None = the adapter's published counts)."""
    dataset = DATA[wildcards.data]
    return {"dataset": dataset["name"], "root": dataset_root(dataset), "domains": manifest_domains(dataset),
            "split": dataset["split"], "on_bad_image": dataset["on_bad_image"],
            "expected_counts": dataset.get("expected_counts")}


@functools.cache
def _study_inputs(key):
    """The cache files one study's jobs read, by job kind (computed once per study, not once per job)."""
    s = STUDY[key]
    caps = s["dataset_spec"]["max_per_class"]

    def pixels(domain, split):
        return rules.pixel_cache.output.pixels.format(data=s["data"], preprocess=s["preprocess"], domain=domain,
                                                      split=split, cap=cap_key(caps[split]))

    def features(domain, split):
        return rules.features.output.features.format(backbone=s["backbone"], data=s["data"], domain=domain,
                                                     split=split, cap=cap_key(caps[split]))

    manifest = rules.manifest.output.manifest.format(data=s["data"])
    sweep = {"manifest": manifest}
    for domain, split in eval_splits(s):
        sweep[f"pixels_{domain}_{split}"] = pixels(domain, split)
        sweep[f"features_{domain}_{split}"] = features(domain, split)
    ident = s["id_domain"]
    if config["sweep"]["fisher"]:
        sweep["train_pixels"] = pixels(ident, "train")
    gamma_inputs = {"train_pixels": pixels(ident, "train"), "train_features": features(ident, "train")}
    return {
        "manifest": manifest,
        "training": {"manifest": manifest, "train_pixels": pixels(ident, "train"), "val_pixels": pixels(ident, "val"),
                     "train_features": features(ident, "train"), "val_features": features(ident, "val")},
        "reference": {"manifest": manifest, "train": features(ident, "train"), "val": features(ident, "val")},
        "pcv_logits": {"manifest": manifest, "val_pixels": pixels(ident, "val"), "val_features": features(ident, "val")},
        "sweep": sweep,
        "gamma_source": gamma_inputs,
    }


def study_inputs(wildcards, kind):
    """``kind`` (see :func:`_study_inputs`) of the study of a job with ``dataset`` and ``backbone`` wildcards."""
    return _study_inputs(f"{wildcards.dataset}/{wildcards.backbone}")[kind]


def study_manifest(wildcards):
    return study_inputs(wildcards, "manifest")


def training_inputs(wildcards):
    """The caches a fine-tuning job reads: manifest, ID train/val pixels and features."""
    return dict(study_inputs(wildcards, "training"))


def reference_inputs(wildcards):
    """The reference head's inputs: the study's manifest and its ID train and val features."""
    return dict(study_inputs(wildcards, "reference"))


def pcv_logits_inputs(wildcards):
    """A PCV fold model's evaluation inputs: the study's manifest and its ID val pixels and features."""
    return dict(study_inputs(wildcards, "pcv_logits"))


def sweep_inputs(wildcards):
    """The manifest, every eval split's pixels and features, and the ID training caches only where the sweep reads
    them: pixels for the Fisher-weighted merge's sample; pixels and features for the training sample that gamma is
    chosen on (class-subset runs, calibration.gamma_source: train)."""
    inputs = dict(study_inputs(wildcards, "sweep"))
    if config["calibration"]["gamma_source"] == "train" and is_class_subset(wildcards.method, wildcards.variant):
        inputs.update(study_inputs(wildcards, "gamma_source"))
    return inputs


def variant_params(wildcards):
    """The resolved settings of one variant (training defaults, overrides, protocol) as canonical JSON."""
    if wildcards.variant not in config["methods"].get(wildcards.method, {}):
        raise WorkflowError(f"methods.{wildcards.method}.{wildcards.variant}: no such variant in the config")
    return _variant_json(wildcards.method, wildcards.variant)


@functools.cache
def _variant_json(method, variant):
    return canonical_json(resolved_variant(config, method, variant))


@functools.cache
def _variant_devices(method, variant):
    resolved = resolved_variant(config, method, variant)
    return int(resolved["overrides"].get("devices", resolved["training"].get("devices", 1)))


def job_devices(wildcards):
    """The data-parallel ranks (GPUs on one node) of a fine-tuning job: its variant's `devices` (default 1)."""
    return _variant_devices(wildcards.method, wildcards.variant)


@functools.cache
def is_class_subset(method, variant):
    return variant_protocol(resolved_variant(config, method, variant))["kind"] == "class_subset"


def calibrate_inputs(wildcards):
    """The manifest, and the PCV fold logits a class-subset run's calibration needs (none for other protocols)."""
    inputs = {"manifest": study_manifest(wildcards)}
    if is_class_subset(wildcards.method, wildcards.variant):
        values = dict(wildcards.items())
        inputs["pcv"] = [rules.pcv_logits.output.logits.format(**values, fold=k)
                         for k in range(config["calibration"]["pcv_folds"])]
    return inputs


def study_description(s):
    """What the summary and the report say about a study (robustft.pipeline.analysis.summary_stage's ``studies``)."""
    return {"study": s["study"], "dataset": s["dataset_spec"]["name"], "backbone": s["backbone"],
            "id_domain": s["id_domain"], "ood_domains": s["ood_domains"]}


def features_pixels(wildcards):
    """The pixel cache a feature cache encodes: same manifest, domain, split and cap, the backbone's preprocessing."""
    return rules.pixel_cache.output.pixels.format(data=wildcards.data, preprocess=PREPROCESS_OF[wildcards.backbone],
                                                  domain=wildcards.domain, split=wildcards.split, cap=wildcards.cap)


def study_summary_inputs(wildcards):
    """Every run of one study, and its soups: their metrics and run.json."""
    runs = study_runs(study(wildcards))
    soups = study_soups(study(wildcards))
    return {"metrics": metrics_files(runs, soups),
            "runs": [run_path(rules.finetune.output.run, r) for r in runs]
            + [soup_path(rules.soup.output.run, soup) for soup in soups]}


# ------------------------------------------------------------------------- model soups, per-class damage


def soup_of(wildcards):
    """The row of SOUPS (robustft.soups.soup_table) of a soup job."""
    key = (f"{wildcards.dataset}/{wildcards.backbone}", wildcards.kind, wildcards.source)
    for soup in SOUPS:
        if (soup["study"], soup["kind"], soup["source"]) == key:
            return soup
    raise WorkflowError(f"no {wildcards.kind} soup of {wildcards.source} in study {key[0]} (see soups: in the config)")


def soup_inputs(wildcards):
    """The soup's ingredients (their run.json) and the ID validation caches greedy selection is scored on."""
    soup = soup_of(wildcards)
    runs = [run_path(rules.finetune.output.run, {**soup, **r}) for r in soup["ingredients"]]
    return {**study_inputs(wildcards, "pcv_logits"), "runs": runs}


def soup_sweep_inputs(wildcards):
    """As rule sweep's (sweep_inputs), the soup's protocol deciding whether gamma's training sample is read."""
    inputs = dict(study_inputs(wildcards, "sweep"))
    if config["calibration"]["gamma_source"] == "train" and soup_of(wildcards)["protocol"]["kind"] == "class_subset":
        inputs.update(study_inputs(wildcards, "gamma_source"))
    return inputs


def per_class_inputs(wildcards):
    """The study's summary (each run's chosen alpha), and every run's and soup's sweep logits with its run.json."""
    s = study(wildcards)
    runs = [r for r in study_runs(s) if r["method"] != "zeroshot"]  # zeroshot is the reference: no change
    soups = study_soups(s)
    return {
        "manifest": study_manifest(wildcards),
        "summary": rules.study_summary.output.summary.format(dataset=s["dataset"], backbone=s["backbone"]),
        "logits": [run_path(rules.sweep.output.logits, r) for r in runs]
        + [soup_path(rules.soup_sweep.output.logits, soup) for soup in soups],
        "runs": [run_path(rules.finetune.output.run, r) for r in runs]
        + [soup_path(rules.soup.output.run, soup) for soup in soups],
    }


def report_description():
    """What the report says about the config: datasets, backbones and studies by label, methods, seeds, sweep."""
    description = {k: v for k, v in config.items() if k in ("methods", "seeds", "sweep", "report")}
    description["studies"] = [study_description(s) | {"dataset_label": s["dataset_label"],
                                                       "backbone_label": s["backbone_label"]} for s in STUDIES]
    description["datasets"] = {s["dataset_label"]: s["dataset_spec"] for s in STUDIES}
    description["backbones"] = {s["backbone_label"]: backbone_spec(s["backbone"]) for s in STUDIES}
    if len(description["datasets"]) == 1:
        description["dataset"] = next(iter(description["datasets"].values()))
    if len(description["backbones"]) == 1:
        description["backbone"] = next(iter(description["backbones"].values()))
    return description


def metrics_files(runs, soups):
    """The metrics of these runs and soups, runs first (the summary's rows come from them)."""
    return ([run_path(rules.calibrate.output.metrics, r) for r in runs]
            + [soup_path(rules.soup_calibrate.output.metrics, soup) for soup in soups])


def every_metrics_file():
    """The metrics of every run and every soup of the config."""
    return metrics_files(RUNS, SOUPS)


def every_metrics_study():
    """The study of each file of :func:`every_metrics_file`, in its order."""
    return [r["study"] for r in RUNS] + [soup["study"] for soup in SOUPS]
