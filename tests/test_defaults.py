"""One home for every default: the schema's hyperparameter entries are generated from the method dataclasses, and a
value comes from the variant, else the ``training:`` block, else the method's paper default, else the shared one."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustft.config import SCHEMA_PATH, load_schema, load_yaml_strict, resolved_variant, validate_config
from robustft.methods import METHODS, get_method
from robustft.methods import schema as schema_module
from robustft.methods.base import (
    SOURCES,
    TrainingHyperparameters,
    hyperparameter,
    hyperparameter_sources,
    resolve_hyperparameters,
)
from robustft.methods.full_ft import FullFineTuning
from robustft.methods.l2sp import L2SP, L2SPHyperparameters

REPO = Path(__file__).resolve().parent.parent
SHARED = {f.name: f for f in dataclasses.fields(TrainingHyperparameters)}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _redeclared(method) -> list[str]:
    """The shared fields a method's dataclass re-declares with its paper's default."""
    return [f.name for f in dataclasses.fields(method.hyperparameters) if f.name in SHARED and SHARED[f.name] is not f]


# --------------------------------------------------------------------------- the schema is generated, not written


def test_committed_schema_equals_the_generated_one():
    text = SCHEMA_PATH.read_text()
    assert schema_module.render(text) == text, f"config/schema.yaml is stale: run {schema_module.COMMAND}"
    assert schema_module.main(["--check"]) == 0


def test_schema_and_dataclass_defaults_agree_for_every_method_and_field():
    schema = load_schema()
    training = schema["properties"]["training"]["properties"]
    own = schema["$defs"]["method_hyperparameters"]
    assert set(own) - {"description"} == set(METHODS)
    for name, f in SHARED.items():
        if name != "protocol":  # the config's top-level protocol block
            assert training[name]["default"] == _default(f), name
    for method, cls in METHODS.items():
        for f in dataclasses.fields(cls.hyperparameters):
            if f.name == "protocol":
                continue
            entry = own[method].get(f.name, training.get(f.name))
            assert entry is not None, f"{method}.{f.name} is in no schema entry"
            assert entry["default"] == _default(f), (method, f.name)
            assert entry["description"] == f.metadata["description"], (method, f.name)
            # a method's entry exactly where its dataclass adds or re-declares the field
            assert (f.name in own[method]) == (SHARED.get(f.name) is not f), (method, f.name)


def test_l2sp_l1sp_and_ewc_document_their_weight_decay_in_the_schema():
    own = load_schema()["$defs"]["method_hyperparameters"]
    assert {m for m in METHODS if "weight_decay" in own[m]} == {"l2sp", "l1sp", "ewc"}
    assert all(own[m]["weight_decay"]["default"] == 0.0 for m in ("l2sp", "l1sp", "ewc"))


@dataclasses.dataclass
class _ChangedL2SP(L2SPHyperparameters):
    encoder_strength: float = hyperparameter(0.5, "alpha of L2-SP, changed by this test.", minimum=0)


class _ChangedMethod(L2SP):
    hyperparameters = _ChangedL2SP


def test_changing_a_dataclass_default_makes_the_committed_schema_stale(tmp_path, monkeypatch, capsys):
    copy_path = tmp_path / "schema.yaml"
    copy_path.write_text(SCHEMA_PATH.read_text())
    monkeypatch.setattr(schema_module, "METHODS", {**METHODS, "l2sp": _ChangedMethod})
    assert schema_module.main(["--check", "--schema", str(copy_path)]) == 1
    assert schema_module.COMMAND in capsys.readouterr().err
    assert schema_module.main(["--write-schema", "--schema", str(copy_path)]) == 0
    written = yaml.safe_load(copy_path.read_text())
    assert written["$defs"]["method_hyperparameters"]["l2sp"]["encoder_strength"]["default"] == 0.5
    assert schema_module.main(["--check", "--schema", str(copy_path)]) == 0
    # only the changed entry's line differs: the hand-written rest of the schema is kept as it is
    before, after = SCHEMA_PATH.read_text().splitlines(), copy_path.read_text().splitlines()
    assert len(before) == len(after)
    assert [b for a, b in zip(before, after) if a != b] == [
        "      encoder_strength: {type: number, minimum: 0, default: 0.5, description: 'alpha of L2-SP, changed "
        "by this test.'}"]


def test_a_field_without_a_description_or_schema_type_is_refused():
    @dataclasses.dataclass
    class Plain(TrainingHyperparameters):
        strength: float = 1.0

    with pytest.raises(ValueError, match=r"Plain\.strength: declare it with .*hyperparameter"):
        schema_module.field_schema(Plain, dataclasses.fields(Plain)[-1])

    @dataclasses.dataclass
    class Odd(TrainingHyperparameters):
        table: dict = hyperparameter({}, "A mapping the schema cannot type.")

    with pytest.raises(TypeError, match=r"Odd\.table: no schema type"):
        schema_module.field_schema(Odd, dataclasses.fields(Odd)[-1])
    with pytest.raises(TypeError, match="unknown schema keywords"):
        hyperparameter(1, "x", minimun=0)


def test_schema_bounds_reach_config_validation():
    from robustft.config import ConfigError

    with pytest.raises(ConfigError, match=r"methods\.l2sp\.a\.weight_decay: -1 is out of range \(allowed: >= 0\)"):
        validate_config({"methods": {"l2sp": {"a": {"weight_decay": -1}}}})
    with pytest.raises(ConfigError, match=r"training\.checkpoint_every: -1 is out of range"):
        validate_config({"training": {"checkpoint_every": -1}})
    config = validate_config({"training": {"checkpoint_every": 0, "eval_batch_size": 64}})
    assert config["training"]["checkpoint_every"] == 0  # 0: checkpoints at epoch ends only


# ------------------------------------------------------------------------------------------------------ precedence


def test_the_training_block_beats_the_method_default_weight_decay():
    """A user's training.weight_decay reaches L2-SP, L1-SP and EWC (their dataclasses default it to 0)."""
    for name in ("l2sp", "l1sp", "ewc"):
        method = get_method(name)
        assert resolve_hyperparameters(method, {"weight_decay": 0.1}, {}).weight_decay == 0.1, name
        assert hyperparameter_sources(method, {"weight_decay": 0.1}, {})["weight_decay"] == "training"
        assert resolve_hyperparameters(method, {}, {}).weight_decay == 0.0, name
        assert hyperparameter_sources(method, {}, {})["weight_decay"] == "method default"
        assert resolve_hyperparameters(method, {"weight_decay": 0.1}, {"weight_decay": 0.3}).weight_decay == 0.3
        assert hyperparameter_sources(method, {"weight_decay": 0.1}, {"weight_decay": 0.3})["weight_decay"] == "variant"
    assert resolve_hyperparameters(FullFineTuning, {}, {}).weight_decay == 0.1
    assert hyperparameter_sources(FullFineTuning, {}, {})["weight_decay"] == "shared default"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_precedence_for_every_field_of_every_method(method):
    """variant > training > method default > shared default, field by field (each source gives a distinct value)."""
    cls = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(cls.hyperparameters)}
    defaults = resolve_hyperparameters(cls)
    sources = hyperparameter_sources(cls)
    for name, f in fields.items():
        expected = "shared default" if SHARED.get(name) is f else "method default"
        assert sources[name] == expected, name
        assert getattr(defaults, name) == _default(f), name
    training = {"lr": 0.5, "epochs": 3, "weight_decay": 0.2, "protocol": {"kind": "kshot", "k": 2}}
    overrides = {"lr": 0.25, "augment": "flip"}
    own = [n for n in fields if n not in SHARED]
    if own:  # a method hyperparameter given in the variant
        overrides[own[0]] = getattr(defaults, own[0])
    hp = resolve_hyperparameters(cls, training, overrides)
    sources = hyperparameter_sources(cls, training, overrides)
    assert (hp.lr, sources["lr"]) == (0.25, "variant")
    assert (hp.augment, sources["augment"]) == ("flip", "variant")
    assert (hp.epochs, sources["epochs"]) == (3, "training")
    assert (hp.weight_decay, sources["weight_decay"]) == (0.2, "training")
    assert (hp.protocol, sources["protocol"]) == ({"kind": "kshot", "k": 2}, "training")
    assert (hp.batch_size, sources["batch_size"]) == (512, "shared default")
    assert set(sources) == set(fields) and set(sources.values()) <= set(SOURCES)
    for name in own[:1]:
        assert sources[name] == "variant"
    for name in own[1:]:
        assert sources[name] == "method default"
    for name in _redeclared(cls):
        if name not in training and name not in overrides:
            assert sources[name] == "method default"


