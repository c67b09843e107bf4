"""The parts of `pipeline evaluate` that touch the model: prompts, batched beam-search generation
with resumable per-sample records, and the per-layer L2 distance to the cached teacher states.

Generation follows the paper's harness (DESIGN §6): left-padded batches, ``num_beams`` beams,
``max_new_tokens`` from the task, stop at a newline or the family's next-round markers; only the new
tokens are decoded, then ``task.postprocess`` makes the prediction.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from pipeline.adapters import ADAPTER_WEIGHTS, AdapterError
from pipeline.capture import StateCapture, span_positions
from pipeline.config import UserError, config_to_dict
from pipeline.families.base import pad_token_id, tokenizer_of
from pipeline.metrics import JavaNotFoundError, score
from pipeline.plots import plot_layer_distances
from pipeline.prompts import DemoCache, Prompt, build_prompt
from pipeline.store import open_store
from pipeline.students import load_student_dir
from pipeline.tasks.sampling import sample_demonstrations
from stages.common import Loaded, Progress
from stages.teacher_cache import to_device
from stages.training import pad_states

PARTIAL_SUFFIX = ".partial.jsonl"
RESULT_KIND = "mimic-evaluation"
"""``kind`` of a results JSON written by `pipeline evaluate`."""
TABLE_FILE = "table.md"


@dataclass
class Query:
    """One evaluation query: the example and its generation prompt (k demonstrations or none)."""

    example: Any
    prompt: Prompt
    demo_ids: list[str]

    @property
    def key(self) -> str:
        return str(self.example.id)

    @property
    def prompt_sha(self) -> str:
        """Identity of the prompt's token ids: a saved record is reused only for the same prompt."""
        return hashlib.sha256(json.dumps(self.prompt.input_ids).encode()).hexdigest()[:16]


def build_queries(task: Any, loaded: Loaded, examples: Sequence[Any], shots: int, seed: int) -> list[Query]:
    """Generation prompts: BOS + ``shots`` demonstrations (stage 1's sampler and seed) + the query."""
    support = task.split("support") if shots else []
    demo_cache = DemoCache()
    queries = []
    for example in examples:
        demos = [support[j] for j in sample_demonstrations(support, example, shots, seed)] if shots else []
        prompt = build_prompt(loaded.family, loaded.processor, task.spec, example, demos,
                              [task.demo_answer(d) for d in demos], None, demo_cache)
        queries.append(Query(example, prompt, [str(d.id) for d in demos]))
    return queries


def model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def generate_batch(loaded: Loaded, prompts: Sequence[Prompt], max_new_tokens: int, num_beams: int) -> list[str]:
    """Raw generated text (new tokens only) per prompt; left padding, beams, stop strings."""
    batch = loaded.family.collate([p.encoded for p in prompts], loaded.processor, "left")
    batch.pop("position_ids", None)  # generate derives the same cumsum(mask) - 1 and extends it per step
    batch = to_device(batch, loaded.device, model_dtype(loaded.model))
    tokenizer = tokenizer_of(loaded.processor)
    with torch.inference_mode():
        out = loaded.model.generate(
            **batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
            num_return_sequences=1, stop_strings=list(loaded.family.stop_strings), tokenizer=tokenizer,
            pad_token_id=pad_token_id(loaded.processor),
        )
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


class RecordLog:
    """Per-sample records of one mode: ``<name>.partial.jsonl`` while generating, ``<name>.json`` after.

    The first JSONL line is a header with the mode's fingerprint (model, beams, budget, adapter);
    a record is reused when the fingerprint and its prompt's sha match, so a re-run (or a run with
    more queries) generates only what is missing.
    """

    def __init__(self, directory: Path, name: str, fingerprint: dict):
        self.partial = directory / f"{name}{PARTIAL_SUFFIX}"
        self.final = directory / f"{name}.json"
        self.fingerprint = fingerprint

    def previous(self) -> dict | None:
        """The saved ``<name>.json`` if it was made with the same fingerprint."""
        if not self.final.is_file():
            return None
        data = json.loads(self.final.read_text())
        return data if data.get("fingerprint") == self.fingerprint else None

    def done(self) -> dict[str, dict]:
        """Reusable records by example id, from the final JSON and the partial file."""
        found = {r["id"]: r for r in (self.previous() or {}).get("records", [])}
        lines = self.partial.read_text().splitlines() if self.partial.is_file() else []
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill: that sample is generated again
                continue
        if rows and rows[0].get("fingerprint") == self.fingerprint:
            found.update({r["id"]: r for r in rows[1:] if "id" in r})
        return found

    @contextmanager
    def appender(self, keep: Sequence[dict]) -> Iterator[Any]:
        """Rewrite the partial file (atomically) with the header and ``keep``; yield ``append(record)``."""
        tmp = self.partial.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"fingerprint": self.fingerprint}, *keep]))
        tmp.replace(self.partial)
        with self.partial.open("a") as f:

            def append(record: dict) -> None:
                f.write(json.dumps(record) + "\n")
                f.flush()

            yield append

    def finish(self, payload: dict) -> Path:
        tmp = self.final.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(self.final)
        self.partial.unlink(missing_ok=True)
        return self.final


