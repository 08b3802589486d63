"""Strict YAML loading of a `JobConfig`, command-line overrides, and writing a config back out.

A config file's top-level keys are the fields of `JobConfig`: `name` (default: the file stem),
then one mapping per section (`model`, `parallel`, ...). A missing section or key keeps the
dataclass default; an unknown key, a key written twice or a value of the wrong type stops with a
`ConfigError` naming the file (or the --set override) and the dotted key. Overrides are
"dotted.key=value" strings whose value is read as YAML, applied to the file's mapping before any
type is checked. The loaded config then goes through `checks.validate`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from k2train.config.checks import ConfigError, validate
from k2train.config.schema import JobConfig

# YAML 1.1, which PyYAML follows, needs a dot in a float: `1e-4` and `3E5` stay strings.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, typing.Hashable):
            continue  # construct_mapping reports an unhashable key itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is written twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclasses.dataclass(frozen=True)
class _Origin:
    """Where a dotted key's value came from: an override if one set it or a key above it, else the file."""

    path: str
    overrides: Mapping[str, str]

    def of(self, dotted: str) -> str:
        parts = dotted.split("[")[0].split(".")
        for end in range(len(parts), 0, -1):
            text = self.overrides.get(".".join(parts[:end]))
            if text is not None:
                return f"--set {text}"
        return self.path


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Read, override, type-check and validate the YAML config at `path`."""
    raw = _read_yaml(str(path))
    raw.setdefault("name", Path(path).stem)
    return config_from_dict(raw, str(path), overrides)


def config_from_dict(data: Mapping[str, Any], source: str, overrides: Sequence[str] = ()) -> JobConfig:
    """Build and validate a JobConfig from a parsed YAML mapping; `source` names it in errors."""
    raw = copy.deepcopy(dict(data))
    origin = _Origin(source, _apply_overrides(raw, overrides, source))
    cfg = _build(JobConfig, raw, "", origin)
    validate(cfg, source if not overrides else f"{source} with --set {' --set '.join(overrides)}")
    return cfg


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file.") from None
    except OSError as e:
        raise ConfigError(f"{path}: the config file cannot be read ({e.strerror}).") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML: {e.problem}{where}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the file must be a mapping of config sections, got {_got(raw)}.")
    return raw


# ---- overrides -------------------------------------------------------------------------------


def _apply_overrides(raw: dict, overrides: Sequence[str], source: str) -> dict[str, str]:
    """Write each "dotted.key=value" into `raw`; return {dotted key: override text} for error messages."""
    origins = {}
    for text in overrides:
        key, sep, value_text = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {text}: expected dotted.key=value, e.g. optimizer.lr=3e-4.")
        field_type = _field_type(key, text)
        try:
            value = yaml.load(value_text, Loader=_StrictLoader)
        except yaml.YAMLError:
            raise ConfigError(
                f"--set {text}: the value {value_text!r} is not a YAML scalar or list.") from None
        if field_type is str and not isinstance(value, str):
            value = value_text  # run_name=0042 or data.prefix= mean the text as written
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"{source}: {where} must be a mapping, got {_got(node)}.")
        node[parts[-1]] = value
        origins[key] = text
    return origins


def _field_type(dotted: str, text: str) -> Any:
    """The schema type at `dotted`, or a ConfigError naming the override if no such key exists."""
    cls: Any = JobConfig
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        section = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {text}: {section} is a value, not a section with key {part}.")
        hints = _hints(cls)
        if part not in hints:
            raise ConfigError(f"--set {text}: {_unknown(section, '.'.join(parts[: depth + 1]), hints)}")
        cls = _strip_none(hints[part])
    return cls


# ---- building dataclasses ----------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type, in field order (the schema uses postponed annotations)."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls)}


def _unknown(section: str, dotted: str, hints: Mapping[str, Any]) -> str:
    known = f"known keys of {section}" if section else "known top-level keys"
    return f"unknown key {dotted}; {known}: {', '.join(hints)}."


def _build(cls: type, raw: Mapping, prefix: str, origin: _Origin) -> Any:
    """Instantiate dataclass `cls` from `raw`, checking every key and value against its field type."""
    hints = _hints(cls)
    section = prefix[:-1]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"{origin.of(dotted)}: {_unknown(section, dotted, hints)}")
        kwargs[key] = _coerce(value, hints[key], dotted, origin)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, dotted: str, origin: _Origin, expected: str = "") -> Any:
    """`value` as a `tp`, or a ConfigError saying what `dotted` expects and what it got."""
    expected = expected or _describe(tp)
    if _is_optional(tp):
        if value is None:
            return None
        return _coerce(value, _strip_none(tp), dotted, origin, expected)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return _build(tp, value, f"{dotted}.", origin)
    elif typing.get_origin(tp) is tuple:
        items = _tuple_items(tp, value)
        if items is not None:
            return tuple(_coerce(v, t, f"{dotted}[{i}]", origin) for i, (v, t) in enumerate(items))
    else:
        # A union of scalars (a number or a word, e.g. GiB or "auto"): the first type that fits.
        for member in typing.get_args(tp) if _is_union(tp) else (tp,):
            ok, converted = _scalar(value, member)
            if ok:
                return converted
    raise ConfigError(f"{origin.of(dotted)}: {dotted} must be {expected}, got {_got(value)}.")


def _scalar(value: Any, tp: type) -> tuple[bool, Any]:
    """(fits, value as tp) for the scalar field types: bool is not an int; an int is a float."""
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return True, float(value)
        return False, None
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"the config loader has no rule for field type {tp!r}")


def _tuple_items(tp: Any, value: Any) -> list[tuple[Any, Any]] | None:
    """Pairs (item, item type) if `value` is a list of the right length for `tp`, else None."""
    if not isinstance(value, (list, tuple)):
        return None
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    return list(zip(value, args)) if len(args) == len(value) else None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (types.UnionType, typing.Union)


def _is_optional(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _strip_none(tp: Any) -> Any:
    if not _is_optional(tp):
        return tp
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]


_SCALAR_NAMES = {bool: ("true or false", "booleans"), int: ("an int", "ints"),
                 float: ("a float", "floats"), str: ("a string", "strings")}


def _describe(tp: Any) -> str:
    """What a field of type `tp` accepts, in words: "a float or null", "a list of 3 floats"."""
    if _is_optional(tp):
        return f"{_describe(_strip_none(tp))} or null"
    if _is_union(tp):
        return " or ".join(_describe(member) for member in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        items = "mappings" if dataclasses.is_dataclass(args[0]) else _SCALAR_NAMES[args[0]][1]
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {items}"
        return f"a list of {len(args)} {items}"
    return _SCALAR_NAMES[tp][0]


def _got(value: Any) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


# ---- writing ----------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> Any:
    """`cfg` as plain dicts, lists and scalars in field order (YAML- and JSON-ready)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    return cfg


class _Dumper(yaml.SafeDumper):
    """Block-style sections with lists on one line, the layout of the files in configs/."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def dump_config(cfg: JobConfig) -> str:
    """YAML text of every field of `cfg`; `load_config` reads it back to an equal JobConfig."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: JobConfig, path: str | Path) -> Path:
    """Write `dump_config(cfg)` to `path` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path
