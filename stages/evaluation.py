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
from pathlib import Path
from typing import Any

import torch

from pipeline.capture import StateCapture, span_positions
from pipeline.config import UserError
from pipeline.families.base import pad_token_id, tokenizer_of
from pipeline.prompts import Prompt, build_prompt
from pipeline.store import open_store
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
    queries = []
    for example in examples:
        demos = [support[j] for j in sample_demonstrations(support, example, shots, seed)] if shots else []
        prompt = build_prompt(loaded.family, loaded.processor, task.spec, example, demos,
                              [task.demo_answer(d) for d in demos], None)
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

    def done(self) -> dict[str, dict]:
        """Reusable records by example id, from the final JSON and the partial file."""
        found: dict[str, dict] = {}
        if self.final.is_file():
            data = json.loads(self.final.read_text())
            if data.get("fingerprint") == self.fingerprint:
                found.update({r["id"]: r for r in data.get("records", [])})
        if self.partial.is_file():
            lines = [ln for ln in self.partial.read_text().splitlines() if ln.strip()]
            if lines and json.loads(lines[0]).get("fingerprint") == self.fingerprint:
                for line in lines[1:]:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line torn by a kill: generate that sample again
                        continue
                    found[record["id"]] = record
        return found

    @contextmanager
    def appender(self, keep: Sequence[dict]) -> Iterator[Any]:
        """Rewrite the partial file with the header and ``keep``; yield ``append(record)``."""
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with self.partial.open("w") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            for record in keep:
                f.write(json.dumps(record) + "\n")
            f.flush()

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
    desc: str, show_progress: bool,
) -> list[dict]:
    """Records (without scores) for every query, in query order; only missing ones are generated.

    latency_ms: the batch's wall time (generate + decode) / batch size.
    """
    done = log.done()
    keep = {q.key: done[q.key] for q in queries if q.key in done and done[q.key].get("prompt_sha") == q.prompt_sha}
    todo = sorted((q for q in queries if q.key not in keep), key=lambda q: len(q.prompt.encoded))
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
    return [keep[q.key] for q in queries]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    train = task.split("train")
    capture = StateCapture(loaded.model, attrs["layer_target"])
    n = min(n_queries, len(store))
    sums = {"zero-shot": 0.0, "student": 0.0}
    tokens = 0
    for start in range(0, n, batch_size):
        records = [store.read(i) for i in range(start, min(n, start + batch_size))]
        prompts = []
        for i, record in enumerate(records, start):
            query = train[record.query_id]
            prompt = build_prompt(loaded.family, loaded.processor, task.spec, query, [], [], task.demo_answer(query))
            if prompt.input_ids[prompt.span_start :] != [int(t) for t in record.token_ids]:
                raise UserError(f"sample {i} of {store_path} (query {query.id}): the student tokens differ from the "
                                "store's; the task data or tokenizer changed since teacher-cache")
            prompts.append(prompt)
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


def read_results(out_dir: Path, task_name: str) -> list[dict]:
    """Every results JSON in ``out_dir``; one of another task is refused, never mixed into the table."""
    rows = []
    for path in sorted(out_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err.msg}); delete it and re-run") from err
        if not isinstance(data, dict) or (data.get("kind") != RESULT_KIND and "records" not in data):
            continue  # not a results file (e.g. notes someone saved here)
        if data.get("task") != task_name:
            raise UserError(
                f"{path} holds results of task {data.get('task')!r}, not {task_name!r}; refusing to mix them into "
                f"{out_dir / TABLE_FILE}: move it to its own task folder (the other results are saved; "
                "re-running re-uses them)"
            )
        rows.append(data)
    return rows


def _label(row: dict) -> str:
    return {"zero-shot": "zero-shot", "icl": f"{row.get('shots')}-shot ICL"}.get(row["mode"], f"student {row['name']}")


def _order(row: dict) -> tuple:
    return (MODE_ORDER.get(row["mode"], 3), row.get("shots", 0), row["name"])


MODE_ORDER = {"zero-shot": 0, "icl": 1, "student": 2}


def results_table(rows: list[dict], task_name: str, shots: int) -> str:
    """Markdown: one row per result; speed-up = the ICL row's ms/query over this row's."""
    icl = [r for r in rows if r["mode"] == "icl"]
    ref = next((r for r in icl if r.get("shots") == shots), max(icl, key=lambda r: r.get("shots", 0), default=None))
    metric = rows[0]["metric"] if rows else "score"
    speed_head = f"speed-up vs {ref['shots']}-shot ICL" if ref else "speed-up vs ICL"
    lines = [f"## {task_name}", "", f"| mode | {metric} | n | ms/query | prompt tokens/query | {speed_head} |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=_order):
        speed = f"{ref['mean_latency_ms'] / row['mean_latency_ms']:.2f}x" if ref and row["mean_latency_ms"] > 0 else "-"
        value = f"{row['score']:.2f}" if row["metric"] == metric else f"{row['score']:.2f} ({row['metric']})"
        lines.append(f"| {_label(row)} | {value} | {row['n']} | {row['mean_latency_ms']:.1f} | "
                     f"{row['mean_prompt_tokens']:.1f} | {speed} |")
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, task_name: str, shots: int) -> str:
    """``<out_dir>/table.md`` across every result of the task; returns its text."""
    table = results_table(read_results(out_dir, task_name), task_name, shots)
    (out_dir / TABLE_FILE).write_text(table)
    return table
