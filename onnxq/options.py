"""Typed options for methods, data readers and backends.

Each configurable part declares its options as a frozen dataclass; each field carries a default
and a ``help`` text in its metadata. Values arrive from the CLI as strings (``-o key value``) or
from Python as native values; :func:`parse_options` converts and validates both, so a bad option
is a one-line :class:`~onnxq.errors.OptionError` naming the option and what it accepts.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from onnxq.errors import OptionError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors click's naming
    """Declare an option field with a default and a one-line help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def described(text: str, **kwargs: Any) -> Any:
    """A dataclass field with a description (report dataclasses: their JSON Schema carries it)."""
    return dataclasses.field(metadata={"description": text}, **kwargs)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a part that has none."""


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """Description of one option, for ``onnxq methods NAME`` and the docs."""

    name: str
    type: str
    default: Any
    help: str


def describe_options(cls: type) -> list[OptionInfo]:
    """List the options of an options dataclass with their types, defaults and help."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out.append(OptionInfo(f.name, _type_name(hints[f.name]), f.default, f.metadata.get("help", "")))
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return "list of " + _type_name(get_args(tp)[0])
    return getattr(tp, "__name__", str(tp))


def _convert(name: str, tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise OptionError(f"option '{name}' must be one of {', '.join(map(str, choices))}, got {value!r}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(name, a, value)
            except OptionError as exc:
                errors.append(str(exc))
        raise OptionError(errors[0] if errors else f"option '{name}': invalid value {value!r}")
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        return tuple(_convert(name, item, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise OptionError(f"option '{name}' must be true or false, got {value!r}")
    if tp in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            converted = tp(value)
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return converted
        except (TypeError, ValueError):
            raise OptionError(f"option '{name}' must be a{'n integer' if tp is int else ' number'}, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def parse_options(cls: type, values: Mapping[str, Any] | None, owner: str) -> Any:
    """Build an options instance of ``cls`` from ``values`` (strings or native values).

    ``owner`` names the method/reader/backend in error messages. Unknown keys and values of the
    wrong type raise :class:`OptionError`. Option names may use '-' or '_'.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for raw_key, raw_value in values.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            known = ", ".join(fields) or "none"
            # `-o out.onnx`, the habit of other tools: -o is a method option here
            path = "; -o KEY VALUE sets a method option: name the output model with --output" if raw_key.lower().endswith(".onnx") else ""
            raise OptionError(f"{owner} has no option '{raw_key}' (options: {known}){path}")
        kwargs[key] = _convert(raw_key, hints[key], raw_value)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise OptionError(f"{owner}: {exc}") from None
    return instance
