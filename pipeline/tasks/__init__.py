"""Task registry: ``load_task(name_or_yaml, **options)`` and ``task_names()``.

Built-in tasks are data: ``configs/tasks/<name>.yaml`` holds each one's templates, metric, data
locations (official files under a data root, or HuggingFace dataset ids) and split sizes; its
``loader`` key picks the code that reads it (``vqa``, ``karpathy`` or ``shapes``). Options given to
``load_task`` override the YAML (``None`` means "not given"); the data root comes from the
``data_root`` option, else the ``MIMIC_DATA`` environment variable, else the YAML. Any other YAML
path is a user task (see ``pipeline.tasks.user``). Built-in text tasks come from
``pipeline.tasks.builtin_text``.
"""

from __future__ import annotations

import importlib
import os
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import CONFIGS_DIR, ConfigError, UserError, load_config, opt, read_yaml
from pipeline.tasks.base import SPLITS, Example, Task, TaskSpec, most_frequent_answer

__all__ = [
    "SPLITS",
    "DATA_ROOT_ENV",
    "Example",
    "Task",
    "TaskConfig",
    "TaskSpec",
    "load_task",
    "most_frequent_answer",
    "task_names",
    "task_spec",
]

TASKS_DIR = CONFIGS_DIR / "tasks"
DATA_ROOT_ENV = "MIMIC_DATA"
LOADERS = ("vqa", "karpathy", "shapes")
KINDS = ("vqa", "caption", "text")
METRICS = ("vqa_accuracy", "cider", "exact_match")


@dataclass(frozen=True)
class TaskConfig:
    """A built-in task (``configs/tasks/<name>.yaml``); every field can be overridden by an option."""

    name: str = opt("", "Task name (defaults to the YAML file name).")
    loader: str = opt("vqa", "Which reader: vqa (VQAv2/OK-VQA files), karpathy (COCO), shapes.", LOADERS)
    kind: str = opt("vqa", "vqa | caption | text.", KINDS)
    metric: str = opt("vqa_accuracy", "vqa_accuracy | cider | exact_match.", METRICS)
    prompt: str = opt("Question:{question} Short answer:", "Query template with {question}.")
    answer: str = opt(" {answer}", "Answer template with {answer}, appended to the prompt.")
    max_new_tokens: int = opt(10, "Generation budget (10 for VQA, 20 for captions).")
    source: str | None = opt(None, "official (files under data_root, the default) or hub (HF datasets).")
    data_root: str = opt("data", f"Folder with the official files (env {DATA_ROOT_ENV} overrides the YAML).")
    cache_dir: str | None = opt(None, "HF datasets Arrow cache folder (default: the HF cache).")
    seed: int = opt(3407, "Seed of the split shuffles (train subset, eval subset, synthetic scenes).")
    train_size: int = opt(1000, "Training queries: the first N of the training split after a seeded shuffle.")
    eval_size: int | None = opt(None, "Evaluation queries (a seeded sample); null = the whole split.")
    support_size: int | None = opt(None, "Demonstration pool size; null = the whole training split.")
    official: dict = opt({}, "Paths under data_root of the official files (see pipeline.tasks.official).")
    hub: dict = opt({}, "HF dataset ids, splits and column mapping per source (see pipeline.tasks.hub).")
    synthetic: dict = opt({}, "Rendering settings of the shapes tasks (see pipeline.tasks.synthetic).")


def _template_errors(template: str, allowed: set[str], key: str) -> list[str]:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        return [f"'{key}': {template!r} is not a valid template ({err})"]
    bad = fields - allowed
    if bad:
        return [f"'{key}': unknown placeholder(s) {sorted(bad)} in {template!r}; allowed: {sorted(allowed)}"]
    return []


def task_spec(name: str, kind: str, metric: str, prompt: str, answer: str, max_new_tokens: int) -> TaskSpec:
    """A ``TaskSpec`` after checking its templates; problems raise one ``ConfigError``."""
    errors = _template_errors(prompt, {"question"}, "prompt") + _template_errors(answer, {"answer"}, "answer")
    if "{answer}" not in answer:
        errors.append(f"'answer': {answer!r} must contain {{answer}}")
    if kind != "caption" and "{question}" not in prompt:
        errors.append(f"'prompt': {prompt!r} must contain {{question}} for a {kind} task")
    if max_new_tokens < 1:
        errors.append(f"'max_new_tokens': got {max_new_tokens}, expected >= 1")
    if errors:
        raise ConfigError(f"task {name}:\n  - " + "\n  - ".join(errors))
    return TaskSpec(name, kind, metric, prompt, answer, max_new_tokens)  # type: ignore[arg-type]


