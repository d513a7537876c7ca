# Config validation, names and paths, and input functions. Parsing stays cheap: nothing here opens data.

import hashlib
import os
import sys
from pathlib import Path

# The library lives beside the Snakefile: make it importable here and in every script and cluster job (we set
# PYTHONPATH, we do not require it, so there is nothing for an envvars directive to assert).
sys.path.insert(0, workflow.basedir)
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")])))

from robustft.config import ConfigError, canonical_json, load_yaml_strict, resolved_variant, run_table, validate_config
from snakemake.utils import validate


def _validated_config(raw):
    """Check every config file for duplicate keys, then the merged config against the schema (one-line errors)."""
    try:
        for path in workflow.configfiles:
            load_yaml_strict(path)
        checked = validate_config(raw)
    except ConfigError as exc:
        raise WorkflowError(f"config error: {exc}") from None
    validate(checked, "../config/schema.yaml")  # fills nothing new; keeps the schema the single source
    return checked


config.update(_validated_config(config))

DATASET = config["dataset"]["name"]
ID_DOMAIN = config["dataset"]["id_domain"]
OOD_DOMAINS = config["dataset"]["ood_domains"]
DOMAINS = [ID_DOMAIN, *OOD_DOMAINS]
RUNS = run_table(config)


def _slug(text):
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))


def backbone_tag(spec):
    """A readable folder name for the backbone (with its resolution)."""
    size = spec.get("image_size") or "native"
    if spec["name"] == "open_clip":
        weights = Path(spec["pretrained"]).stem if spec.get("pretrained") else "random"
        return _slug(f"open_clip-{spec['model']}-{weights}-{size}px")
    weights = Path(spec["weights"]).stem if spec.get("weights") else "imagenet"
    return _slug(f"{spec['name']}-{weights}-{size}px")


def preprocess_tag(spec):
    """The pixel cache's folder name: resolution and resampling (normalisation is applied on the fly)."""
    if spec["name"] == "open_clip":
        return _slug(f"{spec['model']}-{spec.get('image_size') or 'native'}px_bicubic")
    return f"{spec.get('image_size') or 224}px_bilinear"


BACKBONE = backbone_tag(config["backbone"])
PREPROCESS = preprocess_tag(config["backbone"])
BACKBONE_SPEC = {k: v for k, v in config["backbone"].items() if k != "templates"}
EVAL_SPLITS = [(ID_DOMAIN, "val"), (ID_DOMAIN, "test")] + [(d, "test") for d in OOD_DOMAINS]


wildcard_constraints:
    dataset=DATASET,
    backbone=BACKBONE,
    preprocess=PREPROCESS,
    domain="|".join(DOMAINS),
    split="train|val|test",
    method="|".join(config["methods"]),
    seed=r"\d+",
    fold=r"\d+",
    variant=r"[A-Za-z0-9][A-Za-z0-9_-]*",


def code_version(*parts):
    """A hash of library sources, used as a param so that changing the code a rule runs reruns that rule."""
    digest = hashlib.sha256()
    for part in parts:
        base = Path(workflow.basedir) / part
        for file in sorted(base.rglob("*.py")) if base.is_dir() else [base]:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def dataset_root():
    """The configured dataset root, or the fetched copy where it is absent and fetching is allowed."""
    root = Path(config["dataset"]["root"])
    if root.is_dir() or not config["dataset"]["fetch"] or DATASET != "pacs":
        return str(root)
    return "results/data/PACS"


def manifest_inputs(wildcards):
    """The fetched-PACS marker when the configured root is absent."""
    return {"fetched": "results/data/PACS/.complete"} if dataset_root() == "results/data/PACS" else {}


def split_cap(split):
    return config["dataset"]["max_per_class"][split]


def pixel_path(domain, split):
    return f"results/pixels/{DATASET}/{PREPROCESS}/{domain}_{split}.h5"


def feature_path(domain, split):
    return f"results/features/{BACKBONE}/{DATASET}/{domain}_{split}.h5"


MANIFEST = f"results/data/{DATASET}/manifest.parquet"
REFERENCE_HEAD = f"results/reference/{BACKBONE}/{DATASET}/head.safetensors"


RUN_DIR = "results/runs/{method}/{variant}/seed{seed}"


def run_dirs():
    """Every run directory the config asks for."""
    return [f"results/runs/{r['method']}/{r['variant']}/seed{r['seed']}" for r in RUNS]


def variant_params(wildcards):
    """The resolved settings of one variant (training defaults, overrides, protocol) as canonical JSON."""
    if wildcards.variant not in config["methods"].get(wildcards.method, {}):
        raise WorkflowError(f"methods.{wildcards.method}.{wildcards.variant}: no such variant in the config")
    return canonical_json(resolved_variant(config, wildcards.method, wildcards.variant))


def eval_split_names():
    return [f"{domain}_{split}" for domain, split in EVAL_SPLITS]


def eval_pixel_paths(wildcards=None):
    return {f"{d}_{s}": pixel_path(d, s) for d, s in EVAL_SPLITS}


def eval_feature_paths(wildcards=None):
    return {f"{d}_{s}": feature_path(d, s) for d, s in EVAL_SPLITS}


def sweep_fisher_inputs(wildcards):
    """The ID training caches, only where the sweep reads them: pixels for the Fisher-weighted merge's sample; pixels
    and features for the training sample that gamma is chosen on (class-subset runs, calibration.gamma_source: train)."""
    inputs = {"train_pixels": pixel_path(ID_DOMAIN, "train")} if config["sweep"]["fisher"] else {}
    if config["calibration"]["gamma_source"] == "train" and is_class_subset(wildcards.method, wildcards.variant):
        inputs.update(train_pixels=pixel_path(ID_DOMAIN, "train"), train_features=feature_path(ID_DOMAIN, "train"))
    return inputs


def is_class_subset(method, variant):
    protocol = {**config["protocol"], **config["methods"][method][variant].get("protocol", {})}
    return protocol["kind"] == "class_subset"


def pcv_inputs(wildcards):
    """The PCV fold logits a class-subset run's calibration needs (none for other protocols)."""
    if not is_class_subset(wildcards.method, wildcards.variant):
        return {}
    folds = range(config["calibration"]["pcv_folds"])
    return {"pcv": [f"results/runs/{wildcards.method}/{wildcards.variant}/seed{wildcards.seed}/pcv/fold{k}/val_logits.h5" for k in folds]}