def test_resolution_does_not_share_mutable_values_with_the_config():
    training = {"protocol": {"kind": "class_subset", "absent_classes": ["dog"]}}
    hp = resolve_hyperparameters(FullFineTuning, training, {})
    hp.protocol["absent_classes"].append("cat")
    assert training["protocol"]["absent_classes"] == ["dog"]


def test_unknown_keys_still_fail_naming_the_allowed_ones():
    with pytest.raises(ValueError, match=r"training: unknown hyperparameter 'encoder_strength'.*allowed"):
        resolve_hyperparameters(L2SP, {"encoder_strength": 1.0}, {})
    with pytest.raises(ValueError, match=r"methods\.l2sp: unknown hyperparameter 'strenght'"):
        hyperparameter_sources(L2SP, {}, {"strenght": 1.0})


# ------------------------------------------------------------------------- the config keeps what the user wrote


def test_validation_does_not_fill_training_hyperparameter_defaults():
    config = validate_config({"training": {"weight_decay": 0.1}, "methods": {"l2sp": {"default": {}}}})
    assert config["training"] == {"weight_decay": 0.1, "device": "auto"}
    resolved = resolved_variant(config, "l2sp", "default")
    assert resolved == {"training": {"weight_decay": 0.1}, "overrides": {}}
    assert resolve_hyperparameters(L2SP, resolved["training"], resolved["overrides"]).weight_decay == 0.1
    empty = validate_config({"methods": {"l2sp": {"default": {}}}})
    assert empty["training"] == {"device": "auto"}
    resolved = resolved_variant(empty, "l2sp", "default")
    assert resolve_hyperparameters(L2SP, resolved["training"], resolved["overrides"]).weight_decay == 0.0


