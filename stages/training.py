"""Stage 2's data: student prompts with the cached teacher states (or, online, teacher prompts)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import UserError
from pipeline.forward import pad_states, pin_batch, without_images
from pipeline.prompts import DemoCache, build_prompt, check_alignment
from pipeline.retrieval import model_index
from pipeline.runtime import Loaded
from pipeline.store import open_store
from pipeline.tasks.sampling import sample_demonstrations


def steps_per_epoch(n_samples: int, config: Any, world: int = 1) -> int:
    """Optimiser steps of one epoch: ``n_samples`` split over ``world`` ranks, micro-batches of
    ``batch_size``, ``grad_accum`` micro-batches per step."""
    return math.ceil(math.ceil(math.ceil(n_samples / world) / config.batch_size) / config.grad_accum)


ONLINE_QUERIES = 1000
"""Training queries of ``--online`` without a store when ``--n-queries`` is not given."""


@dataclass
class Item:
    """One training sample: the student prompt and, offline, the cached teacher states."""

    index: int
    prompt: Any
    hs: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor] | None = None


class StudentData(torch.utils.data.Dataset):
    """Student inputs rebuilt from the task's query (+ image); teacher states from the store."""

    def __init__(self, config: Any, task: Any, loaded: Loaded, attrs: dict, store_path: str | None):
        self.config, self.task, self.family, self.processor = config, task, loaded.family, loaded.processor
        self.store_path = store_path
        self.store_attrs = attrs  # the teacher store's attributes ({} online)
        self._store = None
        self.online = config.online
        self.demo_cache = DemoCache()  # ICL prompts (--online, fits) are built in the main process; workers get it empty
        self.demo_strategy = demo_choice(config, attrs if store_path else {})
        self.index = None  # --online --demos similar without a store: the support split's pipeline.retrieval index
        if store_path:
            store = open_store(store_path)
            keep = slice(None, config.n_queries)  # the first N of the store (``--n-queries``), else all
            self.query_index = [int(q) for q in store.read_array("query_ids")][keep]
            self.demos = [[int(d) for d in row if d >= 0] for row in store.read_array("icd_ids")][keep]
            self.demo_seed, self.shots = int(attrs["demo_seed"]), int(attrs["shots"])
            self.layer_target = attrs["layer_target"]
        else:
            queries = task.split("train")
            self.query_index = list(range(min(config.n_queries or ONLINE_QUERIES, len(queries))))
            self.demo_seed, self.shots, self.layer_target = config.seed, config.shots or 0, config.layer_target
            if self.demo_strategy == "similar" and self.shots:  # built before any student is attached
                self.index = model_index(loaded, task)
                self.index.add_queries([queries[i] for i in self.query_index])
            self.demos = [self.sample_demos(i, 0) for i in range(len(self.query_index))]

    def __len__(self) -> int:
        return len(self.query_index)

    def sample_demos(self, i: int, epoch: int) -> list[int]:
        query = self.task.split("train")[self.query_index[i]]
        if self.demo_strategy == "similar" and epoch > 0:  # the nearest do not change between epochs
            return list(self.demos[i])
        seed = self.demo_seed + (epoch if self.config.resample_demos else 0)
        return (list(sample_demonstrations(self.task.split("support"), query, self.shots, seed, self.demo_strategy,
                                           self.index)) if self.shots else [])

    def __getitem__(self, i: int) -> Item:
        query = self.task.split("train")[self.query_index[i]]
        answer = self.task.demo_answer(query)
        prompt = build_prompt(self.family, self.processor, self.task.spec, query, [], [], answer)
        if self.online:
            return Item(i, prompt)
        if self._store is None:  # opened lazily, inside the DataLoader worker
            self._store = open_store(self.store_path)
        record = self._store.read(i)
        if prompt.encoded.input_ids[prompt.span_start :] != [int(t) for t in record.token_ids]:
            raise UserError(
                f"sample {i} (query {query.id}): the student's query+answer tokens differ from the store's; "
                "the task data or tokenizer changed since teacher-cache — re-run it"
            )
        topk = (record.topk_values, record.topk_indices) if record.topk_values is not None else None
        return Item(i, prompt, record.hs, topk)

    def icl_prompt(self, i: int, demo_ids: Sequence[int], answer_offset: int | None = None,
                   order: Sequence[int] | None = None) -> Any:
        """The k-shot prompt of training sample ``i`` with the support examples ``demo_ids`` as demonstrations,
        its answer teacher-forced. ``order``: demonstration j gets the answer of demonstration ``order[j]``
        (Function Vector's shuffled-label prompts). ``answer_offset``: see ``build_prompt``."""
        query, support = self.task.split("train")[self.query_index[i]], self.task.split("support")
        demos = [support[j] for j in demo_ids]
        answers = [self.task.demo_answer(d) for d in demos]
        if order is not None:
            answers = [answers[j] for j in order]
        return build_prompt(self.family, self.processor, self.task.spec, query, demos, answers,
                            self.task.demo_answer(query), self.demo_cache, answer_offset=answer_offset)

    def teacher_prompts(self, items: list[Item], epoch: int) -> list[Any]:
        """--online: the k-shot teacher prompts of a batch (demonstrations per epoch)."""
        prompts = []
        for it in items:
            query = self.task.split("train")[self.query_index[it.index]]
            demo_ids = self.demos[it.index] if epoch == 0 or not self.config.resample_demos else self.sample_demos(it.index, epoch)
            student = it.prompt  # same query and answer: its answer offset spares encoding the prompt alone
            teacher = self.icl_prompt(it.index, demo_ids, answer_offset=student.answer_start - student.span_start)
            try:
                check_alignment(teacher, student, query.id)
            except ValueError as err:
                raise UserError(str(err)) from err
            prompts.append(teacher)
        return prompts


