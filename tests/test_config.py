"""Config validation: defaults, one-line errors naming the key and what is allowed, strict YAML, Snakemake parse."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from robustft.config import ConfigError, load_schema, load_yaml_strict, validate_config

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "config.yaml"


@pytest.fixture(scope="module")
def embedded() -> dict:
    return load_yaml_strict(EMBEDDED)


def _error(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    assert message.strip() == message and message
    return message


def _modified(base: dict, edit) -> dict:
    config = copy.deepcopy(base)
    edit(config)
    return config


# --- the embedded config and defaults ----------------------------------------------------------------------------


def test_embedded_config_validates_and_gets_defaults(embedded):
    config = validate_config(embedded)
    schema = load_schema()
    # Values given in config.yaml are kept ...
    assert config["dataset"]["name"] == embedded["dataset"]["name"] == "pacs"
    assert config["backbone"]["image_size"] == embedded["backbone"]["image_size"]
    assert config["dataset"]["max_per_class"] == embedded["dataset"]["max_per_class"]
    assert config["methods"].keys() == embedded["methods"].keys()
    # ... and every missing key gets the schema's default, recursively.
    assert config["dataset"]["on_bad_image"] == "error"
    assert "workers" not in config["dataset"]  # data stages use their job's threads (rule threads, set-threads)
    assert config["reference"]["l2_grid"] == schema["properties"]["reference"]["properties"]["l2_grid"]["default"]
    assert config["training"] == {**embedded["training"], "device": "auto"}  # hyperparameter defaults: not filled
    assert config["protocol"] == {"kind": "full", "k": 16, "absent_classes": []}
    assert config["calibration"]["gamma_source"] == "val"
    assert config["eval"]["bootstrap"] == 1000
    assert config["report"]["title"] == "robustft report"
    assert config["compute"] == {"cpu_threads": 2}
    # The input is not modified in place.
    assert "reference" not in embedded


def test_empty_config_gets_all_defaults():
    config = validate_config({})
    assert config["dataset"]["id_domain"] == "photo"
    assert config["dataset"]["split"] == {"val_fraction": 0.15, "test_fraction": 0.25, "seed": 0}
    assert config["methods"] == {"zeroshot": {"default": {}}}
    assert config["seeds"] == [0]
    assert config["sweep"]["alphas"][0] == 0.0 and config["sweep"]["alphas"][-1] == 1.0


def test_every_schema_property_has_a_default_and_description():
    def walk(node, where):
        for key, sub in node.get("properties", {}).items():
            assert "default" in sub, f"{where}{key} has no default"
            assert "description" in sub, f"{where}{key} has no description"
            walk(sub, f"{where}{key}.")

    walk(load_schema(), "")


# --- one-line errors -------------------------------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_closest(embedded):
    message = _error({**embedded, "datset": {"name": "pacs"}})
    assert message.startswith("datset: unknown key")
    assert "did you mean 'dataset'?" in message
    assert "allowed:" in message and "training" in message and "sweep" in message


def test_unknown_nested_key(embedded):
    message = _error(_modified(embedded, lambda c: c["training"].update(learning_rate=1e-4)))
    assert message.startswith("training.learning_rate: unknown key")
    assert "allowed:" in message and "lr" in message and "weight_decay" in message

    message = _error(_modified(embedded, lambda c: c["dataset"]["split"].update(sed=1)))
    assert message.startswith("dataset.split.sed: unknown key")
    assert "did you mean 'seed'?" in message


@pytest.mark.parametrize(
    ("edit", "key", "expected"),
    [
        (lambda c: c["training"].update(epochs="ten"), "training.epochs", "integer"),
        (lambda c: c["training"].update(lr="fast"), "training.lr", "number"),
        (lambda c: c.update(seeds=0), "seeds", "array"),
        (lambda c: c.update(dataset=None), "dataset", "object"),
        (lambda c: c["dataset"].update(fetch="yes"), "dataset.fetch", "boolean"),
    ],
)
def test_wrong_type(embedded, edit, key, expected):
    message = _error(_modified(embedded, edit))
    assert message.startswith(f"{key}: ")
    assert "wrong type" in message and f"expected {expected}" in message


@pytest.mark.parametrize(
    ("edit", "key", "allowed"),
    [
        (lambda c: c["sweep"].update(alphas=[0.0, 0.5, 1.5]), "sweep.alphas.2", ">= 0 and <= 1"),
        (lambda c: c["sweep"].update(alphas=[-0.1, 1.0]), "sweep.alphas.0", ">= 0 and <= 1"),
        (lambda c: c["training"].update(lr=0), "training.lr", "> 0"),
        (lambda c: c["training"].update(lr=-1e-4), "training.lr", "> 0"),
        (lambda c: c["training"].update(weight_decay=-0.1), "training.weight_decay", ">= 0"),
        (lambda c: c["training"].update(epochs=0), "training.epochs", ">= 1"),
        (lambda c: c["dataset"]["split"].update(val_fraction=1.0), "dataset.split.val_fraction", ">= 0 and < 1"),
        (lambda c: c["dataset"]["max_per_class"].update(train=0), "dataset.max_per_class.train", ">= 1"),
    ],
)
def test_out_of_range(embedded, edit, key, allowed):
    message = _error(_modified(embedded, edit))
    assert message.startswith(f"{key}: ")
    assert "out of range" in message and f"(allowed: {allowed})" in message


@pytest.mark.parametrize(
    ("edit", "key", "allowed"),
    [
        # variant overrides of training keys are checked against the training schema too
        (lambda c: c["methods"]["full_ft"].update(bad={"lr": -1.0}), "methods.full_ft.bad.lr", "> 0"),
        (lambda c: c["methods"]["full_ft"].update(bad={"weight_decay": -0.5}), "methods.full_ft.bad.weight_decay", ">= 0"),
        (lambda c: c["methods"]["lp_ft"].update(default={"epochs": 0}), "methods.lp_ft.default.epochs", ">= 1"),
        (lambda c: c["methods"]["full_ft"].update(bad={"protocol": {"kind": "kshot", "k": 0}}), "methods.full_ft.bad.protocol.k", ">= 1"),
    ],
)
def test_out_of_range_in_variant_overrides(embedded, edit, key, allowed):
    message = _error(_modified(embedded, edit))
    assert message.startswith(f"{key}: ")
    assert f"(allowed: {allowed})" in message


def test_unknown_method_names_it_and_the_allowed_ones(embedded):
    message = _error(_modified(embedded, lambda c: c["methods"].update(fullft={"default": {}})))
    assert message.startswith("methods")
    assert "'fullft'" in message and "did you mean 'full_ft'?" in message
    for name in ("zeroshot", "full_ft", "lp_ft", "flyp"):
        assert name in message


def test_unknown_backbone(embedded):
    message = _error(_modified(embedded, lambda c: c["backbone"].update(name="resnet50")))
    assert message.startswith("backbone.name: 'resnet50' is not allowed")
    assert "(allowed: efficientnet_lite0, open_clip)" in message


def test_unknown_dataset_suggests_the_closest(embedded):
    message = _error(_modified(embedded, lambda c: c["dataset"].update(name="pacss")))
    assert message.startswith("dataset.name: 'pacss' is not allowed; did you mean 'pacs'?")
    assert "pacs, imagefolder, imagenet, domainnet" in message


def test_unknown_enum_value_in_variant_override(embedded):
    message = _error(_modified(embedded, lambda c: c["methods"]["full_ft"].update(bad={"protocol": {"kind": "fewshot"}})))
    assert message.startswith("methods.full_ft.bad.protocol.kind: 'fewshot' is not allowed")
    assert "full, kshot, class_subset" in message
    message = _error(_modified(embedded, lambda c: c["methods"]["full_ft"].update(bad={"protocol": {"knd": "full"}})))
    assert message.startswith("methods.full_ft.bad.protocol.knd: unknown key; did you mean 'kind'?")


def test_ood_domain_equal_to_id_domain(embedded):
    id_domain = embedded["dataset"]["id_domain"]
    other = next(d for d in ("photo", "art_painting", "cartoon", "sketch") if d != id_domain)
    message = _error(_modified(embedded, lambda c: c["dataset"].update(ood_domains=[other, id_domain])))
    assert message.startswith("dataset.ood_domains: ")
    assert f"'{id_domain}'" in message and "dataset.id_domain" in message


def test_duplicate_ood_domains(embedded):
    other = next(d for d in ("photo", "art_painting", "cartoon", "sketch") if d != embedded["dataset"]["id_domain"])
    message = _error(_modified(embedded, lambda c: c["dataset"].update(ood_domains=[other, other])))
    assert message.startswith("dataset.ood_domains: values must be unique")


def test_split_fractions_must_leave_training_images(embedded):
    message = _error(_modified(embedded, lambda c: c["dataset"]["split"].update(val_fraction=0.5, test_fraction=0.5)))
    assert message.startswith("dataset.split: ")
    assert "val_fraction + test_fraction" in message and "< 1" in message


@pytest.mark.parametrize("protocol", [{"kind": "class_subset"}, {"kind": "class_subset", "absent_classes": []}])
def test_class_subset_without_absent_classes(embedded, protocol):
    message = _error(_modified(embedded, lambda c: c["methods"]["full_ft"].update(absent3={"protocol": protocol})))
    assert message.startswith("methods.full_ft.absent3.protocol.absent_classes: ")
    assert "at least one absent class" in message


def test_class_subset_from_the_shared_protocol_without_absent_classes():
    message = _error({"protocol": {"kind": "class_subset"}, "methods": {"full_ft": {"default": {}}}})
    assert message.startswith("methods.full_ft.default.protocol.absent_classes: ")


def test_flyp_needs_open_clip(embedded):
    message = _error(_modified(embedded, lambda c: c["methods"].update(flyp={"default": {}})))
    assert message.startswith("methods.flyp.default: flyp needs an open_clip backbone")


def test_kshot_with_a_classifier_backbone_is_refused_naming_the_variant(embedded):
    """The reference head of a classifier backbone is a linear probe on the whole ID training split: a k-shot run
    would start from (and interpolate toward) a head that has seen every training image (issue #14)."""
    kshot = {"protocol": {"kind": "kshot", "k": 4}}
    message = _error(_modified(embedded, lambda c: c["methods"]["full_ft"].update(k4=kshot)))
    assert message.startswith("methods.full_ft.k4: the kshot protocol needs an open_clip backbone")
    assert "'efficientnet_lite0'" in message and "linear probe" in message
    # from the shared protocol too: the first variant is named
    message = _error(_modified(embedded, lambda c: c.update(protocol={"kind": "kshot", "k": 4})))
    assert message.startswith("methods.zeroshot.default: the kshot protocol needs an open_clip backbone")
    # with an open_clip backbone the same variant is valid
    clip = {"name": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}
    validate_config(_modified(embedded, lambda c: (c["methods"]["full_ft"].update(k4=kshot),
                                                  c.update(backbone=clip))))


def test_empty_method_and_seeds(embedded):
    assert _error(_modified(embedded, lambda c: c["methods"].update(full_ft={}))) == "methods.full_ft: must not be empty"
    assert _error(_modified(embedded, lambda c: c.update(seeds=[]))) == "seeds: must not be empty"


# --- strict YAML -----------------------------------------------------------------------------------------------------


def test_duplicate_variant_names_in_yaml(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(
        "methods:\n"
        "  full_ft:\n"
        "    default: {}\n"
        "    strong: {lr: 1.0e-3}\n"
        "    strong: {lr: 1.0e-2}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_yaml_strict(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "duplicate key 'strong'" in message and "line 5" in message


def test_duplicate_top_level_key_in_yaml(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seeds: [0]\ntraining: {lr: 1.0}\nseeds: [1]\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'seeds' at line 3"):
        load_yaml_strict(path)


def test_strict_yaml_loads_the_same_as_safe_load():
    import yaml

    assert load_yaml_strict(EMBEDDED) == yaml.safe_load(EMBEDDED.read_text())


# --- Snakemake parse-time validation ---------------------------------------------------------------------------------

WORKFLOW_PARTS = ("Snakefile", "rules", "workflow_scripts", "robustft", "config", "config.yaml", "envs", "profiles")


@pytest.fixture
def workflow_copy(tmp_path) -> Path:
    """A copy of the workflow (code and config only: no results/) to run Snakemake in."""
    dest = tmp_path / "wf"
    dest.mkdir()
    for part in WORKFLOW_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            shutil.copy2(source, dest / part)
    assert not (dest / "results").exists()
    return dest


def _snakemake_dry_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    snakemake = Path(sys.executable).with_name("snakemake")
    command = [str(snakemake), "-n", "--cores", "1", "--workflow-profile", "none", "--directory", str(workdir), *args]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=120)


def _config_error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "config error:" in line]


@pytest.mark.pipeline
def test_snakemake_bad_config_fails_at_parse_time(workflow_copy):
    result = _snakemake_dry_run(workflow_copy, "--config", "datset=1")
    assert result.returncode != 0
    lines = _config_error_lines(result)
    assert len(lines) == 1, result.stdout + result.stderr
    assert "config error: datset: unknown key; did you mean 'dataset'?" in lines[0]
    assert not (workflow_copy / "results").exists()


@pytest.mark.pipeline
def test_snakemake_bad_configfile_fails_at_parse_time(workflow_copy):
    bad = workflow_copy / "bad.yaml"
    bad.write_text("training:\n  lr: -0.001\n")
    result = _snakemake_dry_run(workflow_copy, "--configfile", str(bad))
    assert result.returncode != 0
    lines = _config_error_lines(result)
    assert len(lines) == 1, result.stdout + result.stderr
    assert "config error: training.lr: -0.001 is out of range (allowed: > 0)" in lines[0]
    assert not (workflow_copy / "results").exists()


@pytest.mark.pipeline
def test_snakemake_configfile_with_duplicate_keys_fails(workflow_copy):
    bad = workflow_copy / "dup.yaml"
    bad.write_text("methods:\n  full_ft:\n    default: {}\n    default: {lr: 1.0}\n")
    result = _snakemake_dry_run(workflow_copy, "--configfile", str(bad))
    assert result.returncode != 0
    lines = _config_error_lines(result)
    assert len(lines) == 1, result.stdout + result.stderr
    assert "duplicate key 'default'" in lines[0] and "dup.yaml" in lines[0]
    assert not (workflow_copy / "results").exists()


def test_unknown_method_hyperparameter_suggests_the_closest():
    config = {"methods": {"kd": {"soft": {"kd_wieght": 0.3}}}}
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    assert "\n" not in message and "methods.kd.soft.kd_wieght" in message and "'kd_weight'" in message


# --- studies: several datasets and backbones -------------------------------------------------------------------------

from robustft.config import backbone_key, data_key, dataset_key, run_table, study_table  # noqa: E402

PACS_PHOTO = {"name": "pacs", "id_domain": "photo", "ood_domains": ["sketch", "cartoon"]}
PACS_SKETCH = {"name": "pacs", "id_domain": "sketch", "ood_domains": ["photo", "cartoon"]}
LITE0 = {"name": "efficientnet_lite0", "image_size": 64}
CLIP = {"name": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}


def _matrix(**extra) -> dict:
    return {"datasets": {"photo": dict(PACS_PHOTO), "sketch": dict(PACS_SKETCH)},
            "backbones": {"lite0": dict(LITE0), "b32": dict(CLIP)},
            "methods": {"zeroshot": {"default": {}}, "full_ft": {"default": {}, "absent2": {
                "protocol": {"kind": "class_subset", "absent_classes": ["dog", "horse"]}}}},
            "seeds": [0, 1], **extra}


def test_the_single_dataset_and_backbone_config_is_one_study(embedded):
    config = validate_config(embedded)
    (study,) = study_table(config)
    assert study["dataset_label"] == "pacs" and study["backbone_label"] == "efficientnet_lite0"
    assert study["study"] == f"{study['dataset']}/{study['backbone']}"
    assert study["dataset"].startswith(f"pacs-{embedded['dataset']['id_domain']}-")
    assert study["backbone"] == f"efficientnet_lite0-imagenet-{embedded['backbone']['image_size']}px"
    assert study["methods"] == {m: list(v) for m, v in embedded["methods"].items()}
    assert len(run_table(config)) == sum(len(v) for v in embedded["methods"].values()) * len(config["seeds"])
    assert config["datasets"] == {} and config["backbones"] == {} and config["studies"] == []


def test_every_dataset_runs_with_every_backbone():
    config = validate_config(_matrix())
    studies = study_table(config)
    assert [(s["dataset_label"], s["backbone_label"]) for s in studies] == [
        ("photo", "lite0"), ("photo", "b32"), ("sketch", "lite0"), ("sketch", "b32")]
    assert len({s["study"] for s in studies}) == 4
    # the two PACS studies differ by their ID domain only: one manifest, two study folders
    assert len({s["data"] for s in studies}) == 1 and len({s["dataset"] for s in studies}) == 2
    assert {s["preprocess"] for s in studies} == {"efficientnet_lite0-64px", "open_clip-ViT-B-32-openai-nativepx"}
    runs = run_table(config)
    assert len(runs) == 4 * 3 * 2 and len({(r["study"], r["method"], r["variant"], r["seed"]) for r in runs}) == 24
    # each block gets its schema defaults
    assert config["datasets"]["photo"]["split"] == {"val_fraction": 0.15, "test_fraction": 0.25, "seed": 0}
    assert config["backbones"]["b32"]["templates"] == "openai_imagenet"


def test_folders_are_named_from_what_the_results_depend_on():
    base = validate_config({"dataset": dict(PACS_PHOTO)})["dataset"]

    def changed(**edit):
        return {**base, **edit}

    key, data = dataset_key(base), data_key(base)
    # another ID domain over the same domains: the same manifest, another study folder
    assert data_key(changed(id_domain="sketch", ood_domains=["photo", "cartoon"])) == data
    assert dataset_key(changed(id_domain="sketch", ood_domains=["photo", "cartoon"])) != key
    # the order of the OOD domains changes nothing
    assert dataset_key(changed(ood_domains=["cartoon", "sketch"])) == key
    # caps: another study folder, the same manifest; root, split, domains: another manifest
    assert dataset_key(changed(max_per_class={"train": 4, "val": None, "test": None})) != key
    assert data_key(changed(max_per_class={"train": 4, "val": None, "test": None})) == data
    for edit in ({"root": "/elsewhere/PACS"}, {"split": {"val_fraction": 0.1, "test_fraction": 0.25, "seed": 0}},
                 {"ood_domains": ["sketch"]}, {"on_bad_image": "skip"}):
        assert data_key(changed(**edit)) != data and dataset_key(changed(**edit)) != key, edit
    # labels are names in the config, not in paths
    a = study_table(validate_config(_matrix()))
    relabelled = _matrix(datasets={"x": dict(PACS_PHOTO), "y": dict(PACS_SKETCH)},
                         backbones={"p": dict(LITE0), "q": dict(CLIP)})
    assert [s["study"] for s in study_table(validate_config(relabelled))] == [s["study"] for s in a]


def test_backbone_folders():
    assert backbone_key(LITE0) == "efficientnet_lite0-imagenet-64px"
    assert backbone_key({"name": "efficientnet_lite0", "image_size": None}) == \
        backbone_key({"name": "efficientnet_lite0", "image_size": 224})
    assert backbone_key({**CLIP, "templates": "simple"}) == backbone_key(CLIP)
    a, b = (backbone_key({**CLIP, "pretrained": f"/{d}/model.safetensors"}) for d in ("x", "y"))
    assert a != b and a.startswith("open_clip-ViT-B-32-model-") and a.endswith("-nativepx")
    assert backbone_key({**CLIP, "image_size": 160}) == "open_clip-ViT-B-32-openai-160px"


def test_studies_restrict_pairs_and_methods():
    config = validate_config(_matrix(studies=[
        {"dataset": ["photo", "sketch"], "backbone": "b32"},
        {"dataset": "photo", "backbone": "lite0", "methods": ["zeroshot", "full_ft/absent2"]},
    ]))
    studies = study_table(config)
    assert [(s["dataset_label"], s["backbone_label"]) for s in studies] == [
        ("photo", "b32"), ("sketch", "b32"), ("photo", "lite0")]
    assert studies[0]["methods"] == {"zeroshot": ["default"], "full_ft": ["default", "absent2"]}
    assert studies[2]["methods"] == {"zeroshot": ["default"], "full_ft": ["absent2"]}
    assert len(run_table(config)) == (3 + 3 + 2) * 2


@pytest.mark.parametrize(("studies", "start", "contains"), [
    ([{"dataset": "phot", "backbone": "b32"}], "studies.0.dataset: unknown label 'phot'", "did you mean 'photo'?"),
    ([{"dataset": "photo", "backbone": "b23"}], "studies.0.backbone: unknown label 'b23'", "allowed: lite0, b32"),
    ([{"dataset": "photo", "backbone": "b32", "methods": ["fullft"]}], "studies.0.methods: 'fullft' is not a method",
     "did you mean 'full_ft'?"),
    ([{"dataset": "photo", "backbone": "b32", "methods": ["full_ft/absent3"]}], "studies.0.methods: 'full_ft/absent3'",
     "full_ft/absent2"),
    ([{"dataset": "photo", "backbone": "b32"}, {"dataset": ["sketch", "photo"], "backbone": "b32"}],
     "studies: the pair (dataset 'photo', backbone 'b32') is listed twice", ""),
    ([{"dataset": "photo"}], "studies.0: 'backbone' is a required property", ""),
])
def test_bad_studies(studies, start, contains):
    message = _error(_matrix(studies=studies))
    assert message.startswith(start) and contains in message, message


def test_matrix_errors_name_the_entry():
    assert _error(_matrix(datasets={"photo": {**PACS_PHOTO, "ood_domains": ["photo"]}})).startswith(
        "datasets.photo.ood_domains: 'photo' is the ID domain (datasets.photo.id_domain)")
    message = _error(_matrix(backbones={"lite0": {**LITE0, "imagesize": 64}}))
    assert message.startswith("backbones.lite0.imagesize: unknown key; did you mean 'image_size'?"), message
    message = _error(_matrix(backbones={"a": dict(CLIP), "b": {**CLIP, "templates": "simple"}}))
    assert message.startswith("backbones.a and backbones.b: the same model and weights"), message
    message = _error(_matrix(datasets={"a": dict(PACS_PHOTO), "b": {**PACS_PHOTO, "ood_domains": ["cartoon", "sketch"]}}))
    assert message.startswith("datasets.a and datasets.b: the same data"), message


def test_a_single_block_beside_several_is_refused():
    message = _error({**_matrix(), "dataset": {"name": "pacs", "id_domain": "sketch"}})
    assert message.startswith("dataset and datasets: give one of them") and "--replace-workflow-config" in message
    message = _error({**_matrix(), "backbone": dict(LITE0)})
    assert message.startswith("backbone and backbones: give one of them")
    # one dataset with several backbones
    studies = study_table(validate_config({"dataset": dict(PACS_PHOTO), "backbones": {"a": LITE0, "b": CLIP}}))
    assert [(s["dataset_label"], s["backbone_label"]) for s in studies] == [("pacs", "a"), ("pacs", "b")]


def test_flyp_and_kshot_in_a_mixed_matrix_need_a_restriction():
    flyp = _matrix(methods={"zeroshot": {"default": {}}, "flyp": {"default": {}}})
    message = _error(flyp)
    assert message.startswith("methods.flyp.default: flyp needs an open_clip backbone (backbones.lite0.name is")
    assert "studies:" in message
    kshot = _matrix(methods={"full_ft": {"k4": {"protocol": {"kind": "kshot", "k": 4}}}})
    assert _error(kshot).startswith("methods.full_ft.k4: the kshot protocol needs an open_clip backbone "
                                    "(backbones.lite0.name is 'efficientnet_lite0'")
    restricted = [{"dataset": ["photo", "sketch"], "backbone": "b32"},
                  {"dataset": "photo", "backbone": "lite0", "methods": ["zeroshot"]}]
    assert len(study_table(validate_config({**flyp, "studies": restricted}))) == 3


def test_both_fine_tuning_rules_pass_the_backbone_templates():
    """FLYP builds its prompts from backbone.templates (issue #14): the PCV fold runs must get them too."""
    import re

    text = "".join(path.read_text() for path in sorted((REPO / "rules").glob("*.smk")))
    for rule in ("finetune", "finetune_pcv"):
        block = re.search(rf"^rule {rule}:\n((?:[ \t]+.*\n|\n)*)", text, re.M)[1]
        assert re.search(r'^\s+templates=per_backbone\(lambda key: BACKBONES\[key\]\["templates"\]\),$', block, re.M), rule
