"""Typed, frozen configs: defaults < YAML file < CLI flags, all errors collected and raised once.

Each stage defines a frozen dataclass whose field docstrings (``#:`` comments are not kept at run
time, so we use ``field(metadata={"help": ...})``) double as the CLI help. ``load_config`` merges a
YAML mapping and CLI overrides (``None`` means "not given") into it, checks types and choices, and
raises one ``ConfigError`` that names every bad key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message lists every bad key."""


class UserError(RuntimeError):
    """An error caused by input the user controls; the CLI prints it on one line, no traceback."""


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A config field with its help text (and optional choices), e.g. ``lr: float = opt(5e-3, "...")``."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
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
        merged[key] = coerced
    if errors:
        raise ConfigError(f"invalid {cls.__name__}:\n  - " + "\n  - ".join(errors))
    return cls(**merged)


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
