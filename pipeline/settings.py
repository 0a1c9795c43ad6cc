"""Stage settings declared once: a frozen dataclass per stage whose fields carry their help text, choices
and bounds. The click options of `lds <stage>` (stages/options.py) and the stage's section of
config/schema.yaml (stages/schema.py) are derived from it, so the defaults are spelled in one place."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any

NULL = type(None)


@dataclass(frozen=True)
class Spec:
    """What a setting says beyond its type and default.

    ``option``: the CLI spelling when it is not ``--field-name`` (``--graph`` for ``kind``); ``flag``: a
    boolean's click declaration (``--x/--no-x``); ``cli`` / ``config``: whether it is an `lds` option and a
    key of the stage's config section; ``schema``: JSON-schema keys merged into the derived ones (for
    what a type annotation cannot say: item patterns, a ``oneOf``).
    """

    help: str = ""
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    option: str | None = None
    flag: str | None = None
    cli: bool = True
    config: bool = True
    schema: dict = dataclasses.field(default_factory=dict)


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field with its Spec: ``channels: int = setting(15, minimum=2, help="...")``."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"spec": Spec(**spec)})


@dataclass(frozen=True)
class Entry:
    """One setting of a params class: its field name, resolved type, default and Spec."""

    name: str
    type: Any
    default: Any
    spec: Spec

    @property
    def optional(self) -> bool:
        return NULL in typing.get_args(self.type)

    @property
    def base(self) -> Any:
        """The type without ``None``: ``int | None`` -> ``int``; ``int | str`` stays a union."""
        args = [arg for arg in typing.get_args(self.type) if arg is not NULL]
        if typing.get_origin(self.type) in (typing.Union, types.UnionType):
            return args[0] if len(args) == 1 else self.type
        return self.type


def entries(params_class: type) -> list[Entry]:
    """The settings of a params dataclass, in field order (fields without a Spec are not settings)."""
    hints = typing.get_type_hints(params_class)
    found = []
    for field in dataclasses.fields(params_class):
        spec = field.metadata.get("spec")
        if spec is None:
            continue
        default = field.default if field.default is not MISSING else field.default_factory()
        found.append(Entry(field.name, hints[field.name], default, spec))
    return found


def json_value(value: Any) -> Any:
    """A default as JSON/YAML spells it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def _json_type(python_type: Any) -> dict:
    if python_type is bool:
        return {"type": "boolean"}
    if python_type is int:
        return {"type": "integer"}
    if python_type is float:
        return {"type": "number"}
    if python_type is str:
        return {"type": "string"}
    if typing.get_origin(python_type) is tuple:
        return {"type": "array", "items": _json_type(typing.get_args(python_type)[0]), "minItems": 1}
    raise TypeError(f"no JSON-schema type for {python_type!r}; give Spec.schema")


def schema_property(entry: Entry) -> dict:
    """The JSON schema of one setting as a config key."""
    spec = entry.spec
    if spec.choices:
        prop: dict = {"enum": list(spec.choices) + ([None] if entry.optional else [])}
    elif "oneOf" in spec.schema or "type" in spec.schema:
        prop = {}
    else:
        prop = _json_type(entry.base)
        if entry.optional or (prop["type"] == "array" and entry.default == ()):
            prop["type"] = [prop["type"], "null"]
    bounds = {"minimum": spec.minimum, "maximum": spec.maximum, "exclusiveMinimum": spec.exclusive_minimum,
              "exclusiveMaximum": spec.exclusive_maximum}
    prop |= {key: value for key, value in bounds.items() if value is not None}
    prop |= spec.schema
    default = json_value(entry.default)
    prop["default"] = None if default == [] else default  # an empty list is spelled null: "all"
    if spec.help:
        prop["description"] = spec.help
    return prop


def schema_properties(params_class: type) -> dict[str, dict]:
    """The config keys of a params class, as JSON-schema properties (settings with ``config=False`` left out)."""
    return {entry.name: schema_property(entry) for entry in entries(params_class) if entry.spec.config}
