"""Type checks of instantiated config dataclasses against their annotations.

Hydra instantiates plain YAML into dataclasses without checking types, so ``optimizer.lr=abc``
would only fail deep inside training; this walk reports it first, by dotted path.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any

from anneal.errors import ConfigError

_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def check_types(obj: Any, path: str = "") -> None:
    """Raise ConfigError at the first field whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        _check(getattr(obj, f.name), hints[f.name], f"{path}.{f.name}" if path else f.name)


def _check(value: Any, hint: Any, path: str) -> None:
    if not _fits(value, hint, path):
        raise ConfigError(f"{path} ({value!r}) must be {_describe(hint)}")


def _fits(value: Any, hint: Any, path: str) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args
        return any(_fits(value, arg, path) for arg in args if arg is not type(None))
    if origin is list:
        if not isinstance(value, list):
            return False
        for i, item in enumerate(value):
            _check(item, args[0], f"{path}[{i}]")
        return True
    if origin is dict:  # a mapping of names (dataset.extra_valid_data_path): keys, then each value by name
        if not isinstance(value, dict):
            return False
        for key, item in value.items():
            _check(key, args[0], f"{path} key {key!r}")
            _check(item, args[1], f"{path}.{key}")
        return True
    if is_dataclass(hint):
        if not isinstance(value, hint):
            return False
        check_types(value, path)
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    if is_dataclass(hint):
        return f"a {hint.__name__} mapping"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    """What a list's items must be: ``str | float`` -> "strings or numbers"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_plural(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(parts) + (" or nulls" if type(None) in typing.get_args(hint) else "")
    if hint is bool:
        return "true or false values"
    if typing.get_origin(hint) is list:
        return f"lists of {_plural(typing.get_args(hint)[0])}"
    return _describe(hint).removeprefix("a ").removeprefix("an ") + "s"
