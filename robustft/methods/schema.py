"""The config schema's hyperparameter entries, generated from the method dataclasses so that the two cannot drift.

``python -m robustft.methods.schema --write-schema`` rewrites two blocks of ``config/schema.yaml``, each between a
``# >>> generated`` and a ``# <<<`` comment: ``properties.training`` (the fields of
:class:`~robustft.methods.base.TrainingHyperparameters` with the shared defaults, and the non-hyperparameter
settings of :data:`robustft.config.TRAINING_SETTINGS`) and ``$defs.method_hyperparameters`` (per method, the fields
its dataclass adds or re-declares with its paper's default). ``--check`` exits with status 1 when the file is stale.
The rest of the schema is written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from robustft.config import SCHEMA_PATH, TRAINING_SETTINGS
from robustft.io.atomic import write_text_atomic
from robustft.methods import METHODS
from robustft.methods.base import TrainingHyperparameters

COMMAND = "python -m robustft.methods.schema --write-schema"
BEGIN = f"# >>> generated from robustft/methods/ by `{COMMAND}`: edit the dataclasses"
END = "# <<< end of the generated block"
#: dataclass fields that are not keys of the ``training:`` block
NOT_IN_TRAINING = {"protocol": "the config's top-level protocol block"}
PRECEDENCE = (
    "A hyperparameter's value is the first given of: the variant's override (methods.<method>.<variant>), the "
    "training block, the method's paper default ($defs.method_hyperparameters), the shared default (the training "
    "block's default in this schema)."
)
TRAINING_DESCRIPTION = (
    "Shared trainer settings of every method variant. " + PRECEDENCE + " These defaults are not filled into the "
    "config (the method dataclasses own them); each run's run.json records where each value came from "
    "(hyperparameter_sources)."
)
METHODS_DESCRIPTION = (
    "Each method's own hyperparameters, and the shared ones whose default it changes to its paper's value (a "
    "variant may also override any training key and the protocol). " + PRECEDENCE
)
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _json_type(hint: Any, where: str) -> dict[str, Any]:
    """JSON-schema ``type`` (and ``items``) of a field annotation: bool/int/float/str, list[...], X | None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"{where}: only 'X | None' unions map to the schema, got {hint}")
        entry = _json_type(inner[0], where)
        return {**entry, "type": [entry["type"], "null"]}
    if typing.get_origin(hint) is list and len(args) == 1:
        return {"type": "array", "items": _json_type(args[0], where)}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    raise TypeError(f"{where}: no schema type for the annotation {hint}")


def field_schema(cls: type, f: dataclasses.Field) -> dict[str, Any]:
    """The schema entry of one hyperparameter field (declared with :func:`robustft.methods.base.hyperparameter`)."""
    where = f"{cls.__name__}.{f.name}"
    if "description" not in f.metadata:
        raise ValueError(f"{where}: declare it with robustft.methods.base.hyperparameter(default, description, ...)")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    entry = _json_type(typing.get_type_hints(cls)[f.name], where)
    return {**entry, **f.metadata["schema"], "default": default, "description": f.metadata["description"]}


def training_properties() -> dict[str, dict]:
    """``properties.training.properties``: the shared hyperparameters, then the other training settings."""
    cls = TrainingHyperparameters
    fields = [f for f in dataclasses.fields(cls) if f.name not in NOT_IN_TRAINING]
    clashes = sorted({f.name for f in fields} & set(TRAINING_SETTINGS))
    if clashes:
        raise ValueError(f"robustft.config.TRAINING_SETTINGS: {clashes} are hyperparameters of {cls.__name__}")
    return {**{f.name: field_schema(cls, f) for f in fields}, **TRAINING_SETTINGS}


def method_hyperparameters() -> dict[str, dict]:
    """``$defs.method_hyperparameters``: per method, the fields its dataclass adds or re-declares."""
    shared = {f.name: f for f in dataclasses.fields(TrainingHyperparameters)}
    return {
        name: {
            f.name: field_schema(method.hyperparameters, f)
            for f in dataclasses.fields(method.hyperparameters)
            if shared.get(f.name) is not f
        }
        for name, method in METHODS.items()
    }


def training_schema() -> dict[str, Any]:
    """The schema's ``properties.training``."""
    return {"type": "object", "additionalProperties": False, "default": {}, "description": TRAINING_DESCRIPTION,
            "properties": training_properties()}


def methods_schema() -> dict[str, Any]:
    """The schema's ``$defs.method_hyperparameters``."""
    return {"description": METHODS_DESCRIPTION, **method_hyperparameters()}


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6, allow_unicode=True).strip()


def _folded(text: str, indent: str) -> list[str]:
    return [f"{indent}description: >-"] + textwrap.wrap(text, 116 - len(indent), initial_indent=indent + "  ",
                                                         subsequent_indent=indent + "  ")


def training_block() -> str:
    schema = training_schema()
    lines = ["  training:", "    type: object", "    additionalProperties: false", "    default: {}"]
    lines += _folded(schema["description"], "    ") + ["    properties:"]
    lines += [f"      {name}: {_flow(entry)}" for name, entry in schema["properties"].items()]
    return "\n".join(lines)


def methods_block() -> str:
    schema = methods_schema()
    lines = ["  method_hyperparameters:", *_folded(schema.pop("description"), "    ")]
    for method, fields in schema.items():
        lines.append(f"    {method}:" + ("" if fields else " {}"))
        lines += [f"      {name}: {_flow(entry)}" for name, entry in fields.items()]
    return "\n".join(lines)


def _splice(text: str, block: str, key: str, parent: str) -> str:
    """Replace the generated block that holds ``key`` (at indentation 2, under ``parent``) with ``block``."""
    begin, end = f"  {BEGIN}\n", f"  {END}\n"
    start = text.find(begin + f"  {key}:")
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError(f"{SCHEMA_PATH.name}: no generated block for {parent}.{key}; put it between the lines "
                         f"{begin.strip()!r} and {end.strip()!r}")
    return text[: start + len(begin)] + block + "\n" + text[stop:]


def render(text: str) -> str:
    """``text`` (the schema) with its two generated blocks rewritten from the dataclasses."""
    text = _splice(text, training_block(), "training", "properties")
    text = _splice(text, methods_block(), "method_hyperparameters", "$defs")
    loaded = yaml.safe_load(text)
    if loaded["properties"]["training"] != training_schema() or (
        loaded["$defs"]["method_hyperparameters"] != methods_schema()
    ):
        raise AssertionError("the generated schema blocks do not read back as the dataclasses state them")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write-schema", action="store_true", help=f"rewrite the generated blocks of {SCHEMA_PATH}")
    action.add_argument("--check", action="store_true", help="exit 1 if the schema differs from the dataclasses")
    parser.add_argument("--schema", type=Path, default=SCHEMA_PATH, help="the schema file (default: %(default)s)")
    args = parser.parse_args(argv)
    current = args.schema.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{args.schema}: stale hyperparameter blocks; run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        write_text_atomic(args.schema, wanted)
        print(f"{args.schema}: hyperparameter blocks rewritten")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
