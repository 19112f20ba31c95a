"""Strict conversion between plain dicts (YAML/JSON) and frozen dataclasses.

Every file a user writes (run configs, ArchSpec JSON) enters the program through :func:`from_dict`,
so that a typo never becomes a silently ignored key and a wrong type never reaches a job:

* unknown keys are errors that name the key, the closest valid key and the full list;
* values are checked against the field's type hint (``int``, ``float``, ``bool``, ``str``, ``Path``,
  ``Literal[...]``, ``Optional[...]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses);
* range checks live in each dataclass's ``__post_init__`` and raise ``ValueError``; they are re-raised
  here as :class:`ConfigError` with the dotted path of the offending section.

The module is deliberately dependency-free (no pydantic): ``model/`` and ``jobs/`` both use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

__all__ = ["ConfigError", "from_dict", "to_dict", "closest", "parse_override", "apply_override"]

T = TypeVar("T")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config or spec value is invalid; the message names the key, what was expected and a fix."""


def closest(name: str, choices: Sequence[str]) -> str | None:
    """Return the valid name closest to ``name`` (for "did you mean" hints), or None."""
    hits = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return hits[0] if hits else None


def _where(path: str) -> str:
    return path or "<top level>"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of str to {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__} section)"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type hint ``tp`` and return it converted (e.g. str -> Path)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path=path)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = closest(str(value), [str(a) for a in allowed])
            extra = f". Did you mean {hint!r}?" if hint else ""
            raise ConfigError(f"{_where(path)}: got {value!r}, expected {_type_name(tp)}{extra}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{_where(path)}: got {value!r}, expected {_type_name(tp)}")
    if origin is tuple:
        (item_tp, *rest) = typing.get_args(tp)
        if rest and rest != [Ellipsis]:
            raise TypeError(f"only tuple[X, ...] fields are supported, not {tp}")
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{_where(path)}: got {value!r}, expected {_type_name(tp)}")
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(path)}: got {value!r}, expected {_type_name(tp)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{_where(path)}: key {k!r} must be a string")
            out[k] = _convert(v, val_tp, f"{path}.{k}")
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(path)}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(path)}: got {value!r} ({type(value).__name__}), expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads "1e-4" as a string; in a float field it can only mean the number.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(path)}: got {value!r} ({type(value).__name__}), expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(path)}: got {value!r} ({type(value).__name__}), expected a string")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{_where(path)}: got {value!r}, expected a path string")
        return Path(value)
    if tp is Any:
        return value
    raise TypeError(f"{_where(path)}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: Any, *, path: str = "") -> T:
    """Build frozen dataclass ``cls`` from a plain mapping, strictly.

    Args:
        cls: a dataclass type whose fields all have defaults (missing keys take them).
        data: mapping parsed from YAML/JSON; ``None`` means "all defaults".
        path: dotted location of ``data`` in the enclosing document, used in error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: unknown key (with the closest valid key), wrong type, or a value that fails
            ``cls.__post_init__`` validation.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(path)}: got {data!r}, expected a mapping of {cls.__name__} keys")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            hint = closest(str(key), list(fields))
            did = f" Did you mean {hint!r}?" if hint else ""
            raise ConfigError(
                f"{sub}: unknown key in {cls.__name__} ({_where(path)}).{did} Valid keys: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(value, hints[key], sub)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{_where(path)}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`from_dict`: plain dicts/lists/scalars, Paths as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"section.key=value"`` into (["section", "key"], parsed value).

    The value is parsed as a YAML scalar/flow value, so ``1e-4``, ``true``, ``null``, ``[1, 2]`` and
    ``{a: 1}`` mean what they mean in the config file.

    Raises:
        ConfigError: no ``=``, or an empty key.
    """
    import yaml  # local: keeps this module importable without PyYAML for pure-spec users

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}; expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({exc.problem})") from exc
    return parts, value


def apply_override(raw: dict[str, Any], cls: type, text: str) -> None:
    """Apply one ``section.key=value`` override to the raw (pre-validation) dict ``raw`` of ``cls``.

    Keys are checked against the dataclass tree as the path is walked, so a typo in the override is
    reported with a "did you mean" hint even where the YAML file never mentioned that section.

    Raises:
        ConfigError: unknown key along the path, or a path that descends into a non-section value.
    """
    parts, value = parse_override(text)
    node: dict[str, Any] = raw
    tp: Any = cls
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp) if f.init]
            if part not in names:
                hint = closest(part, names)
                did = f" Did you mean {'.'.join(parts[:depth] + [hint])!r}?" if hint else ""
                raise ConfigError(f"override {text!r}: unknown key {here!r}.{did} Valid keys: {', '.join(names)}")
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:depth])!r} is a value, not a section")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {here!r} is {child!r} in the file, not a section")
            node[part] = child
            node = child
