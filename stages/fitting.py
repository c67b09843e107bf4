"""Stage 2 for the training-free methods (``MethodSpec.fit``: Task Vector, Function Vector): the same
command, store and run directory as a trained student, but one deterministic fit instead of a loop.

The store's queries, with the store's demonstrations, are split in two: the last quarter (at most 64,
at least 1) is held out to choose the layer, the rest are the fitting prompts. A fit killed midway is
fitted again from the start on the next run (it is deterministic: the same tensors); a finished one
(its adapter written, then its checkpoint) is not redone.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from pipeline.adapters import AdapterConfig, AdapterError
from pipeline.config import UserError
from pipeline.forward import generate_batch
from pipeline.methods.base import FitData, FitResult
from pipeline.prompts import build_prompt
from pipeline.rundir import FIT_FILE, Checkpoint
from pipeline.runtime import Loaded, Progress
from pipeline.students import Student, geometry_tuple, load_student_dir
from stages.training import StudentData

HELD_OUT_FRACTION, HELD_OUT_MAX = 0.25, 64
FIT_BATCH = 8
"""Forwards and generations per batch while fitting (at least ``--batch-size``)."""


class _NoState:
    """What a fit's checkpoint holds in place of an optimiser and a scheduler."""

    def state_dict(self) -> dict:
        return {}


def derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2), drawn by rejection."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


class Fitter:
    """The ``Trainer`` of a training-free method: ``train(checkpoint)`` fits (or reloads a finished fit),
    ``summary()`` reports it."""

    def __init__(self, config: Any, loaded: Loaded, data: StudentData, run_dir: Path, task: Any, spec: Any,
                 info: dict):
        self.config, self.loaded, self.data, self.run_dir = config, loaded, data, run_dir
        self.task, self.spec, self.info = task, spec, info
        self.student: Student | None = None
        self.record: dict = {}
        self.total_steps, self.epochs, self.steps_per_epoch = 1, 0, 1
        self.stats: dict[str, Any] = {"resumed_at": 0, "steps": 0, "final_loss": float("nan"),
                                      "epochs_from": "training-free (fitted, no epochs)", "elapsed_s": 0.0}
        self.batch_size = max(config.batch_size, FIT_BATCH)

    def start_message(self) -> str:
        n = len(self.data)
        return (f"fitting {self.spec.name} ({self.spec.summary}) on {n - held_out(n)} queries, layer chosen on "
                f"{held_out(n)} held-out training queries")

    # ---- data ---------------------------------------------------------------------------------
    def fit_data(self, show_progress: bool) -> FitData:
        data, task, loaded = self.data, self.task, self.loaded
        n = len(data)
        if n < 2:
            raise UserError(f"--method {self.spec.name} needs at least 2 training queries (some to fit, one held "
                            f"out to choose the layer); it has {n} (the store's queries, or the first --n-queries of them)")
        dev = held_out(n)
        prompts = [data.icl_prompt(i, data.demos[i]) for i in range(n - dev)]  # the teacher's prompts
        shuffled = [data.icl_prompt(i, data.demos[i], order=derangement(len(data.demos[i]), random.Random(self.config.seed + i)))
                    for i in range(n - dev) if len(data.demos[i]) >= 2]
        queries = task.split("train")
        held = [queries[data.query_index[i]] for i in range(n - dev, n)]
        held_prompts = [build_prompt(loaded.family, loaded.processor, task.spec, q, [], [], None) for q in held]
        order = sorted(range(len(held)), key=lambda i: len(held_prompts[i].encoded))

        def score(_attachment: Any) -> float:
            texts: dict[int, str] = {}
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for i, text in zip(chunk, generate_batch(loaded, [held_prompts[i] for i in chunk],
                                                         task.spec.max_new_tokens, 1), strict=True):
                    texts[i] = text
            predictions = [task.postprocess(texts[i]) for i in range(len(held))]
            return float(task.score(predictions, [list(q.answers) for q in held])["score"])

        return FitData(loaded=loaded, prompts=prompts, shuffled=shuffled, score=score, batch_size=self.batch_size,
                       progress=lambda total, desc: Progress(total, desc, show_progress), held_out=dev)

    # ---- the fit ------------------------------------------------------------------------------
    def train(self, checkpoint: Checkpoint, show_progress: bool = True) -> None:
        if checkpoint.load() is not None:
            try:
                self.student = load_student_dir(self.run_dir, self.loaded.model, self.loaded.geometry,
                                                self.loaded.source.alias)
                self.record = json.loads((self.run_dir / FIT_FILE).read_text())
                self.stats.update(resumed_at=1, steps=1)
                return
            except (AdapterError, OSError, ValueError):
                if self.student is not None:
                    self.student.detach()
                    self.student = None  # a finished fit whose files were damaged: fitted again
        start = time.perf_counter()
        result: FitResult = self.spec.fit(self.student_config({}), self.fit_data(show_progress))
        self.student = self.attach(result)
        self.record = {**result.record, "fit_s": time.perf_counter() - start}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.student.save(self.run_dir)
        (self.run_dir / FIT_FILE).write_text(json.dumps(self.record, indent=2))
        checkpoint.save(self.student.tensors(), _NoState(), _NoState(), 1)  # last: a checkpoint means done
        self.stats.update(steps=1, elapsed_s=time.perf_counter() - start)

    def student_config(self, settings: dict) -> AdapterConfig:
        layers, heads, head_dim, hidden = geometry_tuple(self.loaded.geometry)
        return AdapterConfig(method=self.spec.name, num_layers=layers, num_heads=heads, head_dim=head_dim,
                             hidden_size=hidden, settings=settings or self.spec.settings(None, "mimic")["settings"],
                             **self.info)

    def attach(self, result: FitResult) -> Student:
        config = self.student_config(result.settings)
        student = Student(config, self.loaded.model, self.spec.attach(config, self.loaded.model))
        student.load_tensors({k: v.to(self.loaded.device) for k, v in result.tensors.items()})
        return student.eval()

    def done_message(self, summary: dict) -> str:
        if self.stats["resumed_at"]:
            return f"{self.run_dir} is already fitted; nothing to do (pass --overwrite to fit it again)"
        sweep, best = self.record["sweep"], self.record["layer"]
        return (f"wrote {self.run_dir}: {self.spec.name} at layer {best} (held-out score {sweep[best]:.2f} "
                f"of {len(sweep)} layers tried) in {summary['elapsed_s']:.1f} s; the sweep is in {FIT_FILE}")

    def summary(self) -> dict:
        return {"steps": 0, "final_loss": None, "training_queries": len(self.data), "samples_per_s": None, "elapsed_s": self.stats["elapsed_s"],
                "align": "none", "epochs": 0, "steps_per_epoch": 0, "epochs_from": self.stats["epochs_from"],
                "fit": {k: v for k, v in self.record.items() if k not in ("cie", "state_norms")}}


def held_out(n: int) -> int:
    """How many of ``n`` training queries choose the layer: a quarter, at most 64, at least 1."""
    return min(HELD_OUT_MAX, max(1, int(n * HELD_OUT_FRACTION)))