def demo_choice(config: Any, attrs: dict) -> str:
    """The demonstrations of ``--online``'s teacher: the store's (``demo_strategy``), which ``--demos`` may
    repeat but not contradict; without a store ``--demos`` (default random)."""
    asked = getattr(config, "demos", None)
    stored = attrs.get("demo_strategy", "random") if attrs else None
    if stored is not None and asked is not None and asked != stored:
        raise UserError(f"--demos {asked} differs from the store's demonstrations ({stored}): a store fixes them; "
                        f"drop --demos, or cache a store with `pipeline teacher-cache --demos {asked}`")
    return stored or asked or "random"


class MicroBatch(list):
    """A micro-batch of ``Item`` as the training loader hands it over, with its tensors made where the items
    were read (a DataLoader worker): ``batch``, the student prompts collated (right padding, as
    ``forward_states`` collates them); offline, ``teacher``, the stored states zero-padded to the span width
    (B, S, L, D). The items then come without their states and their prompts without images
    (``without_images``): one copy of each crosses processes.

    Why in the worker: collated in the main process, a teacher batch took 0.62-0.71 s of its thread on the H200
    host while the forward ran (docs/benchmarks.md, third round); the student's step pays the same kind of
    host work on the device's critical path. ``pin_memory`` (the DataLoader's ``pin_memory=True``) page-locks
    the tensors so their copies to the device are asynchronous."""

    batch: dict | None = None
    teacher: torch.Tensor | None = None

    def pin_memory(self) -> MicroBatch:
        if self.batch is not None:
            self.batch = pin_batch(self.batch, True)
        if self.teacher is not None:
            self.teacher = self.teacher.pin_memory()
        return self


class StudentCollate:
    """The training loader's ``collate_fn``: a ``MicroBatch`` of the items with their collated tensors."""

    def __init__(self, family: Any, processor: Any):
        self.family, self.processor = family, processor

    def __call__(self, items: list[Item]) -> MicroBatch:
        out = MicroBatch(items)
        out.batch = self.family.collate([it.prompt.encoded for it in items], self.processor, "right")
        if items[0].hs is not None:
            width = max(len(it.prompt.encoded) - it.prompt.span_start for it in items)
            out.teacher = pad_states([it.hs for it in items], width)
        out[:] = [dataclasses.replace(it, prompt=without_images(it.prompt), hs=None) for it in items]
        return out
