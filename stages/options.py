"""Click options derived from a stage's params dataclass (pipeline/settings.py): the CLI spells each
setting once, with the dataclass's default, choices, bounds and help."""

from __future__ import annotations

import typing
from typing import Any, Callable

import click

from pipeline.settings import Entry, entries


class AutoOrInt(click.ParamType):
    """``auto`` or an integer at least ``minimum`` (``--accumulate``, ``--clusters``)."""

    name = "auto|N"

    def __init__(self, minimum: int = 1):
        self.minimum = minimum

    def convert(self, value, param, ctx) -> int | str:
        if value == "auto" or (isinstance(value, int) and value >= self.minimum):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit() and int(value) >= self.minimum:
            return int(value)
        self.fail(f"expected auto or an integer >= {self.minimum}, got {value!r}", param, ctx)


class CommaList(click.ParamType):
    """Comma-separated values -> a tuple (``--layers 0,-1``), each converted by ``item``."""

    name = "a,b,..."

    def __init__(self, item: type = str):
        self.item = item

    def convert(self, value, param, ctx) -> tuple:
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",") if part.strip()]
        try:
            return tuple(self.item(part) for part in parts)
        except ValueError:
            self.fail(f"expected comma-separated {self.item.__name__} values, got {value!r}", param, ctx)


def click_type(entry: Entry) -> Any:
    """The click type of a setting, from its choices, bounds and type annotation."""
    spec, base = entry.spec, entry.base
    if spec.choices:
        return click.Choice(spec.choices)
    low = spec.minimum if spec.minimum is not None else spec.exclusive_minimum
    high = spec.maximum if spec.maximum is not None else spec.exclusive_maximum
    if base is int:
        return click.IntRange(low, high) if low is not None or high is not None else int
    if base is float:
        if low is None and high is None:
            return float
        return click.FloatRange(low, high, min_open=spec.exclusive_minimum is not None, max_open=spec.exclusive_maximum is not None)
    if typing.get_origin(base) is tuple:
        return CommaList(typing.get_args(base)[0])
    if set(typing.get_args(base)) == {int, str}:
        return AutoOrInt(int(low) if low is not None else 1)
    return str


def click_option(entry: Entry) -> Callable:
    """One `--name` option for a setting; its Python name is the field's name."""
    spec = entry.spec
    declared = spec.option or "--" + entry.name.replace("_", "-")
    common = {"help": spec.help or None}
    if entry.base is bool:
        if spec.flag:
            return click.option(spec.flag, entry.name, default=entry.default, show_default=True, **common)
        return click.option(declared, entry.name, is_flag=True, default=entry.default, **common)
    default = None if entry.default == () else entry.default
    return click.option(declared, entry.name, type=click_type(entry), default=default, show_default=default is not None, **common)


def click_options(params_class: type, exclude: tuple[str, ...] = ()) -> Callable:
    """Decorate a click command with an option per setting of ``params_class`` (in field order)."""
    chosen = [entry for entry in entries(params_class) if entry.spec.cli and entry.name not in exclude]

    def decorate(command: Callable) -> Callable:
        for entry in reversed(chosen):
            command = click_option(entry)(command)
        return command

    return decorate


def params_from(params_class: type, values: dict[str, Any]) -> Any:
    """The params object from a command's keyword arguments (the options click_options added; None for an
    empty list)."""
    chosen = {entry.name: entry for entry in entries(params_class) if entry.spec.cli}
    given = {name: values[name] for name in chosen if name in values}
    return params_class(**{name: (() if value is None and chosen[name].default == () else value) for name, value in given.items()})
