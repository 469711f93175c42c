"""Config machinery: typed, frozen dataclasses from YAML plus dotted command-line overrides.

    cfg = load(RMConfig, "configs/rm_tiny.yaml", ["optim.learning_rate=1e-4", "steps=50"])

Every key is checked against the dataclass: an unknown key names the closest valid one, a
wrong type names the expected type, and `__post_init__` checks (via `check`) name the key
with its full dotted path. Config dataclasses live next to the code that reads them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config problem; `key` is the dotted key it is about."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message

    def with_prefix(self, prefix: str) -> "ConfigError":
        if not prefix:
            return self
        full = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(full, self.message.replace(f"'{self.key}'", f"'{full}'", 1))


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raises ConfigError for `key` unless `condition` (call inside `__post_init__`)."""
    if not condition:
        raise ConfigError(key, f"config key '{key}' = {value!r} is not allowed: {allowed}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp, value, key: str):
    """Converts a YAML value to annotation `tp`, or raises ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, key)
            except ConfigError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise ConfigError(key, f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(key, f"config key '{key}' = {value!r} is not allowed: one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"config key '{key}' expects a mapping of {tp.__name__} fields, "
                                   f"got {value!r}")
        return from_dict(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        allowed = [m.value for m in tp]
        if value in allowed:
            return tp(value)
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, f"config key '{key}' = {value!r} is not allowed: one of {allowed}{hint}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"config key '{key}' expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(key, f"config key '{key}' expects {len(args)} items, got {value!r}")
            items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"config key '{key}' expects a mapping, got {value!r}")
        val_tp = args[1] if args else Any
        return {str(k): _convert(val_tp, v, _join(key, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(
        key, f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


# Keys other tools use to run code from a model or dataset repository: refused by name.
CODE_LOADING_KEYS = frozenset({"trust_remote_code", "allow_remote_code", "code_revision",
                               "auto_map", "use_pickle", "allow_pickle"})

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def from_dict(cls, data: Mapping[str, Any], prefix: str = ""):
    """Builds the frozen dataclass `cls` from plain dicts, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"config '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            key = _join(prefix, str(name))
            if str(name) in CODE_LOADING_KEYS:
                raise ConfigError(key, f"config key '{key}' asks to run code shipped with a model "
                                       "or dataset; rlhf_jax never does (models load from "
                                       "safetensors with built-in architectures only): remove it")
            close = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
            if close:
                hint = f"did you mean '{_join(prefix, close[0])}'?"
            else:
                hint = f"valid keys{' under ' + repr(prefix) if prefix else ''}: {', '.join(fields)}"
            raise ConfigError(key, f"unknown config key '{key}'; {hint}")
    kwargs = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(key, f"config key '{key}' is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.with_prefix(prefix) from None


def to_dict(cfg) -> dict:
    """Plain YAML-able dict (enums → values, tuples → lists); inverse of `from_dict`."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_overrides(overrides: Sequence[str]) -> dict:
    """["a.b=1", "c=[1, 2]"] → {"a": {"b": 1}, "c": [1, 2]} (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(item, f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 as a string
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def merge(base: Mapping, update: Mapping) -> dict:
    """Deep merge; values in `update` win. Returns a new dict."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path) -> dict:
    if not os.path.exists(path):
        raise ConfigError("", f"config file {os.fspath(path)!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("", f"config file {os.fspath(path)!r}{where} is not valid YAML: "
                              f"{getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"config file {os.fspath(path)!r} must hold a mapping at the top level")
    return dict(data)


def load(cls, path=None, overrides: Sequence[str] = ()):
    """YAML file (optional) + dotted overrides → a validated `cls`."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, merge(data, parse_overrides(overrides)))


def save_yaml(cfg, path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def field_paths(cls, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        sub = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if sub is not None:
            out += field_paths(sub, _join(prefix, f.name))
        else:
            out.append(_join(prefix, f.name))
    return out
