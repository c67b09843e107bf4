"""Defaults and provenance, resolved in one place for every stage.

The chain is the same everywhere: an option the user gave wins; else what the artifacts record (a
teacher store's attributes; for `evaluate`, each run's store and training config); else the model's
entry in ``pipeline/configs/models/`` (shots, epochs); else the project default. Two artifacts that
disagree on a value are refused (name the value to choose) rather than one silently winning.
Torch-free: only YAML is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import yaml

from pipeline.config import CONFIGS_DIR, UserError, YamlLoader

DEFAULT_SHOTS = 8
"""Demonstrations per query when neither an option, a store nor the model's YAML gives them (Idefics2's)."""
DEFAULT_EPOCHS = 5
"""Training epochs when neither an option nor the model's YAML gives them."""
RECORDED = {"task": ("task_source", "task"), "model": ("model",), "shots": ("shots",), "data_root": ("data_root",)}
"""Where each value is recorded in a store's attributes (first key found): ``task_source`` is the task
name or YAML path the store was made from, ``task`` its name."""


@cache
def _model_yaml() -> tuple[tuple[str, dict[str, Any]], ...]:
    return tuple((path.stem, yaml.load(path.read_text(), Loader=YamlLoader) or {})  # noqa: S506 (safe)
                 for path in sorted((CONFIGS_DIR / "models").glob("*.yaml")))


def model_defaults(name: str) -> dict[str, Any]:
    """``pipeline/configs/models/<alias>.yaml`` for an alias or a matching hub id (shots, epochs), else {}."""
    return next((dict(data) for stem, data in _model_yaml() if name in (stem, data.get("id"))), {})


def default_shots(model: str | None) -> int:
    return int(model_defaults(model or "").get("shots", DEFAULT_SHOTS))


def default_epochs(model: str | None) -> int:
    return int(model_defaults(model or "").get("epochs", DEFAULT_EPOCHS))


@dataclass(frozen=True)
class Provenance:
    """Resolved values and where each came from (``option``, ``store``, ``model defaults``, ``default`` or
    ``none``), for messages and for the run's records."""

    task: str | None
    model: str | None
    shots: int
    data_root: str | None
    source: dict[str, str] = field(default_factory=dict)


def _recorded(records: Sequence[Mapping[str, Any]], name: str, what: str) -> Any:
    """The one value of ``name`` the records hold (None when none does); several different ones raise."""
    values = []
    for record in records:
        value = next((record.get(key) for key in RECORDED[name] if record.get(key) not in (None, "")), None)
        if value is not None and value not in values:
            values.append(value)
    if len(values) > 1:
        raise UserError(f"{what} were made with different {name} values ({', '.join(map(str, values))}); "
                        f"pass --{name.replace('_', '-')} or handle them separately")
    return values[0] if values else None


def resolve(*, task: str | None = None, model: str | None = None, shots: int | None = None,
            data_root: str | None = None, records: Sequence[Mapping[str, Any]] = (),
            what: str = "the stores") -> Provenance:
    """Options first (non-None), then ``records`` (store attributes, or per run its store's and its
    training config's values), then the model's defaults (shots), then ``DEFAULT_SHOTS``. ``what``
    names the records in the error raised when they disagree."""
    source: dict[str, str] = {}
    values: dict[str, Any] = {"task": task, "model": model, "shots": shots, "data_root": data_root}
    for name, given in list(values.items()):
        if given is not None:
            source[name] = "option"
            continue
        found = _recorded(records, name, what)
        values[name] = found
        source[name] = "store" if found is not None else "none"
    if values["shots"] is None:
        entry = model_defaults(values["model"] or "")
        values["shots"] = int(entry.get("shots", DEFAULT_SHOTS))
        source["shots"] = "model defaults" if "shots" in entry else "default"
    return Provenance(values["task"], values["model"], int(values["shots"]), values["data_root"], source)