def test_resolved_variant_places_the_protocol_where_it_was_written():
    from robustft.config import variant_protocol

    base = {"methods": {"full_ft": {"plain": {}, "shot": {"protocol": {"k": 4}}}}}
    config = validate_config(base)
    plain = resolved_variant(config, "full_ft", "plain")
    assert plain == {"training": {}, "overrides": {}} and variant_protocol(plain) == {"kind": "full"}
    assert hyperparameter_sources(FullFineTuning, **plain)["protocol"] == "shared default"
    clip = {"name": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}  # k-shot needs a CLIP backbone
    kshot = validate_config({**base, "protocol": {"kind": "kshot", "k": 16}, "backbone": clip})
    plain = resolved_variant(kshot, "full_ft", "plain")
    assert plain["training"] == {"protocol": {"kind": "kshot", "k": 16}} and "protocol" not in plain["overrides"]
    assert hyperparameter_sources(FullFineTuning, **plain)["protocol"] == "training"
    shot = resolved_variant(kshot, "full_ft", "shot")
    assert shot["overrides"]["protocol"] == {"kind": "kshot", "k": 4} == variant_protocol(shot)
    assert resolve_hyperparameters(FullFineTuning, shot["training"], shot["overrides"]).protocol == {"kind": "kshot",
                                                                                                        "k": 4}
    assert hyperparameter_sources(FullFineTuning, **shot)["protocol"] == "variant"


