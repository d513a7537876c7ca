"""Config validation with one-line errors, and the run table the workflow expands (cheap: no torch import)."""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"
#: The keys of the ``training:`` block that are not hyperparameters, with their schema entries: they get their default
#: filled in and are no part of a variant's settings. The block's other entries are generated from the method
#: dataclasses (``python -m robustft.methods.schema --write-schema``), and their defaults are not filled in.
TRAINING_SETTINGS: dict[str, dict] = {
    "device": {"type": "string", "enum": ["auto", "cpu", "cuda"], "default": "auto",
               "description": "Where compute jobs run (auto = cuda when available); not a hyperparameter."},
}
DEFAULT_PROTOCOL = {"kind": "full"}


class ConfigError(ValueError):
    """The configuration is invalid; the message is one line naming the key and what is allowed."""


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_yaml_strict(path: str | Path) -> Any:
    """Load YAML refusing duplicate keys; the error names the file."""
    try:
        with open(path) as handle:
            return yaml.load(handle, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@functools.lru_cache(maxsize=4)
def _load_schema_cached(path: str) -> str:
    with open(path) as handle:
        return json.dumps(yaml.safe_load(handle))


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    """The JSON schema of the config (a fresh copy each call)."""
    return json.loads(_load_schema_cached(str(path)))


def _key_path(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<config>"


def _subschema(schema: dict, path: Iterable[Any]) -> dict:
    def resolve(node: dict) -> dict:  # local references only ("#/properties/dataset")
        while isinstance(node, dict) and str(node.get("$ref", "")).startswith("#/"):
            target = schema
            for part in node["$ref"][2:].split("/"):
                target = target[part]
            node = target
        return node

    node = schema
    for part in path:
        if isinstance(part, int):
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        else:
            node = node.get("additionalProperties", {}) if isinstance(node.get("additionalProperties"), dict) else {}
        node = resolve(node)
    return node


def _format_error(error: jsonschema.ValidationError, schema: dict) -> str:
    """Turn a jsonschema error into one line: the key, what is wrong, what is allowed."""
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(_subschema(schema, error.absolute_path).get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        key = extra[0] if extra else "?"
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        prefix = f"{where}." if error.absolute_path else ""
        return f"{prefix}{key}: unknown key{hint} (allowed: {', '.join(allowed)})"
    if error.validator == "propertyNames":
        sub = error.schema.get("propertyNames", {})
        bad = error.instance if not isinstance(error.instance, dict) else None
        names = sub.get("enum")
        if names is not None:
            keys = [k for k in (error.instance or {}) if k not in names] if isinstance(error.instance, dict) else [bad]
            key = keys[0] if keys else "?"
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{where}.{key}: unknown name{hint} (allowed: {', '.join(names)})"
        return f"{where}: invalid name ({error.message})"
    if error.validator == "enum":
        close = difflib.get_close_matches(str(error.instance), [str(v) for v in error.validator_value], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        allowed = ", ".join(str(v) for v in error.validator_value)
        return f"{where}: {error.instance!r} is not allowed{hint} (allowed: {allowed})"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{where}: {error.instance!r} has the wrong type (expected {expected})"
    if error.validator in {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
        bounds = _subschema(schema, error.absolute_path)
        parts = []
        for name, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
            if name in bounds:
                parts.append(f"{sign} {bounds[name]}")
        return f"{where}: {error.instance!r} is out of range (allowed: {' and '.join(parts)})"
    if error.validator == "uniqueItems":
        return f"{where}: values must be unique, got {error.instance!r}"
    if error.validator in {"minItems", "minProperties"}:
        return f"{where}: must not be empty"
    return f"{where}: {error.message.splitlines()[0]}"


def _fill_defaults(instance: Any, schema: dict, path: tuple[str, ...] = ()) -> None:
    """Insert the schema's defaults for missing keys, recursively, except the hyperparameters of ``training:``.

    Those defaults belong to the method dataclasses (a method may have its own), and what the user wrote there must
    stay apart from them: :func:`robustft.methods.base.resolve_hyperparameters` applies them.
    """
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if path == ("training",) and key not in TRAINING_SETTINGS:
            continue
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub, (*path, key))


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` against the schema and the cross-key rules; return a copy with defaults filled in.

    Raises :class:`ConfigError` with one line naming the first offending key and the allowed values.
    """
    schema = schema or load_schema()
    config = copy.deepcopy(config or {})
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(list(e.absolute_path)), str(list(e.absolute_path))))
    if errors:
        raise ConfigError(_format_error(errors[0], schema))
    given = set(config)
    _fill_defaults(config, schema)
    _normalise_matrix(config, given, schema)
    _check_cross_keys(config, schema)
    return config


def _check_overrides(key: str, method: str, overrides: dict, schema: dict) -> None:
    """Check a variant's overrides: training keys, protocol, and the method's own hyperparameters (schema $defs)."""
    props = schema["properties"]
    training = {k: v for k, v in props["training"]["properties"].items() if k not in TRAINING_SETTINGS}
    wrapped = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **training,
            **schema["$defs"]["method_hyperparameters"][method],
            "protocol": {k: v for k, v in props["protocol"].items() if k != "default"},
        },
    }
    instance = overrides
    validator = jsonschema.Draft202012Validator(wrapped)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(list(e.absolute_path)), str(list(e.absolute_path))))
    if errors:
        raise ConfigError(f"{key}.{_format_error(errors[0], wrapped)}")


def _check_cross_keys(config: dict, schema: dict) -> None:
    for where, dataset in _dataset_blocks(config):
        if dataset["id_domain"] in dataset["ood_domains"]:
            raise ConfigError(
                f"{where}.ood_domains: {dataset['id_domain']!r} is the ID domain ({where}.id_domain) and cannot also "
                f"be OOD"
            )
        split = dataset["split"]
        if split["val_fraction"] + split["test_fraction"] >= 1:
            raise ConfigError(
                f"{where}.split: val_fraction + test_fraction is {split['val_fraction'] + split['test_fraction']:g} "
                f"(allowed: < 1, the rest is the training split)"
            )
    for method, variants in config["methods"].items():
        for variant, overrides in variants.items():
            key = f"methods.{method}.{variant}"
            _check_overrides(key, method, overrides, schema)
            protocol = {**config["protocol"], **overrides.get("protocol", {})}
            if protocol.get("kind") == "class_subset" and not protocol.get("absent_classes"):
                raise ConfigError(f"{key}.protocol.absent_classes: class_subset needs at least one absent class")
    study_table(config)  # every (dataset, backbone, method, variant) combination the studies ask for is possible


def _protocol(protocol: dict) -> dict:
    """The keys of a protocol its kind uses (so that an unused ``k`` changes nothing)."""
    relevant = {"full": (), "kshot": ("k",), "class_subset": ("absent_classes",)}[protocol["kind"]]
    return {"kind": protocol["kind"], **{k: protocol[k] for k in relevant}}


def resolved_variant(config: dict, method: str, variant: str) -> dict:
    """What one variant's runs depend on, as the config states it: no default is filled in here.

    ``training``: the ``training:`` block's hyperparameters, and the top-level ``protocol`` where it is not the default
    full protocol; ``overrides``: the variant's own keys, its ``protocol`` (if any) merged over the top-level one.
    :func:`robustft.methods.base.resolve_hyperparameters` adds the defaults: variant > training > method default >
    shared default. :func:`variant_protocol` gives the protocol the runs use.
    """
    overrides = copy.deepcopy(config["methods"][method][variant])
    top = _protocol({**DEFAULT_PROTOCOL, **config.get("protocol", {})})
    training = {k: copy.deepcopy(v) for k, v in config.get("training", {}).items() if k not in TRAINING_SETTINGS}
    if "protocol" in overrides:
        overrides["protocol"] = _protocol({**DEFAULT_PROTOCOL, **config.get("protocol", {}), **overrides["protocol"]})
    if top != DEFAULT_PROTOCOL:
        training["protocol"] = top
    return {"training": training, "overrides": overrides}


def variant_protocol(resolved: dict) -> dict:
    """The protocol of a :func:`resolved_variant`: the variant's, else the config's, else the full training split."""
    return copy.deepcopy(resolved["overrides"].get("protocol") or resolved["training"].get("protocol")
                         or DEFAULT_PROTOCOL)


def run_table(config: dict) -> list[dict[str, Any]]:
    """Every (study, method, variant, seed) job the config asks for, in a stable order.

    Each row: ``study`` (its folder, ``<dataset>/<backbone>``), ``dataset`` and ``backbone`` (the path keys),
    ``method``, ``variant``, ``seed``.
    """
    return [
        {"study": study["study"], "dataset": study["dataset"], "backbone": study["backbone"],
         "method": method, "variant": variant, "seed": seed}
        for study in study_table(config)
        for method, variants in study["methods"].items()
        for variant in variants
        for seed in config["seeds"]
    ]


# ---------------------------------------------------------------------------------------------------- the studies
# A study is one (dataset, backbone) pair and the method variants run on it. Its folder, results/<dataset>/<backbone>/,
# is named from what its results depend on (never from a label the user may reuse), so that two configs never
# write into each other's studies: <dataset> = <name>-<id domain>-<hash of root, domains, split, caps>, <backbone> =
# <name>-<model>-<weights>-<size>px. Caches are named the same way at their own level (manifest: root, domains and
# split; pixels: + preprocessing; features: + backbone), so that studies share every cache they can.

#: Checkpoint file suffixes: a backbone reference with one of them (or a path separator) is a file, not a tag.
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _slug(text: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))


def short_hash(value: Any, length: int = 8) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``value``'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def is_file_reference(ref: str) -> bool:
    """Whether ``backbone.pretrained`` / ``backbone.weights`` names a file (an open_clip tag has no suffix or slash)."""
    return "/" in ref or "\\" in ref or Path(ref).suffix in CHECKPOINT_SUFFIXES


def data_key(dataset: dict) -> str:
    """The manifest's folder: the dataset name and a hash of what the manifest depends on.

    The manifest covers the set of domains (not which one is ID), so studies of the same data with different ID
    domains share it, and its pixel and feature caches.
    """
    ident = {"name": dataset["name"], "root": dataset["root"], "domains": manifest_domains(dataset),
             "split": dataset["split"], "on_bad_image": dataset["on_bad_image"]}
    if dataset.get("expected_counts") is not None:  # absent from the hash when unset: existing folders keep their names
        ident["expected_counts"] = dataset["expected_counts"]
    return _slug(f"{dataset['name']}-{short_hash(ident)}")


def manifest_domains(dataset: dict) -> list[str]:
    """The domains a dataset's manifest scans, sorted (the order of ``ood_domains`` does not change the manifest)."""
    return sorted({dataset["id_domain"], *dataset["ood_domains"]})


def dataset_key(dataset: dict) -> str:
    """A study's dataset folder: name, ID domain and a hash of the manifest key and the per-split caps."""
    ident = {"data": data_key(dataset), "max_per_class": dataset["max_per_class"]}
    return _slug(f"{dataset['name']}-{dataset['id_domain']}-{short_hash(ident)}")


def _weights_name(ref: str) -> str:
    return f"{Path(ref).stem}-{short_hash(ref, 6)}" if is_file_reference(ref) else ref


def backbone_key(spec: dict) -> str:
    """A backbone's folder: name, model, weights (tag, or file stem + a hash of its path) and resolution.

    ``templates`` is not part of it: the prompts are a setting of the reference head, not another encoder.
    """
    if spec["name"] == "open_clip":
        model = spec.get("model") or ""
        if spec.get("model_config"):
            model = f"{Path(spec['model_config']).stem}-{short_hash(spec['model_config'], 6)}"
        weights = _weights_name(spec["pretrained"]) if spec.get("pretrained") else "random"
        return _slug(f"open_clip-{model}-{weights}-{spec.get('image_size') or 'native'}px")
    weights = _weights_name(spec["weights"]) if spec.get("weights") else "imagenet"
    return _slug(f"{spec['name']}-{weights}-{spec.get('image_size') or 224}px")


def preprocess_key(spec: dict) -> str:
    """The pixel cache's folder: what the decoded pixels depend on.

    EfficientNet-Lite0: the resolution only (any weights file shares the cache). open_clip: the backbone key, since
    a tag's resampling is only known by importing open_clip, which parsing the workflow never does.
    """
    if spec["name"] == "open_clip":
        return backbone_key(spec)
    return _slug(f"{spec['name']}-{spec.get('image_size') or 224}px")


def pixel_spec(spec: dict) -> dict:
    """The part of a backbone spec the pixel cache depends on (the same for every backbone sharing the cache)."""
    if spec["name"] == "open_clip":
        return {k: v for k, v in spec.items() if k != "templates"}
    return {"name": spec["name"], "image_size": spec.get("image_size") or 224}


def cap_key(cap: int | None) -> str:
    """A per-class cap in a cache file name: ``all`` or ``max<N>``."""
    return "all" if cap is None else f"max{int(cap)}"


def cap_value(key: str) -> int | None:
    """The inverse of :func:`cap_key`."""
    return None if key == "all" else int(key[len("max"):])


def _default_block(schema: dict, name: str) -> dict:
    block: dict = {}
    _fill_defaults(block, schema["properties"][name])
    return block


def _normalise_matrix(config: dict, given: set, schema: dict) -> None:
    """Fill the defaults of each ``datasets`` / ``backbones`` entry; refuse a single block given beside them."""
    for single, several in (("dataset", "datasets"), ("backbone", "backbones")):
        if not config[several]:
            continue
        if single in given and config[single] != _default_block(schema, single):
            raise ConfigError(
                f"{single} and {several}: give one of them ({several} lists several, each with the keys of {single}; "
                f"a --configfile is merged over config.yaml unless --replace-workflow-config is given)"
            )
        for block in config[several].values():
            _fill_defaults(block, schema["properties"][single])


def _dataset_blocks(config: dict) -> list[tuple[str, dict]]:
    """(config key, block) of every dataset."""
    if config["datasets"]:
        return [(f"datasets.{label}", block) for label, block in config["datasets"].items()]
    return [("dataset", config["dataset"])]


def _labelled(config: dict, single: str, several: str) -> tuple[dict[str, dict], dict[str, str]]:
    """label -> block, and label -> the config key it came from."""
    if config[several]:
        blocks = dict(config[several])
        return blocks, {label: f"{several}.{label}" for label in blocks}
    label = str(config[single]["name"])
    return {label: config[single]}, {label: single}


def _as_list(value: str | list) -> list:
    return [value] if isinstance(value, str) else list(value)


def _study_methods(config: dict, where: str, selection: list[str] | None) -> dict[str, list[str]]:
    """method -> variants of one study: every variant, or those ``selection`` names (``method`` or ``method/variant``)."""
    methods = config["methods"]
    if selection is None:
        return {method: list(variants) for method, variants in methods.items()}
    allowed = [*methods, *(f"{m}/{v}" for m, variants in methods.items() for v in variants)]
    chosen: dict[str, list[str]] = {}
    for item in selection:
        method, _, variant = str(item).partition("/")
        if item not in allowed:
            close = difflib.get_close_matches(str(item), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {item!r} is not a method or method/variant of methods{hint} "
                              f"(allowed: {', '.join(allowed)})")
        names = [variant] if variant else list(methods[method])
        chosen.setdefault(method, [])
        chosen[method] += [v for v in names if v not in chosen[method]]
    return {m: [v for v in methods[m] if v in chosen[m]] for m in methods if m in chosen}


def _check_study_methods(config: dict, methods: dict[str, list[str]], backbone: dict, where: str) -> None:
    """Refuse method variants the study's backbone cannot run (FLYP and k-shot need an open_clip backbone)."""
    if backbone["name"] == "open_clip":
        return
    what = f"{where}.name is {backbone['name']!r}"
    hint = "" if where == "backbone" else "; restrict it to open_clip backbones with studies: [...] methods: [...]"
    for method, variants in methods.items():
        for variant in variants:
            key = f"methods.{method}.{variant}"
            if method == "flyp":
                raise ConfigError(f"{key}: flyp needs an open_clip backbone ({what}){hint}")
            if variant_protocol(resolved_variant(config, method, variant))["kind"] == "kshot":
                raise ConfigError(
                    f"{key}: the kshot protocol needs an open_clip backbone ({what}: its reference head is a linear "
                    f"probe fitted on the whole ID training split, so the k-shot run's alpha = 0 point and starting "
                    f"head would have seen every training image){hint}"
                )


def study_table(config: dict) -> list[dict[str, Any]]:
    """Every study of a validated config: one (dataset, backbone) pair with its folders and method variants.

    Without ``studies``, every dataset runs with every backbone and every method variant; each ``studies`` entry
    names datasets and backbones by their labels (the keys of ``datasets`` / ``backbones``; a single ``dataset`` /
    ``backbone`` block is labelled by its ``name``) and optionally the methods (``method`` or ``method/variant``).
    """
    datasets, dataset_where = _labelled(config, "dataset", "datasets")
    backbones, backbone_where = _labelled(config, "backbone", "backbones")
    for blocks, where_of, key_of, what in ((datasets, dataset_where, dataset_key, "data"),
                                            (backbones, backbone_where, backbone_key, "model and weights")):
        seen: dict[str, str] = {}
        for label, block in blocks.items():
            key = key_of(block)
            if key in seen:
                raise ConfigError(f"{where_of[seen[key]]} and {where_of[label]}: the same {what} (folder {key}); "
                                  f"keep one (templates are a setting, not another backbone)")
            seen[key] = label
    if config["studies"]:
        pairs = []
        for i, entry in enumerate(config["studies"]):
            for field, blocks in (("dataset", datasets), ("backbone", backbones)):
                for label in _as_list(entry[field]):
                    if label not in blocks:
                        close = difflib.get_close_matches(str(label), list(blocks), n=1)
                        hint = f"; did you mean {close[0]!r}?" if close else ""
                        raise ConfigError(f"studies.{i}.{field}: unknown label {label!r}{hint} "
                                          f"(allowed: {', '.join(blocks)})")
            pairs += [(d, b, entry.get("methods"), f"studies.{i}.methods")
                      for d in _as_list(entry["dataset"]) for b in _as_list(entry["backbone"])]
    else:
        pairs = [(d, b, None, "") for d in datasets for b in backbones]
    table, seen_pairs = [], {}
    for i, (d, b, selection, where) in enumerate(pairs):
        if (d, b) in seen_pairs:
            raise ConfigError(f"studies: the pair (dataset {d!r}, backbone {b!r}) is listed twice")
        seen_pairs[(d, b)] = i
        methods = _study_methods(config, where, selection)
        if not methods:
            raise ConfigError(f"{where}: must not be empty")
        dataset, backbone = datasets[d], backbones[b]
        _check_study_methods(config, methods, backbone, backbone_where[b])
        dkey, bkey = dataset_key(dataset), backbone_key(backbone)
        table.append({
            "study": f"{dkey}/{bkey}", "dataset": dkey, "backbone": bkey, "data": data_key(dataset),
            "preprocess": preprocess_key(backbone), "dataset_label": d, "backbone_label": b,
            "dataset_spec": dataset, "backbone_spec": backbone,
            "id_domain": dataset["id_domain"], "ood_domains": list(dataset["ood_domains"]), "methods": methods,
        })
    return table


def canonical_json(value: Any) -> str:
    """Stable JSON for params (so Snakemake's params trigger sees only real changes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
