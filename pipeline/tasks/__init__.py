"""Task registry: ``load_task(name_or_yaml, **options)`` and ``task_names()``.

Every task is one YAML file read into one ``TaskConfig``: the built-in ones are
``configs/tasks/<name>.yaml`` (files whose name starts with ``_`` are shared templates, not tasks),
anything else is a path to a user's YAML. A task file holds its templates, metric, data locations and
split sizes; its ``loader`` picks the reading code (``files`` for local data files, ``words`` for the
built-in text tasks, ``vqa`` / ``karpathy`` / ``ocr_vqa`` for the official files or hub datasets,
``shapes`` for rendered scenes) or names the user's own (``!function module.load``). ``prompt``,
``postprocess`` and ``metric`` may be hooks too, and ``include:`` merges shared templates (``pipeline.tasks.hooks``).
Options given to ``load_task`` override the YAML (``None`` means "not given"); the data root comes from
the ``data_root`` option, else the ``MIMIC_DATA`` environment variable, else the YAML.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import CONFIGS_DIR, ConfigError, UserError, load_config, opt
from pipeline.metrics import METRIC_NAMES
from pipeline.tasks.base import (
    DEFAULT_METRICS,
    DEFAULT_PROMPTS,
    KINDS,
    SPLITS,
    Example,
    Task,
    TaskSpec,
    most_frequent_answer,
)
from pipeline.tasks.hooks import Hook, read_task_yaml

__all__ = [
    "SPLITS",
    "DATA_ROOT_ENV",
    "Example",
    "Hook",
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
LOADERS = ("files", "words", "vqa", "karpathy", "ocr_vqa", "shapes", "mme", "seed_bench")
"""The built-in readers (``loader:``); a ``!function`` hook names another."""
METRICS = METRIC_NAMES


@dataclass(frozen=True)
class TaskConfig:
    """A task YAML; every key can also be given as an option to ``load_task``. Keys by loader:
    files: ``files`` or ``file`` (+ ``split_column`` / ``split_ratios``), ``fields``, ``answers_separator``, or
    ``hub`` (one HF dataset split + ``split_column`` / ``split_ratios``, or one per split; pipeline.tasks.user);
    words: ``file``; vqa / karpathy / ocr_vqa: ``source``, ``data_root``, ``official``, ``hub``; shapes: ``synthetic``."""

    name: str = opt("", "Task name (default: the YAML file name).")
    loader: str | Hook = opt("files", "Which reader: files (local JSONL / JSON / CSV / Parquet), words (the built-in "
                             "text tasks' JSONL), vqa (VQAv2 / OK-VQA), karpathy (COCO / Flickr30k captions), "
                             "ocr_vqa (OCR-VQA), shapes (rendered), mme / seed_bench (pipeline.tasks.benchmarks), "
                             "or `!function module.load` returning {split: [Example, ...]}.")
    kind: str | None = opt(None, "vqa | caption | text (default: vqa if rows have an image, else text).", (*KINDS, None))
    metric: str | Hook | None = opt(None, "vqa_accuracy | cider | exact_match (default by kind), mme_accuracy, "
                                    "seed_accuracy, or "
                                    "`!function module.score` scoring (prediction, answers) in [0, 1].")
    prompt: str | Hook | None = opt(None, "Query template with {question} (default by kind), or "
                                    "`!function module.prompt` making the query text from an example.")
    answer: str = opt(" {answer}", "Answer template with {answer}, appended to the prompt.")
    max_new_tokens: int = opt(10, "Generation budget (10 for VQA, 20 for captions).", at_least=1)
    postprocess: Hook | None = opt(None, "`!function module.clean` turning generated text into the prediction "
                                   "(default: the first line, stripped).")
    seed: int = opt(3407, "Seed of the split shuffles and subsets (and of rendered scenes).")
    train_size: int | None = opt(None, "Training queries: a seeded subset of that size (null: all; rendered: 1000).",
                                 at_least=1)
    eval_size: int | None = opt(None, "Evaluation queries: a seeded subset of that size (null: all).", at_least=1)
    support_size: int | None = opt(None, "Demonstration pool: a seeded subset of that size (null: all).", at_least=1)
    cache_dir: str | None = opt(None, "HF datasets Arrow cache folder (default: the HF cache).")
    # files / words
    files: dict = opt({}, "One data file per split: {support: ..., train: ..., eval: ...} (relative to the YAML).")
    file: str | None = opt(None, "One data file for all splits (with split_column or split_ratios; words: the JSONL).")
    split_column: str | None = opt(None, "Column of `file` naming each row's split (support/train/eval).")
    split_ratios: dict = opt(
        {}, "Fractions of `file` per split after a seeded shuffle, e.g. {support: 0.8, eval: 0.2}."
    )
    fields: dict = opt({}, "Column names for id / question / answers (or answer) / image when they differ.")
    answers_separator: str = opt("|", "Separator of several answers in one string cell (CSV).")
    # vqa / karpathy / shapes
    source: str | None = opt(None, "official (files under data_root, the default) or hub (HF datasets).",
                             ("official", "hub", None))
    data_root: str = opt("data", f"Folder with the official files (env {DATA_ROOT_ENV} overrides the YAML).")
    official: dict = opt({}, "Paths under data_root of the official files (see pipeline.tasks.official).")
    hub: dict = opt({}, "HF dataset ids, splits and column mapping per source (see pipeline.tasks.hub; a "
                    "user task: pipeline.tasks.user).")
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


def task_spec(name: str, kind: str, metric: str | Hook, prompt: str | Hook, answer: str, max_new_tokens: int,
              postprocess: Hook | None = None) -> TaskSpec:
    """A ``TaskSpec`` after checking its templates (a hook is checked when called); problems raise one
    ``ConfigError``."""
    errors = _template_errors(answer, {"answer"}, "answer")
    if "{answer}" not in answer:
        errors.append(f"'answer': {answer!r} must contain {{answer}}")
    if isinstance(prompt, str):
        errors += _template_errors(prompt, {"question"}, "prompt")
        if kind != "caption" and "{question}" not in prompt:
            errors.append(f"'prompt': {prompt!r} must contain {{question}} for a {kind} task")
    if isinstance(metric, str) and metric not in METRICS:
        errors.append(f"'metric': got {metric!r}, expected one of {', '.join(METRICS)} or a `!function` hook")
    if max_new_tokens < 1:
        errors.append(f"'max_new_tokens': got {max_new_tokens}, expected >= 1")
    if errors:
        raise ConfigError(f"task {name}:\n  - " + "\n  - ".join(errors))
    return TaskSpec(name, kind, metric, prompt, answer, max_new_tokens, postprocess)


def _task_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml")) if not p.stem.startswith("_")}


def task_names() -> list[str]:
    """Every built-in task name (``configs/tasks/*.yaml`` but the shared ``_`` templates)."""
    return sorted(_task_files())


def _check(cfg: TaskConfig) -> None:
    errors = []
    if isinstance(cfg.loader, str) and cfg.loader not in LOADERS:
        errors.append(f"'loader': got {cfg.loader!r}, expected one of {', '.join(LOADERS)} or a `!function` hook")
    if cfg.loader == "shapes" and cfg.source not in (None, "official"):
        errors.append(f"'source': got {cfg.source!r}; the shapes tasks are rendered locally and have no source")
    if errors:
        raise ConfigError(f"task {cfg.name}:\n  - " + "\n  - ".join(errors))


def _hook_loaders(cfg: TaskConfig) -> tuple[dict[str, Callable[[], Sequence[Example]]], bool]:
    """A ``loader: !function`` task's splits (the hook returns {split: examples}, checked here) and
    whether its examples have images."""
    splits = cfg.loader.resolve()(cfg)
    if not isinstance(splits, dict) or "support" not in splits or set(splits) - set(SPLITS):
        raise UserError(f"task {cfg.name}: loader hook {cfg.loader} returned {type(splits).__name__} with keys "
                        f"{sorted(splits) if isinstance(splits, dict) else '-'}; expected a dict of splits "
                        f"({', '.join(SPLITS)}; support required) to lists of pipeline.tasks.Example")
    for split, examples in splits.items():
        bad = next((e for e in examples if not isinstance(e, Example)), None)
        if bad is not None:
            raise UserError(f"task {cfg.name}: loader hook {cfg.loader} returned a {type(bad).__name__} in split "
                            f"{split!r}; every item must be a pipeline.tasks.Example")
    splits.setdefault("train", splits["support"])
    return {split: (lambda examples=examples: examples) for split, examples in splits.items()}, any(
        e.image is not None for e in splits["support"])


def _loaders(cfg: TaskConfig, path: Path) -> tuple[dict[str, Callable[[], Any]], bool | None]:
    """The task's split loaders and whether its rows have images (None: not known before reading)."""
    if isinstance(cfg.loader, Hook):
        return _hook_loaders(cfg)
    if cfg.loader == "files":
        from pipeline.tasks.user import file_loaders

        return file_loaders(path, cfg)
    if cfg.loader == "words":
        from pipeline.tasks.builtin_text import word_loaders

        return word_loaders(path, cfg), False
    if cfg.loader == "shapes":
        from pipeline.tasks.synthetic import synthetic_loaders

        return synthetic_loaders(cfg), True
    if cfg.loader in ("mme", "seed_bench"):
        from pipeline.tasks.benchmarks import benchmark_loaders

        return benchmark_loaders(cfg), True
    if cfg.source == "hub":
        from pipeline.tasks.hub import hub_loaders

        return hub_loaders(cfg), True
    from pipeline.tasks.official import official_loaders

    return official_loaders(cfg), True


def build_task(path: Path, data: dict[str, Any], **options: Any) -> Task:
    """A ``Task`` from a task YAML's mapping (includes merged); ``options`` override its keys."""
    if options.get("data_root") is None and os.environ.get(DATA_ROOT_ENV):
        options = {**options, "data_root": os.environ[DATA_ROOT_ENV]}
    cfg = load_config(TaskConfig, {"name": path.stem, **data}, **options)
    _check(cfg)
    for hook in (cfg.prompt, cfg.postprocess, cfg.metric):
        if isinstance(hook, Hook):
            hook.resolve()  # a missing or broken hook is refused now, before any model is loaded
    loaders, has_image = _loaders(cfg, path)
    kind = cfg.kind or ("text" if has_image is False else "vqa")
    spec = task_spec(cfg.name, kind, cfg.metric or DEFAULT_METRICS[kind], cfg.prompt or DEFAULT_PROMPTS[kind],
                     cfg.answer, cfg.max_new_tokens, cfg.postprocess)
    task = Task(spec, loaders)
    if cfg.loader == "files":
        for split in loaders:  # cheap (the files are read): lets a missing split's error give every size
            task.split(split)
    return task


def _unknown_task(name: str) -> UserError:
    return UserError(
        f"unknown task '{name}'; valid names: {', '.join(task_names())}; "
        f"a path to a YAML task file (a user task) is also accepted"
    )


def load_task(name_or_yaml: str, **options: Any) -> Task:
    """The task named ``name_or_yaml`` (see ``task_names()``) or defined by a YAML file at that path.

    ``options`` override the task's YAML keys (e.g. ``data_root``, ``source``, ``train_size``,
    ``eval_size``, ``seed``, ``cache_dir``); ``None`` values are ignored. Unknown keys raise
    ``ConfigError``; an unknown name raises ``UserError`` listing the valid names.
    """
    options = {k: v for k, v in options.items() if v is not None}
    path = _task_files().get(name_or_yaml)
    if path is None:
        path = Path(name_or_yaml).expanduser()
        if path.suffix.lower() not in (".yaml", ".yml") and not path.is_file():
            raise _unknown_task(name_or_yaml)
        if not path.is_file():
            raise UserError(f"task file {path} does not exist; valid task names: {', '.join(task_names())}")
    return build_task(path, read_task_yaml(path, TASKS_DIR), **options)
