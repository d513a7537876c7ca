"""Config validation with one-line errors, and the run table the workflow expands (cheap: no torch import)."""

from __future__ import annotations

import copy
import difflib
import functools
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
    node = schema
    for part in path:
        if isinstance(part, int):
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        else:
            node = node.get("additionalProperties", {}) if isinstance(node.get("additionalProperties"), dict) else {}
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
    _fill_defaults(config, schema)
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
    dataset = config["dataset"]
    if dataset["id_domain"] in dataset["ood_domains"]:
        raise ConfigError(
            f"dataset.ood_domains: {dataset['id_domain']!r} is the ID domain (dataset.id_domain) and cannot also be OOD"
        )
    split = dataset["split"]
    if split["val_fraction"] + split["test_fraction"] >= 1:
        raise ConfigError(
            f"dataset.split: val_fraction + test_fraction is {split['val_fraction'] + split['test_fraction']:g} "
            f"(allowed: < 1, the rest is the training split)"
        )
    for method, variants in config["methods"].items():
        for variant, overrides in variants.items():
            key = f"methods.{method}.{variant}"
            if method == "flyp" and config["backbone"]["name"] != "open_clip":
                raise ConfigError(f"{key}: flyp needs an open_clip backbone (backbone.name is {config['backbone']['name']!r})")
            _check_overrides(key, method, overrides, schema)
            protocol = {**config["protocol"], **overrides.get("protocol", {})}
            if protocol.get("kind") == "class_subset" and not protocol.get("absent_classes"):
                raise ConfigError(f"{key}.protocol.absent_classes: class_subset needs at least one absent class")


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
    """Every (method, variant, seed) job the config asks for, in a stable order."""
    return [
        {"method": method, "variant": variant, "seed": seed}
        for method, variants in config["methods"].items()
        for variant in variants
        for seed in config["seeds"]
    ]


def canonical_json(value: Any) -> str:
    """Stable JSON for params (so Snakemake's params trigger sees only real changes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
