"""The strict loader behind ``rlfleet.launch.config``: YAML, typed fields, overrides.

Generic over frozen dataclasses: a YAML mapping becomes the dataclass whose field it
fills, checked against the field's annotation (``int``, ``float``, ``bool``, ``str``,
``X | None``, ``tuple[T, ...]``, ``Literal[...]`` choices, mappings, nested dataclasses).
A dataclass with a ``type`` field also accepts a bare string (``sampler: uniform``). The
values themselves are judged by each dataclass's ``__post_init__``, where the option is
defined (the buffer's checks for sampler, capacity and limiter). Pure functions;
thread-safe. Split from ``config.py`` so that the config schema reads on its own.

Why not pydantic's ``TypeAdapter`` (it validates stdlib dataclasses and refuses unknown
keys): its errors name the path but neither the YAML line and column nor the nearest
valid key, it has no place for ``sampler: uniform`` or for ``key=value`` overrides that
keep a field's own grammar (``buffer.capacity=10GB`` stays a string), and it would wrap
the options' own ``ValueError`` messages. Getting today's errors back would mean walking
its error list into the messages this module writes directly, so this loader stays.
It sits just past 400 lines: the typing walk, the YAML positions and the override
grammar are one idea, and splitting them would scatter the error wording.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml

__all__ = ["ConfigError", "apply_overrides", "build", "check_choices", "parse_yaml"]


class ConfigError(ValueError):
    """A config file or override that does not parse, has an unknown key, or a bad value."""


# --------------------------------------------------------------------------- typing


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "list"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is dict or origin in (dict, Mapping):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _bad_type(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (lists to tuples...)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _bad_type(path, tp, value)
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # X | None: X's own message (an unknown key, a value out of range)
            try:
                return _coerce(value, options[0], path)
            except ConfigError as e:
                if str(e).startswith(f"{path}: expected "):  # not an X at all: name both choices
                    raise _bad_type(path, tp, value) from None
                raise
        for arg in options:
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise _bad_type(path, tp, value)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(_not_a_choice(path, value, typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and "type" in {f.name for f in dataclasses.fields(tp)}:
            value = {"type": value}
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _bad_type(path, tp, value)
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad_type(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad_type(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad_type(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad_type(path, tp, value)
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad_type(path, tp, value)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}: {value!r}")
        if args:
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return tuple(value)
    if tp is dict or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _bad_type(path, tp, value)
        return dict(value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _bad_type(path, tp, value)
    return value


def _not_a_choice(path: str, value: Any, choices: Sequence[Any]) -> str:
    return f"{path}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"


def check_choices(obj: Any) -> None:
    """Check each ``Literal[...]`` field of the dataclass ``obj`` holds one of its choices.

    For ``__post_init__``: the loader checks them while it reads YAML, this checks a
    config built in Python. Raises ``ConfigError`` naming the field and the choices.
    """
    for name, tp in _hints(type(obj)).items():
        if typing.get_origin(tp) is Literal and getattr(obj, name) not in typing.get_args(tp):
            raise ConfigError(_not_a_choice(name, getattr(obj, name), typing.get_args(tp)))


def _unknown_key(path: str, key: str, valid: Sequence[str]) -> ConfigError:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        nearest = f"{path}.{close[0]}" if path else close[0]
        return ConfigError(f"unknown key {full!r}; did you mean {nearest!r}?")
    where = f"in {path!r}" if path else "at the top level"
    return ConfigError(f"unknown key {full!r}; valid keys {where}: {', '.join(sorted(valid))}")


def build(cls: type, data: Mapping[str, Any], path: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise _unknown_key(path, str(key), names)
        sub = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(value, hints[key], sub)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(_prefixed(path or cls.__name__, str(e))) from None


def _prefixed(path: str, message: str) -> str:
    # Sections from other packages already name their field ("env.num_envs = 0: ...").
    return message if message.startswith(path) else f"{path}: {message}"


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicated keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicated key {key!r} (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse config YAML; errors name the line of the mistake (see ``_yaml_error``)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        raise _yaml_error(e, text, source) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


def _yaml_error(e: yaml.MarkedYAMLError, text: str, source: str) -> ConfigError:
    """A PyYAML error in our words, at the line where the mistake is.

    PyYAML marks where it gave up, which is often the line after the mistake (a key
    missing its ':' is only noticed on the next line); the mark of what it was scanning
    (a key, a quote, a bracket) is the better place then.
    """
    lines = text.splitlines() or [""]
    problem, context = e.problem or "", e.context or ""
    mark = e.problem_mark or e.context_mark
    line, column = (mark.line, mark.column) if mark is not None else (0, 0)
    start = e.context_mark
    if problem == "could not find expected ':'" and start is not None:
        line, column = start.line, start.column
        what = "this line is not 'key: value': the ':' after the key is missing"
    elif context.startswith("while scanning a quoted scalar") and start is not None:
        line, column = start.line, start.column
        what = "this quote is never closed"
    elif context.startswith("while parsing a flow") and start is not None and start.line != line:
        line, column = start.line, start.column
        closer = "]" if "sequence" in context else "}"
        what = f"this {'list' if closer == ']' else 'mapping'} is never closed with '{closer}'"
    elif problem == "mapping values are not allowed here":
        line, column, what = _misplaced_colon(lines, line, column)
    elif problem.startswith("expected <block end>") or problem.startswith("expected <block mapping start>"):
        what = "this line does not line up with the lines above it: check its indentation"
    elif problem.startswith("could not determine a constructor"):
        what = "a YAML tag (!!...) is not allowed in a config: write the plain value"
    elif problem.startswith("found undefined alias"):
        what = f"{problem}: anchors (&name) must come before their aliases (*name)"
    elif "'\\t'" in problem:
        what = "a tab character: indent with spaces"
    else:
        what = problem or context or "invalid YAML"
    shown = lines[line].strip() if 0 <= line < len(lines) else ""
    return ConfigError(f"{source}:{line + 1}:{column + 1}: {what} (the line reads {shown!r})")


def _misplaced_colon(lines: list[str], line: int, column: int) -> tuple[int, int, str]:
    """Where a "mapping values are not allowed here" comes from, and what to say."""
    previous = line - 1
    while previous >= 0 and (not lines[previous].strip() or lines[previous].lstrip().startswith("#")):
        previous -= 1
    here = lines[line] if line < len(lines) else ""
    indent = len(here) - len(here.lstrip())
    if previous >= 0:
        above = lines[previous]
        above_indent = len(above) - len(above.lstrip())
        if ":" not in above and not above.lstrip().startswith("-") and above_indent == indent:
            # "id CartPole-v1" then "num_envs: 4": YAML read both as one key
            return previous, above_indent, "this line is not 'key: value': the ':' after the key is missing"
        if indent > above_indent and ":" in above and not above.rstrip().endswith(":"):
            return line, indent, "this key is indented more than the key above it, which already has a value"
    return line, column, "a ': ' inside a value: put the value in quotes"


# --------------------------------------------------------------------------- overrides


def _admits_str(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)


def _admits_mapping(tp: Any) -> bool:
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return any(a is dict or typing.get_origin(a) in (dict, Mapping) for a in args)


def _parse_override_value(text: str, keep_strings: bool = False) -> Any:
    """A ``key=value`` override's value: a YAML scalar or flow collection.

    ``keep_strings``: the field takes strings (``buffer.capacity: int | str``), so a
    string stays one and the field's own grammar judges it, as it would in a file.
    """
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and not keep_strings:
        # YAML 1.1 reads "3e5" and "1e-3" as strings; a user typing them means numbers.
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if re.fullmatch(r"[+-]?\d+", value.strip()) else number
    return value


def _apply_override(obj: Any, parts: list[str], text: Any, done: str, override: str) -> Any:
    """Return ``obj`` with the leaf at ``parts`` replaced by the value ``text`` gives
    (a ``key=value`` override's text, or a Python value from a mapping of overrides),
    checked and converted."""
    key, rest = parts[0], parts[1:]
    here = f"{done}.{key}" if done else key
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj) if f.init]
        if key not in names:
            raise ConfigError(f"override {override!r}: {_unknown_key(done, key, names)}")
        tp = _hints(type(obj))[key]
        if rest:
            child = getattr(obj, key)
            if child is None and _admits_mapping(tp):
                child = {}  # a free-form mapping not set yet (ray.runtime_env.env_vars.A=1)
            if not (dataclasses.is_dataclass(child) or isinstance(child, dict)):
                raise ConfigError(
                    f"override {override!r}: {here!r} is a {_type_name(tp)}, it has no key {rest[0]!r}"
                )
            new = _apply_override(child, rest, text, here, override)
        else:
            raw = _parse_override_value(text, _admits_str(tp)) if isinstance(text, _Text) else text
            try:
                new = _coerce(raw, tp, here)
            except ConfigError as e:
                raise ConfigError(f"override {override!r}: {e}") from None
        try:
            return dataclasses.replace(obj, **{key: new})
        except ConfigError as e:
            raise ConfigError(f"override {override!r}: {done + '.' if done else ''}{e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"override {override!r}: {_prefixed(done or here, str(e))}") from None
    # A free-form mapping such as env.kwargs: any key, any YAML value.
    new_dict = dict(obj)
    if rest:
        child = new_dict.get(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {here!r} is {child!r}, it has no key {rest[0]!r}")
        new_dict[key] = _apply_override(child, rest, text, here, override)
    else:
        new_dict[key] = _parse_override_value(text) if isinstance(text, _Text) else text
    return new_dict


class _Text(str):
    """The text of a ``key=value`` override, still to be parsed as YAML at its leaf."""


def apply_overrides(config: Any, overrides: Sequence[str] | Mapping[str, Any]) -> Any:
    """Return the dataclass ``config`` with overrides applied, each type-checked.

    Args:
        config: a config dataclass.
        overrides: ``["learner.lr=1e-3", ...]`` strings, whose values are YAML text, or a
            mapping ``{"learner.lr": 1e-3, "policy.hidden": [128, 128]}`` of Python values.

    Raises:
        ConfigError: an override without ``=``, an unknown key (naming the nearest), or a
            value of the wrong type.
    """
    if isinstance(overrides, Mapping):
        items = [(str(k), v, f"{k}={v!r}") for k, v in overrides.items()]
    elif isinstance(overrides, str):
        raise ConfigError(
            f"overrides {overrides!r}: give a list of KEY=VALUE strings or a mapping, not one string"
        )
    else:
        items = []
        for override in overrides:
            key, sep, text = str(override).partition("=")
            if not sep or not key.strip():
                raise ConfigError(
                    f"override {override!r}: expected KEY=VALUE with a dotted key, e.g. learner.lr=0.001"
                )
            items.append((key, _Text(text), override))
    for key, value, shown in items:
        key = key.strip()
        parts = key.split(".")
        if any(not p for p in parts):
            raise ConfigError(f"override {shown!r}: empty part in key {key!r}")
        config = _apply_override(config, parts, value, "", shown)
    return config
