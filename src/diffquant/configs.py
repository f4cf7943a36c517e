"""Helpers shared by the typed config dataclasses."""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def reject_unknown_keys(kind: str, data: Mapping[str, Any], cls: type, error: type[Exception]) -> None:
    """Raise `error` naming every key of `data` that is not an init field of dataclass `cls`."""
    known = {f.name for f in fields(cls) if f.init}
    unknown = set(data) - known
    if unknown:
        raise error(f"unknown {kind} keys {sorted(unknown, key=str)}; known: {sorted(known)}")


def check_field_types(kind: str, data: Mapping[str, Any], cls: type, error: type[Exception]) -> None:
    """Raise `error` for the first value of `data` that its field's annotation in dataclass `cls` does not
    admit, e.g. `symmetric: "no"` for a bool (YAML/JSON give strings and numbers, never coerce them).

    bool takes only true/false; int refuses bools; float takes ints; tuple[X, ...] takes a list too
    (what YAML gives); keys that are not fields are left to reject_unknown_keys.
    """
    hints = field_types(cls)
    for name, value in data.items():
        if name in hints and not type_admits(hints[name], value):
            raise error(f"{kind} {name} must be {describe_type(hints[name])}, got {value!r}")


def check_instance_types(obj: Any, kind: str, error: type[Exception]) -> None:
    """check_field_types over the init fields of dataclass instance `obj` (for __post_init__)."""
    check_field_types(kind, {f.name: getattr(obj, f.name) for f in fields(obj) if f.init}, type(obj), error)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of dataclass `cls` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init and f.name in hints}


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def type_admits(hint: Any, value: Any) -> bool:
    """Whether `value` is of type `hint` as a recipe file means it (see check_field_types)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if _is_union(origin):
        return any(type_admits(arg, value) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin is not None:
        return _generic_admits(origin, args, value)
    return _class_admits(hint, value)


def _class_admits(hint: type, value: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # a bool is an int to Python, never to a recipe
        return False
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)


def _generic_admits(origin: type, args: tuple[Any, ...], value: Any) -> bool:
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(type_admits(args[0], v) for v in value)
        return not args or (len(args) == len(value) and all(map(type_admits, args, value)))
    if origin in (dict, Mapping):
        key, item = args or (Any, Any)
        return isinstance(value, Mapping) and all(type_admits(key, k) and type_admits(item, v)
                                                  for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(type_admits(args[0], v) for v in value) if args else True
    return isinstance(value, origin)


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def describe_type(hint: Any) -> str:
    """`hint` in a recipe author's words: "an integer or null", "a list of strings", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(origin):
        return " or ".join(describe_type(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_plural(describe_type(args[0]))}"
    if origin is tuple or origin is list:
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(name: str) -> str:
    words = {"a string": "strings", "an integer": "integers", "a number": "numbers", "true or false": "booleans"}
    return words.get(name, name)


def check_count(name: str, value: int | None, optional: bool = False, minimum: int = 1) -> None:
    """A count the user gave (samples, steps): an integer >= minimum, or None where `optional` (the
    default). 0 is never "the default": silently running the default instead hides the mistake."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}{' or None (the default)' if optional else ''}, got {value!r}")


def positive_or_default(name: str, value: int | None, default: int) -> int:
    """`value`, or `default` when it is None (check_count: 0 and negatives are errors)."""
    check_count(name, value, optional=True)
    return default if value is None else value


def reject_inapplicable(config: Any, names: tuple[str, ...], context: str, error: type[Exception]) -> None:
    """Raise one `error` naming every field of dataclass instance `config` among `names` (fields that
    `context`, e.g. "calibration_selection method 'uniform'", does not read) that is set to anything but
    its default: a setting that would be silently ignored is a mistake to report, not to run."""
    defaults = {f.name: f.default for f in fields(config)}
    ignored = [name for name in names if getattr(config, name) != defaults[name]]
    if ignored:
        settings = ", ".join(f"{name}: {getattr(config, name)!r}" for name in ignored)
        raise error(f"{settings} {'does' if len(ignored) == 1 else 'do'} not apply to {context}: "
                    f"leave {'it' if len(ignored) == 1 else 'them'} out")
