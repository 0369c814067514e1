"""Typed options: a dataclass field's annotation is its type, its metadata the values it allows.

``option(default, choices=..., ge=..., gt=..., le=..., lt=...)`` declares a field with allowed values or a range;
``coerce(value, hint, where)`` turns a value (a string from ``--set``, or a YAML-parsed scalar/list) into the
annotated type, and ``check_allowed`` checks it against the metadata. Both raise ``ConfigError`` naming ``where``
(e.g. ``method.options.lora_rank`` or ``train.lr``), the value and what is allowed. The run config
(``samadapt.config.run_config``) coerces its own sections with the same ``coerce``.

Annotations understood: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None`` and other unions (the
first alternative that takes the value), ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``; anything else (``Any``)
passes unchanged.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError


def option(default: Any, *, choices: tuple | None = None, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with ``default`` (a list default is copied per instance) and its allowed values: one of
    ``choices``, and/or the bounds ``ge`` (>=), ``gt`` (>), ``le`` (<=), ``lt`` (<). None is always allowed for an
    optional (``X | None``) field."""
    allowed = {k: v for k, v in dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=allowed)
    return dataclasses.field(default=default, metadata=allowed)


def parse(value: Any) -> Any:
    """A string read as a YAML scalar or list ("3" -> 3, "0.5" -> 0.5, "true" -> True, "[1, 2]" -> [1, 2],
    "null" -> None); anything else, and a string that is not valid YAML, unchanged."""
    if not isinstance(value, str) or not value.strip():
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like, for error messages ("an integer", "a list", "true/false" ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values"
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint`` (strings parsed as YAML first); ConfigError naming ``where`` if it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    loaded = parse(value)
    if origin in (Union, types.UnionType):
        if loaded is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        exact = [a for a in alternatives if _is_instance(loaded, a)]  # those that take the value unconverted first
        for alternative in exact + [a for a in alternatives if a not in exact]:
            try:
                return coerce(value, alternative, where)
            except ConfigError:
                continue
    elif origin is Literal:
        for candidate in (loaded, value):  # "on" stays "on" for Literal["on", "off"] (YAML 1.1 reads True)
            if candidate in args:
                return candidate
    elif origin in (list, tuple):
        if isinstance(loaded, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                hints = args if len(args) == len(loaded) else None
            else:
                hints = (args[0] if args else Any,) * len(loaded)
            if hints is not None:
                return origin(coerce(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(loaded, hints)))
    elif hint is bool:
        if isinstance(loaded, bool):
            return loaded
    elif hint in (int, float):
        number = _number(loaded)
        if number is not None and (hint is float or float(number).is_integer()):
            return hint(number)
    elif hint is str:
        if isinstance(loaded, str):
            return loaded
        if isinstance(value, str) or isinstance(loaded, (bool, int, float)):
            return str(value)  # "1.50", "on", 2024: the text as written
    else:
        return loaded
    raise ConfigError(f"{where}: expected {describe(hint)}, got {value!r}")


def _is_instance(loaded: Any, hint: Any) -> bool:
    """Whether ``loaded`` already is of the plain class of ``hint`` (``list`` for ``list[int]``; bool is no int)."""
    cls = typing.get_origin(hint) or hint
    if not isinstance(cls, type) or (isinstance(loaded, bool) and cls is not bool):
        return False
    return isinstance(loaded, cls)


def _number(loaded: Any) -> float | int | None:
    """An int or float from a parsed value (YAML 1.1 reads 3e-3, without a dot, as a string); None if not one."""
    if isinstance(loaded, str):
        try:
            return float(loaded)
        except ValueError:
            return None
    if isinstance(loaded, (int, float)) and not isinstance(loaded, bool):
        return loaded
    return None


def check_allowed(value: Any, allowed: typing.Mapping[str, Any], where: str) -> None:
    """Raise ConfigError if ``value`` (not None) is outside the ``choices`` / bounds in ``allowed``."""
    if value is None or not allowed:
        return
    if "choices" in allowed and value not in allowed["choices"]:
        raise ConfigError(f"{where}={value!r} is not allowed: expected one of "
                          f"{', '.join(repr(c) for c in allowed['choices'])}")
    bounds = {"ge": (lambda a, b: a >= b, ">="), "gt": (lambda a, b: a > b, ">"),
              "le": (lambda a, b: a <= b, "<="), "lt": (lambda a, b: a < b, "<")}
    failed = [key for key, (ok, _) in bounds.items() if key in allowed and not ok(value, allowed[key])]
    if failed:
        expected = " and ".join(f"{bounds[k][1]} {allowed[k]}" for k in bounds if k in allowed)
        raise ConfigError(f"{where}={value!r} is out of range: expected {expected}")


def typed_fields(cls: type, values: typing.Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` (field name -> value) coerced to the annotations of dataclass ``cls`` and checked against each
    field's metadata; errors name ``prefix`` + the field. Unknown names: ConfigError listing the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        out[name] = coerce(value, hints[name], prefix + name)
        check_allowed(out[name], fields[name].metadata, prefix + name)
    return out
