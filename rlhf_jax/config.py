"""Config machinery: typed, frozen dataclasses from YAML plus dotted command-line overrides.

    cfg = load(RMConfig, "configs/rm_tiny.yaml", ["optim.learning_rate=1e-4", "steps=50"])

Every key is checked against the dataclass: an unknown key names the key it most likely means
anywhere in the config (`learning_rate=1e-4` → `optim.learning_rate=1e-4`), a wrong type names
the expected type, and `__post_init__` checks (via `check`) name the key with its full dotted
path. `option_error` answers `--steps 5` on a stage's command line with `steps=5`. Config
dataclasses live next to the code that reads them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from typing import Any, Mapping, Optional, Sequence

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


class UnknownKeyError(ConfigError):
    """A key that is no field of its config; `value` is what it was given."""

    def __init__(self, key: str, value: Any, message: str):
        super().__init__(key, message)
        self.value = value


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
        return _from_dict(tp, value, key)
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


def _from_dict(cls, data: Mapping[str, Any], prefix: str):
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"config '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            key = _join(prefix, str(name))
            raise UnknownKeyError(key, data[name], unknown_key_message(cls, key, data[name],
                                                                    prefix))
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


def from_dict(cls, data: Mapping[str, Any], prefix: str = ""):
    """Builds the frozen dataclass `cls` from plain dicts, checking every key and type.

    An unknown key names the closest key of the whole config, so a key written at the wrong
    level (`learning_rate=1e-4` for `optim.learning_rate=1e-4`) is pointed at its place.
    """
    try:
        return _from_dict(cls, data, prefix)
    except UnknownKeyError as e:
        if prefix or "." not in e.key:
            raise
        # Raised inside a section, which knew only its own keys: suggest among all of them.
        raise UnknownKeyError(e.key, e.value, unknown_key_message(cls, e.key, e.value)) from None


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
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(key.strip(), f"override {item!r}: the value is not valid YAML; "
                                           f"quote it, e.g. {key.strip()}='{raw}'") from None
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
    return [key for key, tp in key_types(cls, prefix).items() if _section(tp) is None]


def key_types(cls, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a config class, sections included, with its annotation."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = _join(prefix, f.name), hints[f.name]
        out[key] = tp
        section = _section(tp)
        if section is not None:
            out.update(key_types(section, key))
    return out


def _section(tp):
    """The config dataclass behind annotation `tp` (also inside Optional), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    return inner[0] if inner else None


# What other RLHF trainers (TRL, Hugging Face's TrainingArguments) call some of our keys, and
# what one stage calls a key another stage names differently (SFT/RM steps, PPO iterations).
SYNONYMS = {
    "lr": ("learning_rate",),
    "output_dir": ("out_dir",),
    "steps": ("iterations",),
    "iterations": ("steps",),
    "max_steps": ("steps", "iterations"),
    "gradient_accumulation_steps": ("grad_accum",),
    "per_device_train_batch_size": ("batch_size",),
    "train_batch_size": ("batch_size",),
    "cliprange": ("clip_eps",),
    "cliprange_value": ("value_clip_eps",),
    "num_ppo_epochs": ("ppo_epochs",),
    "response_length": ("max_new_tokens",),
}


def suggest_key(cls, key: str, prefix: str = "") -> Optional[str]:
    """The key of `cls` (keys start with `prefix`) that the unknown dotted `key` most likely
    means: a key of the same name (or of the name other trainers use) in another section,
    then the closest spelling among its siblings, then the closest spelling anywhere."""
    types_ = key_types(cls, prefix)
    parent, _, name = key.rpartition(".")

    def nearest(paths: list[str]) -> str:  # the one nearest to where the key was written
        return min(paths, key=lambda p: (-_shared_sections(p, parent), p.count("."), p))

    for wanted in (name, *SYNONYMS.get(name, ())):
        same = [p for p in types_ if p.rpartition(".")[2] == wanted and p != key]
        if same:
            return nearest(same)
    siblings = [p.rpartition(".")[2] for p in types_ if p.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return _join(parent, close[0])
    leaves = {p.rpartition(".")[2] for p in types_}
    close = difflib.get_close_matches(name, sorted(leaves), n=1, cutoff=0.8)
    if close:
        return nearest([p for p in types_ if p.rpartition(".")[2] == close[0]])
    return None


def _shared_sections(path: str, parent: str) -> int:
    """How many leading sections the key `path` has in common with the section `parent`."""
    n = 0
    for a, b in zip(path.split(".")[:-1], parent.split(".") if parent else []):
        if a != b:
            break
        n += 1
    return n


def unknown_key_message(cls, key: str, value: Any, prefix: str = "") -> str:
    """One line for an unknown `key` given `value`: the key it most likely means and how to
    write it, or the valid keys at its level."""
    if key.rpartition(".")[2] in CODE_LOADING_KEYS:
        return (f"config key '{key}' asks to run code shipped with a model or dataset; rlhf_jax "
                "never does (models load from safetensors with built-in architectures only): "
                "remove it")
    guess = suggest_key(cls, key, prefix)
    if guess is None:
        parent = key.rpartition(".")[0]
        level = [p.rpartition(".")[2] for p in key_types(cls, prefix)
                 if p.rpartition(".")[0] == parent]
        where = f" under '{parent}'" if parent else ""
        return f"unknown config key '{key}'; valid keys{where}: {', '.join(level)}"
    message = f"unknown config key '{key}'; did you mean '{guess}'?"
    if _section(key_types(cls, prefix)[guess]) is None and not isinstance(value, Mapping):
        message += f" (write it as {_override(guess, value)})"
    return message


def _override(key: str, value: Any) -> str:
    """`key=value` as it is written on the command line."""
    if isinstance(value, (str, float)):
        return f"{key}={value}"
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return f"{key}={text.removesuffix('...').strip()}"


# Options of every stage command besides the config keys (argparse also takes a prefix).
_KNOWN_OPTIONS = ("help", "config")


def option_error(argv: Sequence[str], cls) -> Optional[str]:
    """One line for the first `--option` in a stage's command line other than -h/--help/--config,
    or None. Config keys are given as `key=value`: `--steps 5` is answered with `steps=5`,
    `--learning_rate 1e-4` with the nested `optim.learning_rate=1e-4`."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":  # argparse reads what follows as positional
            return None
        if not arg.startswith("-") or arg == "-" or _FLOAT.fullmatch(arg):
            continue
        name, has_value, value = arg.lstrip("-").partition("=")
        if arg == "-h" or (arg.startswith("--") and name
                           and any(o.startswith(name) for o in _KNOWN_OPTIONS)):
            continue
        if not has_value:
            follows = args[i + 1] if i + 1 < len(args) else None
            value = follows if follows is not None and "=" not in follows and (
                not follows.startswith("-") or _FLOAT.fullmatch(follows)) else None
        return _option_line(cls, name.replace("-", "_"), value)
    return None


def _option_line(cls, name: str, value: Optional[str]) -> str:
    start = "config keys are set as key=value, not as options"
    types_ = key_types(cls)
    key = name if name in types_ else suggest_key(cls, name)
    if key is None:
        top = ", ".join(p for p in types_ if "." not in p)
        return f"{start}: '{name}' is no config key; valid keys: {top}"
    if value is None:
        value = "true" if types_[key] is bool else "VALUE"
    return f"{start}: write {key}={value}"
