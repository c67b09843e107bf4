"""``loader: words``: the built-in text tasks for the embedded SmolLM2-135M (``input -> answer`` word mappings).

Each task is a YAML file (``configs/tasks/plurals.yaml`` ...) that includes the shared template
``configs/tasks/_words.yaml`` (prompt ``"{question} ->"``, answer ``" {answer}"``, exact match) and names
its JSONL file of ``{"id", "input", "answer"}`` under ``configs/tasks/words/`` (regenerate them with
``python pipeline/configs/tasks/words/build.py``). Demonstrations are joined with ``"\\n"`` after the BOS
token, which teacher and student prompts share so that their states line up position by position.
The tasks were chosen because SmolLM2-135M-Instruct fails them zero-shot and solves them with a
few demonstrations (measured with ``bench/icl_text_tasks.py``; numbers at ``DEFAULT_TEXT_TASK``).

Splits are assigned by the sha256 of each example id (sorted, then cut 20% support / 50% train /
30% eval), so they are disjoint, stable across runs and independent of line order; ``train_size``,
``eval_size`` and ``support_size`` then take seeded subsets, as for every task.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.config import UserError
from pipeline.tasks.base import Example
from pipeline.tasks.official import seeded_order

TEXT_TASK_NAMES = ("antonyms", "number_words", "past_tense", "plurals")
DEFAULT_TEXT_TASK = "plurals"
"""The task with the widest zero-shot -> k-shot gap and the cleanest answers on SmolLM2-135M: greedy
exact match on its 69 eval queries 0% / 10% / 84% / 86% at 0 / 1 / 4 / 8 shots (antonyms 0 / 11 / 39 /
41%, past_tense 0 / 8 / 64 / 81%, number_words 0 / 27 / 65 / 64%; whole eval splits, seed 0):
``python bench/icl_text_tasks.py --shots 0 1 4 8 --n 200``."""
SPLIT_SHARES = (("eval", 0.30), ("train", 0.50))
"""Shares of each task cut off (in hash order) for eval, then train; the rest (20%) is support.
Training queries are what the student learns from; demonstrations need only a small pool."""


def read_text_task_file(path: Path) -> tuple[Example, ...]:
    """Parse and validate a text-task file; every problem names the file and line."""
    if not path.is_file():
        raise UserError(f"text task file {path} is missing; give the path of a JSONL file of "
                        '{"id", "input", "answer"} rows (relative to the task YAML) under `file:`')
    examples: list[Example] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg}); expected {{\"id\", \"input\", \"answer\"}}") from err
        bad = [k for k in ("id", "input", "answer") if not isinstance(row.get(k), str) or not row[k].strip()]
        if bad:
            raise UserError(f"{where}: missing or empty field(s) {', '.join(bad)}; got {row!r}")
        if row["id"] in seen:
            raise UserError(f"{where}: duplicate id {row['id']!r}; ids must be unique within a task")
        seen.add(row["id"])
        examples.append(Example(id=row["id"], question=row["input"].strip(), answers=(row["answer"].strip(),)))
    return tuple(examples)


def _id_order(example: Example) -> str:
    return hashlib.sha256(example.id.encode()).hexdigest()


def split_examples(examples: tuple[Example, ...]) -> dict[str, tuple[Example, ...]]:
    """Cut examples into disjoint ``support`` / ``train`` / ``eval`` splits by hash of id."""
    position = {example.id: i for i, example in enumerate(examples)}
    ordered = sorted(examples, key=_id_order)
    cuts: dict[str, list[Example]] = {}
    start = 0
    for name, share in SPLIT_SHARES:
        count = round(share * len(ordered))
        cuts[name] = ordered[start : start + count]
        start += count
    cuts["support"] = ordered[start:]
    return {name: tuple(sorted(part, key=lambda e: position[e.id])) for name, part in cuts.items()}


@cache
def _splits(path: Path, stamp: int) -> dict[str, tuple[Example, ...]]:
    return split_examples(read_text_task_file(path))


def word_loaders(task_yaml: Path, cfg: Any) -> dict[str, Callable[[], list[Example] | tuple[Example, ...]]]:
    """The split loaders of a ``loader: words`` task: ``cfg.file`` (relative to ``task_yaml``) cut by id
    hash, then the seeded subsets ``cfg.train_size`` / ``eval_size`` / ``support_size``; read on first use."""
    if not cfg.file:
        raise UserError(f"task {cfg.name}: a `loader: words` task needs `file:` (its JSONL of "
                        '{"id", "input", "answer"} rows, relative to the task YAML)')
    path = (task_yaml.parent / cfg.file).expanduser()
    sizes = {"support": cfg.support_size, "train": cfg.train_size, "eval": cfg.eval_size}

    def load(split: str) -> list[Example] | tuple[Example, ...]:
        examples = _splits(path.resolve(), path.stat().st_mtime_ns if path.is_file() else 0)[split]
        size = sizes[split]
        if size is None:
            return examples
        if size > len(examples):
            raise UserError(f"task {cfg.name}: {split}_size asks for {size} examples but the {split} split has "
                            f"{len(examples)}; pass {split}_size <= {len(examples)}")
        return [examples[i] for i in seeded_order(len(examples), cfg.seed, split)[:size]]

    return {split: (lambda split=split: load(split)) for split in sizes}