def _configured_variants():
    files = [REPO / "config.yaml", *sorted((REPO / "config" / "presets").glob("*.yaml"))]
    return [(path, method, variant) for path in files for method, variants in load_yaml_strict(path)["methods"].items()
            for variant in variants]


@pytest.mark.parametrize("path,method,variant", _configured_variants(),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_every_value_written_in_the_demo_and_presets_is_the_value_a_run_gets(path, method, variant):
    raw = load_yaml_strict(path)
    resolved = resolved_variant(validate_config(copy.deepcopy(raw)), method, variant)
    cls = get_method(method)
    hp = dataclasses.asdict(resolve_hyperparameters(cls, resolved["training"], resolved["overrides"]))
    sources = hyperparameter_sources(cls, resolved["training"], resolved["overrides"])
    written_training = {k: v for k, v in (raw.get("training") or {}).items() if k != "device"}
    overrides = raw["methods"][method][variant]
    for key, value in {**written_training, **overrides}.items():
        if key != "protocol":
            assert hp[key] == value, key
            assert sources[key] == ("variant" if key in overrides else "training"), key


def test_snakemake_keeps_the_training_block_as_written(tmp_path):
    """The workflow's parse (validate_config, then snakemake.utils.validate) fills no training default."""
    config = {"training": {"weight_decay": 0.1, "epochs": 1}, "methods": {"l2sp": {"default": {}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "Snakefile").write_text(
        f'include: {str(REPO / "rules" / "common.smk")!r}\n'
        'print("TRAINING " + canonical_json(config["training"]))\n'
        'print("VARIANT " + canonical_json(resolved_variant(config, "l2sp", "default")))\n'
        "rule all:\n    input: []\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", "Snakefile", "--configfile", "config.yaml", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
             if line.startswith(("TRAINING ", "VARIANT "))}
    assert lines["TRAINING"] == {"device": "auto", "epochs": 1, "weight_decay": 0.1}
    assert lines["VARIANT"] == {"training": {"epochs": 1, "weight_decay": 0.1}, "overrides": {}}


# ------------------------------------------------------------------------------------------------------ run.json


def test_run_json_records_where_each_value_came_from(tmp_path):
    import torch

    from robustft.training.context import Split
    from robustft.training.run import RunData, RunSpec, finetune_run
    from tiny_backbone import CLASSES, TinyBackbone, tiny_data

    backbone = TinyBackbone()
    train, val = tiny_data(4, seed=0), tiny_data(2, seed=1)
    g = torch.Generator().manual_seed(1)
    head = {"head.weight": 0.1 * torch.randn(len(CLASSES), 12, generator=g), "head.bias": torch.zeros(len(CLASSES))}
    spec = RunSpec(method="l2sp", seed=0, hparams={"head_strength": 0.5},
                   training={"epochs": 1, "batch_size": 6, "weight_decay": 0.1, "device": "cpu"})
    data = RunData(CLASSES, Split(train.labels, train.pixels), Split(val.labels, val.pixels))
    record = finetune_run(spec, data, backbone=backbone, reference_head=head, run_dir=tmp_path / "run", device="cpu")
    stored = json.loads((tmp_path / "run" / "run.json").read_text())
    assert stored["hyperparameter_sources"] == record["hyperparameter_sources"]
    sources = stored["hyperparameter_sources"]
    assert set(sources) == set(stored["hyperparameters"])
    assert sources["head_strength"] == "variant" and stored["hyperparameters"]["head_strength"] == 0.5
    assert sources["weight_decay"] == "training" and stored["hyperparameters"]["weight_decay"] == 0.1
    assert sources["epochs"] == sources["batch_size"] == "training"
    assert sources["encoder_strength"] == "method default" and stored["hyperparameters"]["encoder_strength"] == 0.1
    assert sources["lr"] == sources["checkpoint_every"] == "shared default"
