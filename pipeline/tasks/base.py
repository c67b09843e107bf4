"""What a task is: examples, splits, prompt templates, answer post-processing, metric name."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import UserError

TaskKind = Literal["vqa", "caption", "text"]
MetricName = Literal["vqa_accuracy", "cider", "exact_match"]

SPLITS = ("support", "train", "eval")
"""support: the pool demonstrations are drawn from; train: queries for teacher-cache / train-student;
eval: held-out queries for evaluate."""


@dataclass(frozen=True)
class Example:
    """One sample of a task.

    id: unique within the task (all splits), stable across runs (stored in the teacher store).
    question: the input text (a VQA question, a text task's input; "" for captioning).
    answers: every reference answer (VQAv2: the ten human answers; captions: all references).
    image: a path to an image file, a decoded ``PIL.Image.Image`` (HF datasets), or None (text only).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    image: Any = None


@dataclass(frozen=True)
class TaskSpec:
    """The data that makes a task: prompt templates and generation/metric settings.

    name: registry name (e.g. ``vqav2``).
    kind: ``vqa`` | ``caption`` | ``text``.
    metric: ``vqa_accuracy`` | ``cider`` | ``exact_match``.
    prompt: query template with ``{question}``, e.g. ``"Question:{question} Short answer:"``.
    answer: answer template with ``{answer}`` appended after the prompt, e.g. ``" {answer}"``.
    max_new_tokens: generation budget (10 for VQA, 20 for captions as the paper's harness).
    """

    name: str
    kind: TaskKind
    metric: MetricName
    prompt: str
    answer: str = " {answer}"
    max_new_tokens: int = 10


class SplitError(UserError, ValueError):
    """A split asked for that the task does not have (a ``UserError``; a ``ValueError`` as before)."""


def most_frequent_answer(answers: tuple[str, ...]) -> str:
    """The answer used for demonstrations and teacher forcing: the most frequent one (first on ties)."""
    if not answers:
        raise ValueError("example has no answers; a demonstration or training query needs at least one")
    counts = Counter(a.strip() for a in answers)
    best = max(counts.values())
    return next(a.strip() for a in answers if counts[a.strip()] == best)


class Task:
    """A task: its spec plus lazily loaded splits (``support``, ``train``, ``eval``).

    ``loaders`` maps a split name to a zero-argument callable returning a sequence of ``Example``;
    each is called at most once.
    """

    def __init__(self, spec: TaskSpec, loaders: dict[str, Any]):
        unknown = set(loaders) - set(SPLITS)
        if unknown:
            raise ValueError(f"task {spec.name}: unknown split(s) {sorted(unknown)}; valid: {', '.join(SPLITS)}")
        self.spec = spec
        self._loaders = dict(loaders)
        self._cache: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def split(self, name: str) -> Any:
        """The examples of one split (a sequence of ``Example``)."""
        if name not in self._loaders:
            have = ", ".join(
                f"{split} ({len(self._cache[split])} examples)" if split in self._cache else split
                for split in SPLITS
                if split in self._loaders
            )
            raise SplitError(
                f"task {self.spec.name} has no {name} split; it has: {have}; give the task a {name} split "
                f"(for a user task: a '{name}' file under `files:`, or {name} rows) or use another split"
            )
        if name not in self._cache:
            self._cache[name] = self._loaders[name]()
        return self._cache[name]

    def demo_answer(self, example: Example) -> str:
        """The answer shown in a demonstration or teacher-forced on a training query."""
        return most_frequent_answer(example.answers)

    def postprocess(self, generated: str) -> str:
        """Turn generated text into the prediction: first line, stripped (captions keep case)."""
        text = generated.strip().split("\n", 1)[0].strip()
        return text if self.spec.kind == "caption" else text.rstrip(".").strip() if self.spec.kind == "text" else text
