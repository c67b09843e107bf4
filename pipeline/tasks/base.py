"""What a task is: examples, splits, prompt templates, answer post-processing, metric (or their hooks)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import UserError
from pipeline.metrics import METRIC_NAMES
from pipeline.tasks.hooks import Hook, describe

DEFAULT_METRICS = {"vqa": "vqa_accuracy", "caption": "cider", "text": "exact_match"}
"""Each task kind and its metric when the task names none (the one declaration of kinds)."""
KINDS = tuple(DEFAULT_METRICS)
DEFAULT_PROMPTS = {
    "vqa": "Question:{question} Short answer:",
    "caption": "Caption:",
    "text": "Input:{question} Output:",
}
assert set(DEFAULT_METRICS.values()) <= set(METRIC_NAMES)  # every default is a metric; the benchmarks' answer
# accuracies (mme_accuracy, seed_accuracy) are named by their task YAMLs

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
    meta: what an evaluation reports by, when the source gives it (VQAv2 / OK-VQA official annotations:
    ``{"answer_type": "yes/no" | "number" | "other"}``); None otherwise. Not part of equality.
    """

    id: str
    question: str
    answers: tuple[str, ...]
    image: Any = None
    meta: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TaskSpec:
    """The data that makes a task: prompt templates and generation/metric settings.

    name: registry name (e.g. ``vqav2``).
    kind: one of ``KINDS`` (``vqa`` | ``caption`` | ``text``).
    metric: one of ``METRIC_NAMES``, or a ``Hook`` f(prediction, answers) -> score in [0, 1].
    prompt: query template with ``{question}``, e.g. ``"Question:{question} Short answer:"``, or a
    ``Hook`` f(example) -> the query text.
    answer: answer template with ``{answer}`` appended after the prompt, e.g. ``" {answer}"``.
    max_new_tokens: generation budget (10 for VQA, 20 for captions as the paper's harness).
    postprocess: a ``Hook`` f(generated text) -> prediction, or None (``Task.postprocess``'s rule).
    """

    name: str
    kind: str
    metric: str | Hook
    prompt: str | Hook
    answer: str = " {answer}"
    max_new_tokens: int = 10
    postprocess: Hook | None = None

    @property
    def prompt_id(self) -> str:
        """The prompt as recorded in a store and compared on reuse (a hook: its name and source digest)."""
        return describe(self.prompt)

    @property
    def metric_name(self) -> str:
        """The metric as results name it (a hook: its name and source digest)."""
        return describe(self.metric)

    def query_text(self, example: Example) -> str:
        """The query's prompt text: the template filled with the question, or the prompt hook's text."""
        if isinstance(self.prompt, Hook):
            text = self.prompt.resolve()(example)
            if not isinstance(text, str):
                raise UserError(f"task {self.name}: prompt hook {self.prompt} returned {type(text).__name__} for "
                                f"example {example.id}, expected the prompt text (a str)")
            return text
        return self.prompt.format(question=example.question)


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
        """Turn generated text into the prediction: the task's hook, else the first line, stripped (text
        tasks also drop a final period)."""
        if self.spec.postprocess is not None:
            text = self.spec.postprocess.resolve()(generated)
            if not isinstance(text, str):
                raise UserError(f"task {self.name}: postprocess hook {self.spec.postprocess} returned "
                                f"{type(text).__name__}, expected the prediction (a str)")
            return text
        text = generated.strip().split("\n", 1)[0].strip()
        return text.rstrip(".").strip() if self.spec.kind == "text" else text

    def score(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
        """``pipeline.metrics.score`` of the task's metric, or its metric hook per example (x100, so that
        a hook's [0, 1] reads as a percentage like the built-in metrics)."""
        from pipeline.metrics import score

        if not isinstance(self.spec.metric, Hook):
            return score(self.spec.metric, predictions, answers)
        fn, per_sample = self.spec.metric.resolve(), []
        for i, (prediction, refs) in enumerate(zip(predictions, answers, strict=True)):
            value = fn(prediction, tuple(refs))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= 1:
                raise UserError(f"task {self.name}: metric hook {self.spec.metric} returned {value!r} for "
                                f"prediction {i} ({prediction!r}); it must return a number in [0, 1]")
            per_sample.append(100.0 * value)
        if not per_sample:
            raise ValueError("no predictions to score")
        return {"metric": self.spec.metric_name, "score": sum(per_sample) / len(per_sample), "per_sample": per_sample}
