"""Built-in text tasks for the embedded SmolLM2-135M: ``input -> answer`` word mappings.

Each task is a JSONL file ``pipeline/data/text_tasks/<name>.jsonl`` of ``{"id", "input", "answer"}``
(regenerate with ``python pipeline/data/text_tasks/build.py``). The prompt is ``"{question} ->"`` and
the answer ``" {answer}"``; demonstrations are joined with ``"\\n"`` after the BOS token, which
teacher and student prompts share so that their states line up position by position.
The tasks were chosen because SmolLM2-135M-Instruct fails them zero-shot and solves them with a
few demonstrations (measured with ``bench/icl_text_tasks.py``; numbers at ``DEFAULT_TEXT_TASK``).

Splits are assigned by the sha256 of each example id (sorted, then cut 20% support / 50% train /
30% eval), so they are disjoint, stable across runs and independent of line order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import MappingProxyType

from pipeline.config import UserError
from pipeline.tasks.base import Example, Task, TaskSpec

TEXT_TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "text_tasks"
TEXT_TASK_NAMES = ("antonyms", "number_words", "past_tense", "plurals")
DEFAULT_TEXT_TASK = "plurals"
"""The task with the widest zero-shot -> k-shot gap and the cleanest answers on SmolLM2-135M: greedy
exact match on its 69 eval queries 0% / 10% / 84% / 86% at 0 / 1 / 4 / 8 shots (antonyms 0 / 11 / 39 /
41%, past_tense 0 / 8 / 64 / 81%, number_words 0 / 27 / 65 / 64%; whole eval splits, seed 0):
``python bench/icl_text_tasks.py --shots 0 1 4 8 --n 200``."""
PROMPT = "{question} ->"
ANSWER = " {answer}"
SEPARATOR = "\n"
SPLIT_SHARES = (("eval", 0.30), ("train", 0.50))
"""Shares of each task cut off (in hash order) for eval, then train; the rest (20%) is support.
Training queries are what the student learns from; demonstrations need only a small pool."""


def read_text_task_file(path: Path) -> tuple[Example, ...]:
    """Parse and validate a text-task file; every problem names the file and line."""
    if not path.is_file():
        raise UserError(f"text task file {path} is missing; regenerate it with: python {TEXT_TASKS_DIR / 'build.py'}")
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
def load_text_task_splits(name: str) -> MappingProxyType[str, tuple[Example, ...]]:
    """The three splits of one built-in text task (file order within each split); read-only, cached."""
    if name not in TEXT_TASK_NAMES:
        raise UserError(f"unknown built-in text task '{name}'; valid: {', '.join(TEXT_TASK_NAMES)}")
    return MappingProxyType(split_examples(read_text_task_file(TEXT_TASKS_DIR / f"{name}.jsonl")))


def text_task_spec(name: str) -> TaskSpec:
    return TaskSpec(name=name, kind="text", metric="exact_match", prompt=PROMPT, answer=ANSWER, max_new_tokens=10)


def make_text_task(name: str) -> Task:
    """A ``Task`` for a built-in text task; files are read on first access to a split."""
    if name not in TEXT_TASK_NAMES:
        raise UserError(f"unknown built-in text task '{name}'; valid: {', '.join(TEXT_TASK_NAMES)}")
    loaders = {split: (lambda split=split: load_text_task_splits(name)[split]) for split in ("support", "train", "eval")}
    return Task(text_task_spec(name), loaders)


def builtin_text_tasks() -> dict[str, Callable[[], Task]]:
    """Registry entries: task name -> zero-argument factory."""
    return {name: (lambda name=name: make_text_task(name)) for name in TEXT_TASK_NAMES}
