"""Typed dataclass configs: build from dicts/YAML, apply dotted overrides, fail with clear errors.

Every config in the project (model, training, MQAR, ...) is a tree of dataclasses. This module is the
one place that turns untyped input (a YAML file, ``--optim.lr 1e-3`` flags) into such a tree, so that
every config gets the same strictness: an unknown key names the nearest valid one, a value of the
wrong type names the field and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is invalid; the message says which and how to fix it."""


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(valid))}"
    return hint


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` (dataclass, Literal, Optional, list, scalar) or raise ConfigError."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def bounded(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose numeric value (or each list item; None is allowed) must lie within bounds;
    :func:`from_dict` checks it, so every numeric key is validated the same way, with the same message."""
    metadata = {"bounds": {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_BOUND_TESTS = {"gt": (float.__gt__, ">"), "ge": (float.__ge__, ">="), "lt": (float.__lt__, "<"),
                "le": (float.__le__, "<=")}


def check_bounds(cls: type, values: dict[str, Any], prefix: str = "") -> None:
    """Raise ConfigError for the first of ``values`` (field name -> value) outside its :func:`bounded` range."""
    for f in dataclasses.fields(cls):
        bounds = f.metadata.get("bounds")
        value = values.get(f.name)
        if not bounds or value is None or isinstance(value, str):
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            for kind, limit in bounds.items():
                test, sign = _BOUND_TESTS[kind]
                if not test(float(item), float(limit)):
                    where = f"{prefix}.{f.name}" if prefix else f.name
                    rule = " and ".join(f"{_BOUND_TESTS[k][1]} {v}" for k, v in bounds.items())
                    raise ConfigError(f"{where} must be {rule}, got {value}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys and bad types raise ConfigError. A class with a
    ``resolve_config_class(data, prefix) -> (subclass, data)`` classmethod picks the subclass the data describes
    (ModelConfig: the one of ``arch``), so a section's fields can depend on a tag inside it."""
    if resolve := getattr(cls, "resolve_config_class", None):
        cls, data = resolve(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}': {_suggest(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], where)
    check_bounds(cls, kwargs, prefix)  # before __post_init__'s cross-field checks rely on them
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass tree (YAML/JSON serialisable)."""
    return dataclasses.asdict(obj)


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in ``a``, value in ``b``) for every leaf where two nested config dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append((f"{prefix}{k}", a.get(k), b.get(k)))
    return out


def parse_scalar(text: str) -> Any:
    """Parse a CLI override value with YAML rules (``1e-3`` -> float, ``true`` -> bool, ``[1,2]`` -> list)."""
    value = yaml.safe_load(text)
    # YAML 1.1 reads "1e-3" as a string; users mean a number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``{"optim.lr": 1e-3}``) in a nested dict; returns a new dict."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node[leaf] = value
    return out


def parse_override_args(args: list[str]) -> dict[str, Any]:
    """Turn ``["--optim.lr", "1e-3", "--model.n_layer=4"]`` into ``{"optim.lr": 0.001, "model.n_layer": 4}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '--{key}' has no value: write --{key} VALUE")
            raw = args[i + 1]
            i += 2
        out[key] = parse_scalar(raw)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (check the path; presets live in configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e.__class__.__name__}): fix the syntax") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config sections")
    return data
