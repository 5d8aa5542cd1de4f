"""Typed configs: dataclasses loaded from YAML, with ``key=value`` overrides.

Every stage declares one dataclass (e.g. :class:`rlhfkit.sft.SFTConfig`). Each
field carries a docstring right below it. :func:`load_config` reads a YAML file,
applies command-line overrides, and checks every value against the field's
annotation, so an unknown or mistyped key fails early with a message that names
it (and the file it came from).
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


MAX_YAML_DEPTH = 100
"""How deeply a config's YAML may nest (real configs nest 2-3 levels; PyYAML recurses per level)."""
MAX_ALIAS_EXPANSION = 10_000
"""How many values aliases (``*name``) may add when expanded: more is an alias bomb, whose expansion by
any later reader (a message, ``dataclasses.asdict``, a copy) would hang or exhaust memory."""

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxtuple = _REPR.maxlist = _REPR.maxarray = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 6
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40


def shown(value: Any) -> str:
    """A user value as put in a message: its repr, bounded in size and depth (an aliased bomb is not expanded)."""
    return _REPR.repr(value)


def _key_text(key: Any) -> str:
    """A key as put in a message: the name itself, or a bounded repr of anything odd."""
    return key if isinstance(key, str) and len(key) <= 80 else shown(key)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _YAMLRejected(Exception):
    """Valid YAML that a config may not use (a duplicated key, deep nesting, an alias bomb)."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Raise _YAMLRejected when aliases expand ``root`` by more than MAX_ALIAS_EXPANSION values or refer to
    a value from inside itself. Walks the node graph once (iteratively), each shared node counted once."""
    sizes: dict[int, int] = {}  # id(node) -> its size with every alias expanded
    open_nodes: set[int] = set()  # started, not finished: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            open_nodes.discard(key)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            line = node.start_mark.line + 1 if node.start_mark else "?"
            raise _YAMLRejected(f"line {line}: an alias refers to a value from inside that value (a cycle)")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    if sizes[id(root)] - len(sizes) > MAX_ALIAS_EXPANSION:
        where = ""
        if isinstance(root, yaml.MappingNode) and root.value:  # name the key whose value expands most
            key_node, value_node = max(root.value, key=lambda pair: sizes[id(pair[1])])
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            where = f"line {value_node.start_mark.line + 1}: key '{_key_text(name)}': "
        raise _YAMLRejected(
            f"{where}aliases (*name) expand to more than {MAX_ALIAS_EXPANSION:,} values "
            "(an alias bomb?); write the values out instead"
        )


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter as configs need: duplicated keys (YAML forbids them; PyYAML keeps
    the last one silently), nesting deeper than MAX_YAML_DEPTH and alias bombs are rejected."""

    _depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _YAMLRejected(f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):  # type: ignore[override]
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # complex keys are refused by PyYAML itself; merged (<<) keys may be overridden
                key = self.construct_object(key_node)
                try:
                    seen = first.get(key)
                except TypeError:
                    continue
                line = key_node.start_mark.line + 1
                if seen is not None:
                    raise _YAMLRejected(
                        f"line {line}: duplicate key '{_key_text(key)}' (first on line {seen}); "
                        "YAML forbids repeated keys: keep one"
                    )
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    """``text`` as YAML, read by the strict loader (raises yaml.YAMLError, _YAMLRejected, RecursionError)."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml_file(path: Path) -> Any:
    """A config file's YAML, or a ConfigError naming ``path`` (and the line, where there is one)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        looks = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ConfigError(
            f"{path}: not UTF-8 text{looks}: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}); save the file as UTF-8"
        ) from None
    if "\x00" in text:
        at = data.index(b"\x00")
        line = data.count(b"\n", 0, at) + 1
        raise ConfigError(
            f"{path}: a NUL byte at offset {at} (line {line}): not a text file, "
            "or UTF-16 without a byte-order mark? Save the file as UTF-8"
        ) from None
    try:
        return _load_yaml(text)
    except _YAMLRejected as e:
        raise ConfigError(f"{path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e


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
        raise ConfigError(f"{source}: key '{key}': expected {_type_name(tp)}, got {shown(value)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        choices = ", ".join(repr(a) for a in get_args(tp))
        raise ConfigError(f"{source}: key '{key}': {shown(value)} is not one of {choices}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):  # `key=a,b,c` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}': expected a list, got {shown(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}': expected a mapping, got {shown(value)}")
        if (get_args(tp) or (Any,))[0] is str:
            odd = [k for k in value if not isinstance(k, str)]
            if odd:
                odd = odd[0]
                raise ConfigError(
                    f"{source}: key '{key}': its key {shown(odd)} (of type {type(odd).__name__}) "
                    "is not a name (quote it if it is one)"
                )
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: key '{key}': expected true/false, got {shown(value)}")
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
        raise ConfigError(f"{source}: key '{key}': expected an integer, got {shown(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}': expected a number, got {shown(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: key '{key}': expected a string, got {shown(value)}")
    return value


def from_dict(cls: type[C], values: dict[str, Any], *, source: str = "config") -> C:
    """Build dataclass ``cls`` from a mapping, type-checking every value."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # C is any dataclass
    hints = typing.get_type_hints(cls)
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise ConfigError(
            f"{source}: key {shown(odd[0])} (of type {type(odd[0]).__name__}) is not a key of "
            f"{cls.__name__}: keys are names (quote it if it is one)"
        )
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key '{_key_text(unknown[0])}' for {cls.__name__} (known keys: {known})")
    kwargs = {k: _coerce(v, hints[k], k, source) for k, v in values.items()}
    missing = [
        n
        for n, f in fields.items()
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
            raise ConfigError(f"override '{_clip(item)}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{_clip(item)}' has an empty key")
        try:
            value = _load_yaml(raw) if raw != "" else ""
        except _YAMLRejected as e:
            raise ConfigError(f"command line override '{_clip(item)}': key '{_key_text(key)}': {e}") from None
        except RecursionError:
            raise ConfigError(
                f"command line override '{_clip(item)}': key '{_key_text(key)}': nested too deeply to read"
            ) from None
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


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    stages: frozenset[str] | set[str] = frozenset(),
) -> C:
    """Read ``cls`` from a YAML file (optional) and apply ``key=value`` overrides.

    A trained run's ``config.yaml`` also records its ``stage`` (``stage: sft``);
    that key is accepted when its value is one of ``stages`` (the command reading
    the file), so a run's own config can be run again, and is an error naming
    the file otherwise.
    """
    values: dict[str, Any] = {}
    source = "command line"
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # C is any dataclass
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = _read_yaml_file(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys to values")
        values.update(loaded or {})
        source = str(path)
        if "stage" in values and "stage" not in known:
            written = values.pop("stage")
            expected = ", ".join(sorted(stages)) or "none"
            if not isinstance(written, str):
                raise ConfigError(f"{path}: field 'stage': expected a stage name ({expected}), got {shown(written)}")
            if written not in stages:
                raise ConfigError(
                    f"{path}: field 'stage': this file is a '{_key_text(written)}' config, not one for this command ({expected})"
                )
    cli = nest_dotted(parse_overrides(overrides or []))
    hints = typing.get_type_hints(cls)
    for key, text in _override_texts(overrides or []).items():  # a string field keeps the text as typed
        if (
            key in cli
            and hints.get(key) in (str, str | None)
            and isinstance(cli[key], (int, float))
            and not isinstance(cli[key], bool)
        ):
            cli[key] = text
    typed = {}  # the override each top-level key came from, as typed (the last one wins)
    for item in overrides or []:
        if "=" in item:
            typed[item.split("=", 1)[0].strip().split(".", 1)[0]] = item
    for key in cli:  # a bad override is reported as coming from the command line, not from the file
        if key not in known:
            from_dict(cls, {key: cli[key]}, source="command line")
        else:
            _coerce(cli[key], hints[key], key, f"command line override '{_clip(typed.get(key, key))}'")
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
