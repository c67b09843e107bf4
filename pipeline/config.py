"""Typed, frozen configs: defaults < YAML file < CLI flags, all errors collected and raised once.

Each stage defines a frozen dataclass whose field docstrings (``#:`` comments are not kept at run
time, so we use ``field(metadata={"help": ...})``) double as the CLI help. ``load_config`` merges a
YAML mapping and CLI overrides (``None`` means "not given") into it, checks types and choices, and
raises one ``ConfigError`` that names every bad key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
"""Built-in YAML: model aliases (``models/``) and tasks (``tasks/``); package data, installed with the code."""


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YAML12_INT = r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"
_YAML12_FLOAT = r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
NUMBER_TEXT = re.compile(rf"(?:{_YAML12_INT}|{_YAML12_FLOAT})")
"""A number as YAML 1.2 (core schema) writes one: ``5``, ``0x1f``, ``1e-3``, ``5.0e-3``, ``.5``, ``.inf``."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 does (the core schema). PyYAML follows YAML 1.1,
    where ``1e-3`` (no dot) is a string, ``012`` is octal 10, ``1_000`` is 1000 and ``1:30`` is 90; here
    they are the float 0.001, the int 12 and two strings. Everything else is ``yaml.safe_load``'s."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(_INT_TAG, re.compile(rf"^(?:{_YAML12_INT})$"), list("-+0123456789"))
YamlLoader.add_implicit_resolver(_FLOAT_TAG, re.compile(rf"^(?:{_YAML12_FLOAT})$"), list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))
    return int(text[2:], 8) if text.startswith("0o") else int(text, 0 if text.startswith("0x") else 10)


YamlLoader.add_constructor(_INT_TAG, _construct_int)


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message lists every bad key."""


class UserError(RuntimeError):
    """An error caused by input the user controls; the CLI prints it on one line, no traceback."""


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None, at_least: float | None = None,
        above: float | None = None, at_most: float | None = None) -> Any:
    """A config field with its help text, optional choices and numeric bounds, e.g.
    ``lr: float = opt(5e-3, "...", above=0)``. Bounds apply to numbers and to each number of a list;
    ``None`` (an optional field left unset) is never checked against them."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    bounds = {k: v for k, v in (("at_least", at_least), ("above", above), ("at_most", at_most)) if v is not None}
    if bounds:
        meta["bounds"] = bounds
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def bounds_text(bounds: dict[str, float]) -> str:
    """``{"at_least": 1}`` -> ``">= 1"``: how a field's bounds read in help and errors."""
    signs = {"at_least": ">=", "above": ">", "at_most": "<="}
    return " and ".join(f"{signs[k]} {v:g}" for k, v in bounds.items())


def _out_of_bounds(value: Any, bounds: dict[str, float]) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return any(("at_least" in bounds and v < bounds["at_least"]) or ("above" in bounds and v <= bounds["above"])
               or ("at_most" in bounds and v > bounds["at_most"]) or v != v for v in nums)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, numbers as YAML 1.2 reads them (``lr: 1e-3`` is a float; ``YamlLoader``); a
    missing or unreadable file, bad YAML or a non-mapping is a ``ConfigError`` naming the file (and the
    line, for a syntax error)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; give the path of a YAML file")
    try:
        data = yaml.load(path.read_text(), Loader=YamlLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: invalid YAML ({problem}); fix the file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read ({err}); give a readable UTF-8 YAML file") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def _check_type(value: Any, hint: Any) -> tuple[bool, Any]:
    """Return (ok, coerced value) for the simple hints our configs use."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, v = _check_type(value, arg)
            if ok:
                return True, v
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        # a number written as text (``"1e-3"``: YAML 1.1, PyYAML's rule, reads 1e-3 without a dot as a string)
        if isinstance(value, str):
            if not NUMBER_TEXT.fullmatch(value.strip()):
                return False, value
            return True, float(yaml.load(value.strip(), Loader=YamlLoader))  # noqa: S506 (a SafeLoader)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        items = []
        for item in value:
            ok, v = _check_type(item, inner)
            if not ok:
                return False, value
            items.append(v)
        return True, tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if isinstance(hint, type):  # a class of its own (e.g. a task hook): an instance of it
        return isinstance(value, hint), value
    return True, value


def load_config(cls: type[T], yaml_data: dict[str, Any] | None = None, **overrides: Any) -> T:
    """Build ``cls`` from its defaults, then ``yaml_data``, then non-None ``overrides``.

    Unknown keys, wrong types and values outside a field's ``choices`` are collected and raised
    together as one ``ConfigError`` naming each key, what it got and what it expects.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    merged: dict[str, Any] = {}
    errors: list[str] = []
    for source, data in (("config file", yaml_data or {}), ("option", overrides)):
        for key, value in data.items():
            if value is None and source == "option":
                continue
            key = key.replace("-", "_")
            if key not in fields:
                errors.append(f"unknown {source} key '{key}' (valid: {', '.join(sorted(fields))})")
                continue
            merged[key] = value
    for key, value in merged.items():
        ok, coerced = _check_type(value, hints[key])
        if not ok:
            errors.append(f"'{key}': got {value!r}, expected {hints[key]}")
            continue
        choices = fields[key].metadata.get("choices")
        if choices is not None and coerced not in choices:
            errors.append(f"'{key}': got {coerced!r}, expected one of {', '.join(map(str, choices))}")
            continue
        bounds = fields[key].metadata.get("bounds")
        if bounds and _out_of_bounds(coerced, bounds):
            errors.append(f"'{key}': got {coerced!r}, expected {bounds_text(bounds)}")
            continue
        merged[key] = coerced
    if errors:
        raise ConfigError(f"invalid {cls.__name__} ({len(errors)} problem{'s' if len(errors) > 1 else ''}): "
                          + "; ".join(errors) + "; fix them on the command line or in the --config file")
    return cls(**merged)


def changed_keys(old: dict, new: dict, old_name: str = "was", new_name: str = "now") -> list[str]:
    """``"key: was X vs now Y"`` for every key whose value differs between two mappings (a key missing on one
    side reads ``<missing>``; long values are shortened): what a refusal to resume names."""
    gone = "<missing>"

    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{k}: {old_name} {short(old.get(k, gone))} vs {new_name} {short(new.get(k, gone))}"
            for k in sorted(set(old) | set(new)) if old.get(k, gone) != new.get(k, gone)]


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}
