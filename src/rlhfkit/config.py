"""Typed configs: dataclasses loaded from YAML, with ``key=value`` overrides.

Every stage declares one dataclass (e.g. :class:`rlhfkit.sft.SFTConfig`). Each
field carries a docstring right below it. :func:`load_config` reads a YAML file,
applies command-line overrides, and checks every value against the field's
annotation, so an unknown or mistyped key fails early with a message that names
it (and the file it came from).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        choices = ", ".join(repr(a) for a in get_args(tp))
        raise ConfigError(f"{source}: key '{key}': {value!r} is not one of {choices}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):  # `key=a,b,c` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads "1e3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: key '{key}': expected a string, got {value!r}")
    return value


def from_dict(cls: type[C], values: dict[str, Any], *, source: str = "config") -> C:
    """Build dataclass ``cls`` from a mapping, type-checking every value."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' for {cls.__name__} (known keys: {known})")
    kwargs = {k: _coerce(v, hints[k], k, source) for k, v in values.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required key '{missing[0]}' for {cls.__name__}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse ``["lr=1e-4", "model=tiny"]`` into a dict, values read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 leaves "1e-5" a string; a string field gets the text back
            try:  # in load_config (see _override_texts), so `output_dir=1e3` stays "1e3"
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def _override_texts(overrides: list[str]) -> dict[str, str]:
    """The raw text of each ``key=value`` override, for string fields (``name=1_000`` stays "1_000")."""
    return {item.split("=", 1)[0].strip(): item.split("=", 1)[1] for item in overrides if "=" in item}


def nest_dotted(values: dict[str, Any]) -> dict[str, Any]:
    """``{"rl.lr": 1e-5}`` -> ``{"rl": {"lr": 1e-5}}`` (for configs with per-section dicts)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:
            head, rest = key.split(".", 1)
            section = out.setdefault(head, {})
            if not isinstance(section, dict):
                raise ConfigError(f"key '{key}': '{head}' is not a section")
            section.update(nest_dotted({rest: value}))
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def merge_sections(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overlay ``overrides`` on ``base``, merging (not replacing) dict-valued sections."""
    merged = dict(base)
    for key, value in nest_dotted(overrides).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                *, stages: frozenset[str] | set[str] = frozenset()) -> C:
    """Read ``cls`` from a YAML file (optional) and apply ``key=value`` overrides.

    A trained run's ``config.yaml`` also records its ``stage`` (``stage: sft``);
    that key is accepted when its value is one of ``stages`` (the command reading
    the file), so a run's own config can be run again, and is an error naming
    the file otherwise.
    """
    values: dict[str, Any] = {}
    source = "command line"
    known = {f.name for f in dataclasses.fields(cls)}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys to values")
        values.update(loaded or {})
        source = str(path)
        if "stage" in values and "stage" not in known:
            written = values.pop("stage")
            if written not in stages:
                expected = ", ".join(sorted(stages)) or "none"
                raise ConfigError(f"{path}: field 'stage': this file is a '{written}' config, not one for this command ({expected})")
    cli = nest_dotted(parse_overrides(overrides or []))
    hints = typing.get_type_hints(cls)
    for key, text in _override_texts(overrides or []).items():  # a string field keeps the text as typed
        if key in cli and hints.get(key) in (str, str | None) and isinstance(cli[key], (int, float)) \
                and not isinstance(cli[key], bool):
            cli[key] = text
    for key in cli:  # an unknown override is reported as coming from the command line
        if key not in known:
            from_dict(cls, {key: cli[key]}, source="command line")
    return from_dict(cls, merge_sections(values, cli), source=source)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(config)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a config dataclass (the string literal below each field)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