def generate_records(
    loaded: Loaded, task: Any, queries: list[Query], log: RecordLog, batch_size: int, num_beams: int,
    desc: str, show_progress: bool, warm_up: bool = False,
) -> tuple[list[dict], int]:
    """Records (without scores) for every query, in query order, and how many were generated now.

    Only missing records are generated (shortest prompts first). latency_ms: the batch's wall time
    (generate + decode) / batch size; ``warm_up`` runs one untimed short generation first, so that
    one-off start-up costs (kernels, stop-string tables) do not land on the first mode's latency.
    """
    done = log.done()
    keep = {q.key: done[q.key] for q in queries if q.key in done and done[q.key].get("prompt_sha") == q.prompt_sha}
    todo = sorted((q for q in queries if q.key not in keep), key=lambda q: len(q.prompt.encoded))
    if todo and warm_up:
        generate_batch(loaded, [todo[0].prompt], 2, num_beams)
    progress = Progress(len(todo), desc, enabled=show_progress)
    with log.appender(list(keep.values())) as append:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            sync(loaded.device)
            t0 = time.perf_counter()
            raw = generate_batch(loaded, [q.prompt for q in chunk], task.spec.max_new_tokens, num_beams)
            sync(loaded.device)
            ms = 1000 * (time.perf_counter() - t0) / len(chunk)
            for q, text in zip(chunk, raw, strict=True):
                record = {
                    "id": q.key, "question": q.example.question, "prediction": task.postprocess(text),
                    "generation": text, "answers": list(q.example.answers), "latency_ms": ms,
                    "prompt_tokens": len(q.prompt.encoded), "demo_ids": q.demo_ids, "prompt_sha": q.prompt_sha,
                }
                keep[q.key] = record
                append(record)
            progress.update(len(chunk), sum(len(q.prompt.encoded) for q in chunk))
    progress.close()
    return [keep[q.key] for q in queries], len(todo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def student_prompt(loaded: Loaded, task: Any, record: Any, where: str) -> Prompt:
    """BOS + query + teacher-forced answer of a cached sample; its tokens must be the store's."""
    query = task.split("train")[record.query_id]
    prompt = build_prompt(loaded.family, loaded.processor, task.spec, query, [], [], task.demo_answer(query))
    if prompt.input_ids[prompt.span_start :] != [int(t) for t in record.token_ids]:
        raise UserError(f"{where} (query {query.id}): the student tokens differ from the store's; the task data "
                        "or tokenizer changed since teacher-cache")
    return prompt


def layer_distances(
    loaded: Loaded, task: Any, student: Any, store_path: str | Path, n_queries: int, batch_size: int
) -> dict:
    """Mean L2 distance per layer to the cached k-shot teacher states (the paper's L2 figure).

    For the first ``n_queries`` cached training queries: student prompt = BOS + query + teacher-
    forced answer (no demonstrations), right padding, states of the store's layer target at the
    aligned positions. Returns ``{"zero-shot": [L], "student": [L]}`` (mean over every aligned token),
    plus ``"mean"`` over layers per curve, ``"queries"`` and ``"layer_target"``.
    """
    store = open_store(store_path)
    store.validate()
    attrs = store.attrs
    if attrs.get("task") != task.name:
        raise UserError(f"the store {store_path} holds task {attrs.get('task')!r}, not {task.name!r}")
    capture = StateCapture(loaded.model, attrs["layer_target"])
    n = min(n_queries, len(store))
    sums = {"zero-shot": 0.0, "student": 0.0}
    tokens = 0
    for start in range(0, n, batch_size):
        records = [store.read(i) for i in range(start, min(n, start + batch_size))]
        prompts = [student_prompt(loaded, task, r, f"sample {i} of {store_path}") for i, r in enumerate(records, start)]
        lengths = [len(p.encoded) for p in prompts]
        starts = [p.span_start for p in prompts]
        width = max(a - b for a, b in zip(lengths, starts, strict=True))
        batch = to_device(loaded.family.collate([p.encoded for p in prompts], loaded.processor, "right"),
                          loaded.device, model_dtype(loaded.model))
        pos, mask = span_positions(lengths, starts, width, loaded.device)
        teacher = pad_states([r.hs.to(loaded.device, torch.float32) for r in records], width)  # (B, S, L, D)
        for name, context in (("zero-shot", student.disabled()), ("student", nullcontext())):
            with context, capture, torch.inference_mode():
                capture.positions = pos
                loaded.model(**batch, use_cache=False)
                states = capture.stacked().float()  # (B, S, L, D)
            dist = (states - teacher).norm(dim=-1) * mask[..., None]  # (B, S, L)
            sums[name] = sums[name] + dist.sum((0, 1)).cpu()
        tokens += int(mask.sum())
    curves = {name: (s / max(tokens, 1)).tolist() for name, s in sums.items()}
    return {**curves, "mean": {k: sum(v) / len(v) for k, v in curves.items()}, "queries": n,
            "layer_target": attrs["layer_target"], "store": str(store_path)}


class Evaluation:
    """One `pipeline evaluate` call: the task, the model, the queries, and where results go."""

    def __init__(self, config: Any, task: Any, loaded: Loaded, examples: list[Any], shots: int, show_progress: bool):
        self.config, self.task, self.loaded, self.shots = config, task, loaded, shots
        self.examples, self.show_progress = examples, show_progress
        self.out_dir = Path(config.results_dir) / task.name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model_name = loaded.source.alias
        self.warm = False

    def fingerprint(self, mode: str, extra: dict | None = None) -> dict:
        """What must match for saved records to be reused (prompts are matched per record)."""
        return {"task": self.task.name, "mode": mode, "model_fingerprint": self.loaded.source.fingerprint,
                "num_beams": self.config.num_beams, "max_new_tokens": self.task.spec.max_new_tokens,
                "dtype": str(next(self.loaded.model.parameters()).dtype), **(extra or {})}

    def mode(self, name: str, mode: str, shots: int, fingerprint: dict, extra: dict | None = None) -> dict:
        """Generate (missing records only), score, write ``<name>.json``; returns the saved payload."""
        log = RecordLog(self.out_dir, name, fingerprint)
        queries = build_queries(self.task, self.loaded, self.examples, shots, self.config.seed)
        records, generated = generate_records(self.loaded, self.task, queries, log, self.config.batch_size,
                                              self.config.num_beams, f"evaluate {name}", self.show_progress,
                                              warm_up=not self.warm)
        self.warm = self.warm or generated > 0
        metric = self.task.spec.metric
        try:
            scored = score(metric, [r["prediction"] for r in records], [r["answers"] for r in records])
        except (JavaNotFoundError, ValueError) as err:
            raise UserError(f"{metric} failed for {name}: {err} (the predictions are kept in {log.partial}; "
                            "re-run to score them without generating again)") from err
        for record, value in zip(records, scored["per_sample"], strict=True):
            record["score"] = value
        n = len(records)
        payload = {
            "kind": RESULT_KIND, "task": self.task.name, "name": name, "mode": mode, "shots": shots,
            "split": self.config.split, "model": self.model_name, "metric": metric, "score": scored["score"], "n": n,
            "mean_latency_ms": sum(r["latency_ms"] for r in records) / n,
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in records) / n,
            "generation": {"num_beams": self.config.num_beams, "max_new_tokens": self.task.spec.max_new_tokens,
                           "stop_strings": list(self.loaded.family.stop_strings), "padding": "left"},
            "config": {**config_to_dict(self.config), "task": self.task.name, "model": self.model_name,
                       "shots": self.shots},
            "fingerprint": fingerprint, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}), "records": records,
        }
        log.finish(payload)
        return payload

    def student(self, run: Any) -> dict:
        """A run's student with zero demonstrations, then (if asked and possible) the L2 analysis."""
        loaded = self.loaded
        if run.adapter.base_fingerprint and run.adapter.base_fingerprint != loaded.source.fingerprint:
            print(f"warning: {run.name} was trained on {run.adapter.base_model} ({run.adapter.base_fingerprint}), "
                  f"evaluating on {self.model_name} ({loaded.source.fingerprint})")
        try:
            student = load_student_dir(run.path, loaded.model, loaded.geometry, self.model_name)
        except AdapterError as err:
            raise UserError(str(err)) from err
        adapter_sha = hashlib.sha256((run.path / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:16]
        fingerprint = self.fingerprint("student", {"adapter_sha256": adapter_sha})
        try:
            previous = RecordLog(self.out_dir, run.name, fingerprint).previous()
            extra = {"run": str(run.path), "adapter": {"method": run.adapter.method, "variant": run.adapter.variant},
                     "l2": self.l2(run, student, (previous or {}).get("l2"))}
            return self.mode(run.name, "student", 0, fingerprint, extra)
        finally:
            student.detach()

    def l2(self, run: Any, student: Any, previous: dict | None) -> dict:
        """Per-layer L2 distances (and ``l2_<run>.png``), or why they were skipped (also printed)."""
        if not self.config.l2:
            return {"skipped": "--l2 false"}
        if run.store is None or not run.store.exists():
            return self.skip_l2(run, f"the run's teacher store {run.store} does not exist")
        png = self.out_dir / f"l2_{run.name}.png"
        if previous and previous.get("requested") == self.config.l2_queries and png.is_file():
            return previous  # same adapter and model (the fingerprint matched): same distances
        try:
            result = layer_distances(self.loaded, self.task, student, run.store, self.config.l2_queries,
                                     self.config.batch_size)
        except UserError as err:
            return self.skip_l2(run, str(err))
        plot_layer_distances({"zero-shot": result["zero-shot"], run.name: result["student"]}, png,
                             f"{self.task.name}: L2 to {run.adapter.store_fingerprint.get('shots', '?')}-shot ICL states")
        return {**result, "png": str(png), "requested": self.config.l2_queries}

    def skip_l2(self, run: Any, reason: str) -> dict:
        if self.show_progress:
            print(f"note: no L2 analysis for {run.name}: {reason}")
        return {"skipped": reason}
