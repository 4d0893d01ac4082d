"""Field values of the config, from what the command line or a JSON file gives to the field's type.

A field is typed ``bool``, ``int``, ``float``, ``str``, ``tuple[T, ...]`` (a comma-separated list),
``dict[str, Any]`` (a JSON object), or one of these ``| None``. Strings are accepted for every
type, as the command line gives them: ``"0,1,2"``, ``"none"``, ``"true"``, ``'{"width": 16}'``.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from auxlab.experiments.errors import ConfigError

__all__ = ["convert", "field_type", "jsonable"]


def convert(name: str, value: Any, annotation: Any, *, default: Callable[[], Any]) -> Any:
    """Convert ``value`` (a Python value, or a string from the command line) to the type ``annotation`` of field ``name``.

    ``default()`` gives the field's default, quoted when ``value`` is None for a field that may not be.

    Raises:
        ConfigError: naming the field and the value received.
    """
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    optional = type(None) in options
    kind = field_type(annotation)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))):
        return None
    if value is None:
        raise ConfigError(f"{name} must not be none; its default is {default()!r}")
    origin = typing.get_origin(kind)
    if origin is tuple:
        item = typing.get_args(kind)[0]
        if isinstance(value, str):
            parts: Sequence[Any] = [p.strip() for p in value.split(",") if p.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts = [value]
        elif isinstance(value, Sequence):
            parts = value
        else:
            raise ConfigError(f"{name} must be a comma-separated list, got {value!r}")
        return tuple(_scalar(name, p, item) for p in parts)
    if origin is dict or kind is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as error:
                raise ConfigError(f"{name} must be a JSON object such as '{{\"width\": 16}}', got {value!r} ({error})") from error
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name} must be a JSON object with string keys, got {value!r}")
        return dict(value)
    return _scalar(name, value, kind)


def field_type(annotation: Any) -> Any:
    """The type of a field without its ``| None``: ``int`` for ``int | None``."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return next(o for o in options if o is not type(None))


def jsonable(value: Any) -> Any:
    """``value`` with its tuples as lists, for JSON."""
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def _scalar(name: str, value: Any, kind: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        elif (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        number: float | None = None
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value.strip()
    raise TypeError(f"config field {name} has an unsupported type {kind!r}")  # a bug in the config's fields, not in the input


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)