def _builtin_text_tasks() -> dict[str, Callable[[], Task]]:
    try:
        builtin_text = importlib.import_module("pipeline.tasks.builtin_text")
    except ImportError as err:
        # only while that module is not written yet; an import error inside it must surface
        if err.name == "pipeline.tasks.builtin_text":
            return {}
        raise
    return builtin_text.builtin_text_tasks()


def _yaml_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_names() -> list[str]:
    """Every registered task name: the built-in YAML tasks and the built-in text tasks."""
    return sorted(set(_yaml_task_names()) | set(_builtin_text_tasks()))


def _check_sizes(cfg: TaskConfig) -> None:
    errors = [
        f"'{key}': got {value}, expected a positive integer"
        for key, value in (
            ("train_size", cfg.train_size),
            ("eval_size", cfg.eval_size),
            ("support_size", cfg.support_size),
        )
        if value is not None and value < 1
    ]
    if cfg.loader == "shapes" and cfg.source not in (None, "official"):
        errors.append(
            f"'source': got {cfg.source!r}; the shapes tasks are rendered locally and have no source"
        )
    if cfg.loader != "shapes" and cfg.source not in (None, "official", "hub"):
        errors.append(f"'source': got {cfg.source!r}, expected one of official, hub")
    if errors:
        raise ConfigError(f"task {cfg.name}:\n  - " + "\n  - ".join(errors))


def _builtin_task(data: dict[str, Any], default_name: str, options: dict[str, Any]) -> Task:
    if options.get("data_root") is None and os.environ.get(DATA_ROOT_ENV):
        options = {**options, "data_root": os.environ[DATA_ROOT_ENV]}
    cfg = load_config(TaskConfig, {"name": default_name, **data}, **options)
    _check_sizes(cfg)
    spec = task_spec(cfg.name, cfg.kind, cfg.metric, cfg.prompt, cfg.answer, cfg.max_new_tokens)
    if cfg.loader == "shapes":
        from pipeline.tasks.synthetic import synthetic_loaders

        return Task(spec, synthetic_loaders(cfg))
    if cfg.source == "hub":
        from pipeline.tasks.hub import hub_loaders

        return Task(spec, hub_loaders(cfg))
    from pipeline.tasks.official import official_loaders

    return Task(spec, official_loaders(cfg))


def _unknown_task(name: str) -> UserError:
    return UserError(
        f"unknown task '{name}'; valid names: {', '.join(task_names())}; "
        f"a path to a YAML task file (a user task) is also accepted"
    )


def read_task_yaml(path: Path) -> dict[str, Any]:
    """A user's task YAML file as a mapping; every fault is a one-line ``UserError`` naming the file.

    A syntax error names the line and column (``yaml.MarkedYAMLError.problem_mark``).
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise UserError(
            f"task file {path}{where}: invalid YAML: {detail}; fix the syntax there (a task file is a "
            "mapping of keys to values, e.g. `files: {support: support.jsonl}`)"
        ) from err
    except UnicodeDecodeError as err:
        raise UserError(
            f"task file {path}: not UTF-8 text ({err.reason} at byte {err.start}); save it with UTF-8 encoding"
        ) from err
    except OSError as err:
        raise UserError(
            f"task file {path} cannot be read ({err.strerror or err}); give a readable YAML file"
        ) from err
    if not isinstance(data, dict):
        raise UserError(
            f"task file {path} holds {type(data).__name__}, expected a mapping of keys to values "
            "(e.g. `files: {support: support.jsonl}`)"
        )
    return data


def load_task(name_or_yaml: str, **options: Any) -> Task:
    """The task named ``name_or_yaml`` (see ``task_names()``) or defined by a YAML file at that path.

    ``options`` override the task's YAML keys (e.g. ``data_root``, ``source``, ``train_size``,
    ``eval_size``, ``seed``, ``cache_dir``); ``None`` values are ignored. Unknown keys raise
    ``ConfigError``; an unknown name raises ``UserError`` listing the valid names.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name_or_yaml in _yaml_task_names():
        return _builtin_task(read_yaml(TASKS_DIR / f"{name_or_yaml}.yaml"), name_or_yaml, options)
    text_tasks = _builtin_text_tasks()
    if name_or_yaml in text_tasks:
        if options:
            raise ConfigError(f"built-in text task {name_or_yaml} takes no options; got {sorted(options)}")
        return text_tasks[name_or_yaml]()
    path = Path(name_or_yaml).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml") and not path.is_file():
        raise _unknown_task(name_or_yaml)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist; valid task names: {', '.join(task_names())}")
    data = read_task_yaml(path)
    if data.get("loader") in LOADERS:
        return _builtin_task(data, path.stem, options)
    from pipeline.tasks.user import load_user_task

    return load_user_task(path, data, **options)
