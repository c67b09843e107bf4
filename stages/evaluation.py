"""The parts of `pipeline evaluate` that touch the model or the results folder: prompts, batched
beam-search generation with resumable per-sample records, the per-layer L2 distance to the cached
teacher states, and which file of ``results/<task>/`` each result goes to.

Generation follows the paper's evaluation harness: left-padded batches, ``num_beams`` beams,
``max_new_tokens`` from the task, greedy beam search (no sampling), stop at a newline or the
family's next-round markers; only the new tokens are decoded, then ``task.postprocess`` makes the
prediction.

Results folder. A result is identified by its name (``zero-shot``, ``icl-<k>shot``, a run's name)
and its settings (model, split, number of queries, beams, max_new_tokens, dtype, seed). The first
settings of a name take ``<name>.json``; results of other settings go beside it as
``<name>@<settings>.json``, so a re-run with other settings never replaces an earlier result.
Records (one per query) are reused across those files when the prompt and the generation
fingerprint match, so a run with more queries generates only the new ones. Files the project did not
write (no ``kind`` marker in a JSON, no marker in ``table.md`` or an L2 PNG) are never overwritten
or deleted; temporary files get fresh names, so they cannot clobber anything either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from pipeline.adapters import ADAPTER_WEIGHTS
from pipeline.capture import StateCapture
from pipeline.config import UserError, config_to_dict
from pipeline.forward import forward_states, generate_batch, model_dtype
from pipeline.metrics import JavaNotFoundError, chair_scores, vqa_accuracy_by_type
from pipeline.plots import plot_layer_distances
from pipeline.prompts import DemoCache, Prompt, build_prompt, check_alignment
from pipeline.results import (
    PARTIAL_SUFFIX,
    PNG_MARK,
    RESULT_KIND,
    RESULTS_SCHEMA_VERSION,
    SCHEMA_KEY,
    TABLE_FILE,
    TABLE_MARK,
    is_result,
    read_json,
)
from pipeline.retrieval import model_index
from pipeline.runtime import Loaded, Progress
from pipeline.store import open_store
from pipeline.students import load_student_dir
from pipeline.tasks.benchmarks import benchmark_breakdown
from pipeline.tasks.sampling import sample_demonstrations
from pipeline.vectors import prompt_ends

SETTINGS_KEYS = ("model_fingerprint", "split", "n", "num_beams", "max_new_tokens", "dtype", "seed")
"""What identifies a result besides its name (the model alias is shown, the fingerprint compared)."""


class ResultsError(UserError):
    """A results folder that cannot be written, or that holds a file this command must not replace."""


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


def build_queries(task: Any, loaded: Loaded, examples: Sequence[Any], shots: int, seed: int,
                  demos: str = "random") -> list[Query]:
    """Generation prompts: BOS + ``shots`` demonstrations (stage 1's sampler and seed, or ``demos="similar"``:
    the nearest by the model's embeddings, pipeline.retrieval) + the query."""
    support = task.split("support") if shots else []
    index = model_index(loaded, task) if demos == "similar" and shots else None
    if index is not None:
        index.add_queries(examples)
    demo_cache = DemoCache()
    queries = []
    for example in examples:
        picks = sample_demonstrations(support, example, shots, seed, demos, index) if shots else []
        chosen = [support[j] for j in picks]
        prompt = build_prompt(loaded.family, loaded.processor, task.spec, example, chosen,
                              [task.demo_answer(d) for d in chosen], None, demo_cache)
        queries.append(Query(example, prompt, [str(d.id) for d in chosen]))
    return queries


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).removeprefix("torch.")


def result_settings(loaded: Loaded, config: Any, max_new_tokens: int, n: int) -> dict:
    """The settings of one `pipeline evaluate` call that make its results comparable with each other."""
    return {"model": loaded.source.recorded, "model_fingerprint": loaded.source.fingerprint, "split": config.split,
            "n": n, "num_beams": config.num_beams, "max_new_tokens": max_new_tokens,
            "dtype": dtype_name(model_dtype(loaded.model)), "seed": config.seed}


def settings_of(payload: dict) -> dict:
    """A saved result's settings; results written before settings were saved get them from their fields."""
    if isinstance(payload.get("settings"), dict):
        return payload["settings"]
    fingerprint, generation, config = (payload.get(k) if isinstance(payload.get(k), dict) else {}
                                       for k in ("fingerprint", "generation", "config"))
    return {"model": payload.get("model"), "model_fingerprint": fingerprint.get("model_fingerprint"),
            "split": payload.get("split"), "n": payload.get("n"),
            "num_beams": generation.get("num_beams", fingerprint.get("num_beams")),
            "max_new_tokens": generation.get("max_new_tokens", fingerprint.get("max_new_tokens")),
            "dtype": dtype_name(fingerprint.get("dtype")), "seed": config.get("seed", fingerprint.get("seed"))}


def settings_key(settings: dict) -> tuple:
    return tuple(settings.get(k) for k in SETTINGS_KEYS)


def settings_tag(settings: dict) -> str:
    """File-name part naming settings, e.g. ``eval-n200-beams3-tok10-float32-seed3407-1a2b3c4d``."""
    model = str(settings.get("model_fingerprint") or "").rpartition(":")[2][:8] or "model"
    tag = (f"{settings['split']}-n{settings['n']}-beams{settings['num_beams']}-tok{settings['max_new_tokens']}-"
           f"{settings['dtype']}-seed{settings['seed']}-{model}")
    return re.sub(r"[^A-Za-z0-9._-]", "_", tag)


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``path`` through a fresh temporary file beside it (never clobbering another file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _partial_header(path: Path) -> dict | None:
    """The header of a partial records file, or None when the file is not one of ours."""
    try:
        with path.open() as f:
            header = json.loads(f.readline())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict) or "fingerprint" not in header or header.get("kind", RESULT_KIND) != RESULT_KIND:
        return None
    return header


class ResultsFolder:
    """``results/<task>/``: which file a result goes to, and which files are ours to rewrite."""

    def __init__(self, results_dir: str | Path, task_name: str):
        self.root, self.task_name = Path(results_dir), task_name
        self.path = self.root / task_name

    def prepare(self) -> Path:
        """Create the folder and prove it is writable (a probe file), before any work is done."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=self.path)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            if isinstance(err, FileExistsError) or (self.path.exists() and not self.path.is_dir()):
                reason = "a file, not a directory, is in the way"
            raise ResultsError(f"--results-dir {self.root}: cannot write results to {self.path} ({reason}); "
                               "expected a writable directory: pass another --results-dir or fix its "
                               "permissions") from err
        return self.path

    def results(self) -> list[tuple[Path, dict]]:
        """Every result JSON of ours in the folder; one of another task is refused, never mixed in."""
        found = []
        for path in sorted(self.path.glob("*.json")):
            data = read_json(path)
            if not is_result(data):
                continue  # not written by `pipeline evaluate` (e.g. notes someone saved here)
            version = data.get(SCHEMA_KEY, RESULTS_SCHEMA_VERSION)
            if not isinstance(version, int) or version > RESULTS_SCHEMA_VERSION:
                raise ResultsError(f"{path} has {SCHEMA_KEY} {version!r}; this code reads up to "
                                   f"{RESULTS_SCHEMA_VERSION}: upgrade the pipeline or move the file out of {self.path}")
            if data.get("task") != self.task_name:
                raise ResultsError(
                    f"{path} holds results of task {data.get('task')!r}, not {self.task_name!r}; refusing to mix "
                    f"them into {self.path / TABLE_FILE}: move it to its own task folder (the other results are "
                    "saved; re-running re-uses them)")
            found.append((path, data))
        return found

    def siblings(self, name: str) -> list[dict]:
        """Every saved result of ``name``, whatever its settings (their records may be reused)."""
        stems = {name} | {p.stem for p in self.path.glob(f"{glob_escape(name)}@*.json")}
        payloads = [read_json(self.path / f"{stem}.json") for stem in sorted(stems)]
        return [p for p in payloads if is_result(p) and p["name"] == name]

    def _slot_state(self, stem: str, name: str, settings: dict) -> str:
        """"ours" (this name and settings), "free", or "taken" (other settings, or a file not ours)."""
        final, partial = self.path / f"{stem}.json", self.path / f"{stem}{PARTIAL_SUFFIX}"
        states = set()
        if final.exists():
            data = read_json(final)
            same = is_result(data) and data["name"] == name and settings_key(settings_of(data)) == settings_key(settings)
            states.add("ours" if same else "taken")
        if partial.exists():
            header = _partial_header(partial)
            if header is None:
                states.add("taken")
            elif "settings" in header:  # without settings: an interrupted run of an older version, reusable
                same = header.get("name") == name and settings_key(header["settings"]) == settings_key(settings)
                states.add("ours" if same else "taken")
        return "taken" if "taken" in states else "ours" if "ours" in states else "free"

    def stem_for(self, name: str, settings: dict) -> str:
        """``<name>`` or ``<name>@<settings>``: the file stem of this result (see the module doc)."""
        stems = (name, f"{name}@{settings_tag(settings)}")
        states = {stem: self._slot_state(stem, name, settings) for stem in stems}
        for wanted in ("ours", "free"):
            for stem in stems:
                if states[stem] == wanted:
                    return stem
        raise ResultsError(f"{self.path}: {stems[0]}.json and {stems[1]}.json are both taken by files of other "
                           "settings or not written by `pipeline evaluate`; move them away or pass another "
                           "--results-dir")

    def png_is_ours(self, png: Path) -> bool:
        """An L2 plot we wrote: our PNG marker, or (older versions) named by one of our results."""
        from PIL import Image

        try:
            with Image.open(png) as image:
                if getattr(image, "text", {}).get(PNG_MARK[0]) == PNG_MARK[1]:
                    return True
        except OSError:
            return False
        return any(str((data.get("l2") or {}).get("png")) == str(png) for _, data in self.results())

    def check_png(self, png: Path) -> None:
        if png.exists() and not self.png_is_ours(png):
            raise ResultsError(f"{png} was not written by `pipeline evaluate`; refusing to overwrite it with the L2 "
                               "plot: move it away, pass another --results-dir, or --no-l2")

    def write_png(self, png: Path, plot: Any) -> Path:
        """``plot(path)`` draws a PNG; it is marked as ours and moved to ``png`` atomically."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        self.check_png(png)
        fd, tmp = tempfile.mkstemp(prefix=f".{png.stem}.", suffix=".png", dir=png.parent)
        os.close(fd)
        try:
            plot(tmp)
            with Image.open(tmp) as image:
                image.load()
                info = PngInfo()
                info.add_text(*PNG_MARK)
                image.save(tmp, pnginfo=info)
            os.replace(tmp, png)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return png

    def table_is_ours(self) -> bool:
        path = self.path / TABLE_FILE
        if not path.exists():
            return True
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return False
        if lines and lines[0] == TABLE_MARK:
            return True
        # a table of an older version: "## <task>", a blank line, then the header row
        return len(lines) > 2 and lines[0] == f"## {self.task_name}" and lines[2].startswith("| mode |")

    def check_table(self) -> None:
        if not self.table_is_ours():
            raise ResultsError(f"{self.path / TABLE_FILE} was not written by `pipeline evaluate`; refusing to "
                               "overwrite it: move it away or pass another --results-dir")

    def write_table(self, table: str) -> Path:
        self.check_table()
        return atomic_write(self.path / TABLE_FILE, f"{TABLE_MARK}\n{table}")


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


class RecordLog:
    """Per-sample records of one result: ``<stem>.partial.jsonl`` while generating, ``<stem>.json`` after.

    The first JSONL line is a header with the result's name, settings and generation fingerprint
    (model, beams, budget, dtype, adapter). A record is reused when the fingerprint and its prompt's
    sha match — from this result's files or any other result of the same name (``siblings``) — so a
    re-run, or a run with more queries, generates only what is missing.
    """

    def __init__(self, directory: Path, stem: str, name: str, fingerprint: dict, settings: dict,
                 siblings: Sequence[dict] = ()):
        self.partial = directory / f"{stem}{PARTIAL_SUFFIX}"
        self.final = directory / f"{stem}.json"
        self.name, self.fingerprint, self.settings = name, fingerprint, settings
        self.siblings = list(siblings)

    def saved(self) -> dict | None:
        """The saved ``<stem>.json`` (ours, of this name and settings), whatever its fingerprint."""
        data = read_json(self.final) if self.final.is_file() else None
        if is_result(data) and data["name"] == self.name and settings_key(settings_of(data)) == settings_key(self.settings):
            return data
        return None

    def previous(self) -> dict | None:
        """The saved ``<stem>.json`` if it was made with the same fingerprint."""
        data = self.saved()
        return data if data is not None and data.get("fingerprint") == self.fingerprint else None

    def done(self) -> dict[str, dict]:
        """Reusable records by example id: from results of the same name, then the partial file."""
        found: dict[str, dict] = {}
        for payload in [*self.siblings, self.previous() or {}]:
            if payload.get("fingerprint") == self.fingerprint:
                found.update({r["id"]: r for r in payload.get("records", []) if isinstance(r, dict) and "id" in r})
        header = _partial_header(self.partial) if self.partial.is_file() else None
        if header is not None and header.get("fingerprint") == self.fingerprint:
            for line in self.partial.read_text().splitlines()[1:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill: that sample is generated again
                    continue
                if isinstance(row, dict) and "id" in row:
                    found[row["id"]] = row
        return found

    @contextmanager
    def appender(self, keep: Sequence[dict]) -> Iterator[Any]:
        """Rewrite the partial file (atomically) with the header and ``keep``; yield ``append(record)``."""
        header = {"kind": RESULT_KIND, "name": self.name, "settings": self.settings, "fingerprint": self.fingerprint}
        atomic_write(self.partial, "".join(json.dumps(r) + "\n" for r in [header, *keep]))
        with self.partial.open("a") as f:

            def append(record: dict) -> None:
                f.write(json.dumps(record) + "\n")
                f.flush()

            yield append

    def finish(self, payload: dict) -> Path:
        atomic_write(self.final, json.dumps(payload, indent=2))
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


def answer_type_scores(metric: str, examples: Sequence[Any], records: Sequence[dict]) -> dict | None:
    """VQA accuracy overall and per answer type (yes/no, number, other), as the official evaluation script
    prints it, when every example carries its ``answer_type`` (official VQAv2 / OK-VQA annotations); else None."""
    types = [(getattr(e, "meta", None) or {}).get("answer_type") for e in examples]
    if metric != "vqa_accuracy" or not types or not all(isinstance(t, str) for t in types):
        return None
    return vqa_accuracy_by_type([r["prediction"] for r in records], [r["answers"] for r in records], types)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_prompts(loaded: Loaded, task: Any, attrs: dict, queries: Sequence[Any], demo_cache: DemoCache,
               index: Any = None) -> tuple[list[Prompt], list[Prompt]]:
    """(teacher, student) prompts of held-out queries, as teacher-cache builds them: the store's shots,
    demonstration seed and strategy over the support split (``index``: the strategy ``similar``'s
    pipeline.retrieval index); the answer teacher-forced in both."""
    support = task.split("support")
    teachers, students = [], []
    for query in queries:
        answer = task.demo_answer(query)
        picks = sample_demonstrations(support, query, int(attrs["shots"]), int(attrs["demo_seed"]),
                                      attrs.get("demo_strategy", "random"), index)
        demos = [support[i] for i in picks]
        teacher = build_prompt(loaded.family, loaded.processor, task.spec, query, demos,
                               [task.demo_answer(d) for d in demos], answer, demo_cache)
        student = build_prompt(loaded.family, loaded.processor, task.spec, query, [], [], answer)
        try:
            check_alignment(teacher, student, query.id)
        except ValueError as err:
            raise UserError(str(err)) from err
        teachers.append(teacher)
        students.append(student)
    return teachers, students


def layer_distances(
    loaded: Loaded, task: Any, student: Any, store_path: str | Path, queries: Sequence[Any], batch_size: int
) -> dict:
    """Mean L2 distance per layer to the k-shot teacher's states (the paper's L2 figure), on held-out
    queries: ``queries`` are the evaluated split's, which the student never trained on.

    The teacher runs here as teacher-cache ran it for the run's store (its shots, demonstration seed and
    strategy, layer target; ``l2_prompts``), with the student switched off; zero-shot and student states
    come from BOS + query + teacher-forced answer. States at the aligned positions, right padding.
    Returns ``{"zero-shot": [L], "student": [L]}`` (mean over every aligned token), plus ``"mean"`` over
    layers per curve, ``"queries"``, ``"queries_from"`` and ``"layer_target"``.
    """
    store = open_store(store_path)
    store.validate()
    attrs = store.attrs
    if attrs.get("task") != task.name:
        raise UserError(f"the store {store_path} holds task {attrs.get('task')!r}, not {task.name!r}")
    capture = StateCapture(loaded.model, attrs["layer_target"])
    demo_cache = DemoCache()
    index = None
    if attrs.get("demo_strategy") == "similar":  # embedded by the base model, as teacher-cache did
        with student.disabled():
            index = model_index(loaded, task)
            index.add_queries(queries)
    sums = {"zero-shot": 0.0, "student": 0.0}
    tokens = 0
    for start in range(0, len(queries), batch_size):
        teachers, prompts = l2_prompts(loaded, task, attrs, queries[start : start + batch_size], demo_cache, index)
        with student.disabled(), torch.inference_mode():
            teacher = forward_states(loaded, capture, teachers).states.float()  # (B, S, L, D)
        collated = loaded.family.collate([p.encoded for p in prompts], loaded.processor, "right")
        # a student acting at one position (tv, fv) is told where each right-padded prompt ends
        at = getattr(student.attachment, "at_positions", None)
        ends = at(torch.tensor(prompt_ends(prompts), device=loaded.device)) if at else nullcontext()
        for name, context in (("zero-shot", student.disabled()), ("student", ends)):
            with context, torch.inference_mode():
                run = forward_states(loaded, capture, prompts, collated)
            states, mask = run.states.float(), run.mask  # (B, S, L, D), (B, S)
            dist = (states - teacher).norm(dim=-1) * mask[..., None]  # (B, S, L)
            sums[name] = sums[name] + dist.sum((0, 1)).cpu()
        tokens += int(mask.sum())
    curves = {name: (s / max(tokens, 1)).tolist() for name, s in sums.items()}
    return {**curves, "mean": {k: sum(v) / len(v) for k, v in curves.items()}, "queries": len(queries),
            "queries_from": "the evaluated split (held out from training)",
            "layer_target": attrs["layer_target"], "store": str(store_path)}


class Evaluation:
    """One `pipeline evaluate` call: the task, the model, the queries, and where results go."""

    def __init__(self, config: Any, task: Any, loaded: Loaded, examples: list[Any], shots: int, show_progress: bool,
                 folder: ResultsFolder):
        self.config, self.task, self.loaded, self.shots = config, task, loaded, shots
        self.examples, self.show_progress = examples, show_progress
        self.folder = folder
        self.out_dir = folder.path
        self.model_name = loaded.source.alias
        self.settings = result_settings(loaded, config, task.spec.max_new_tokens, len(examples))
        self.stems: dict[str, str] = {}
        self.warm = False
        self.chair: Any = None  # a pipeline.chair.Chair with --metrics chair (set by the stage)

    def plan(self, names: Sequence[str], runs: Sequence[Any]) -> None:
        """Choose each result's file and check every file to be written is ours, before generating."""
        for name in names:
            stem = self.folder.stem_for(name, self.settings)
            if stem in self.stems.values():
                raise ResultsError(f"two results would be written to {self.out_dir / stem}.json; rename the run "
                                   f"directory {name!r}")
            self.stems[name] = stem
        for run in runs:
            if self.config.l2 and run.store is not None and run.store.exists():
                self.folder.check_png(self.png(run.name))
        self.folder.check_table()

    def png(self, name: str) -> Path:
        return self.out_dir / f"l2_{self.stems.get(name, name)}.png"

    def path(self, name: str) -> Path:
        return self.out_dir / f"{self.stems.get(name, name)}.json"

    def fingerprint(self, mode: str, extra: dict | None = None) -> dict:
        """What must match for saved records to be reused (prompts are matched per record)."""
        return {"task": self.task.name, "mode": mode, "model_fingerprint": self.loaded.source.fingerprint,
                "num_beams": self.config.num_beams, "max_new_tokens": self.task.spec.max_new_tokens,
                "dtype": str(model_dtype(self.loaded.model)), **(extra or {})}

    def log(self, name: str, fingerprint: dict) -> RecordLog:
        if name not in self.stems:
            self.stems[name] = self.folder.stem_for(name, self.settings)
        return RecordLog(self.out_dir, self.stems[name], name, fingerprint, self.settings, self.folder.siblings(name))

    def mode(self, name: str, mode: str, shots: int, fingerprint: dict, extra: dict | None = None) -> dict:
        """Generate (missing records only), score, write the result's JSON; returns the saved payload."""
        log = self.log(name, fingerprint)
        saved = log.saved()
        if saved is not None and saved.get("fingerprint") != fingerprint and self.show_progress:
            changed = sorted(k for k in set(fingerprint) | set(saved.get("fingerprint") or {})
                             if fingerprint.get(k) != (saved.get("fingerprint") or {}).get(k))
            print(f"note: replacing {log.final} (same settings; changed since: {', '.join(changed)})")
        queries = build_queries(self.task, self.loaded, self.examples, shots, self.config.seed,
                                getattr(self.config, "demos", "random"))
        records, generated = generate_records(self.loaded, self.task, queries, log, self.config.batch_size,
                                              self.config.num_beams, f"evaluate {name}", self.show_progress,
                                              warm_up=not self.warm)
        self.warm = self.warm or generated > 0
        metric = self.task.spec.metric_name
        try:
            scored = self.task.score([r["prediction"] for r in records], [r["answers"] for r in records])
        except (JavaNotFoundError, ValueError) as err:
            raise UserError(f"{metric} failed for {name}: {err} (the predictions are kept in {log.partial}; "
                            "re-run to score them without generating again)") from err
        for record, value in zip(records, scored["per_sample"], strict=True):
            record["score"] = value
        by_type = answer_type_scores(metric, [q.example for q in queries], records)
        if by_type:
            extra = {**(extra or {}), "by_answer_type": by_type}
        extra = {**(extra or {}), **benchmark_breakdown([q.example for q in queries], records)}  # MME, SEED-Bench
        if self.chair is not None:
            extra["chair"] = chair_scores(self.chair, records)
        else:  # a re-used record keeps no CHAIR detail of an earlier run's annotations
            for record in records:
                record.pop("chair", None)
        n = len(records)
        payload = {
            "kind": RESULT_KIND, SCHEMA_KEY: RESULTS_SCHEMA_VERSION, "task": self.task.name, "name": name,
            "mode": mode, "shots": shots,
            "split": self.config.split, "model": self.model_name, "metric": metric, "score": scored["score"], "n": n,
            "settings": self.settings,
            "mean_latency_ms": sum(r["latency_ms"] for r in records) / n,
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in records) / n,
            "generation": {"num_beams": self.config.num_beams, "max_new_tokens": self.task.spec.max_new_tokens,
                           "stop_strings": list(self.loaded.family.stop_strings), "padding": "left",
                           # compiled: decode steps through pipeline.decoding (static cache, one graph)
                           "decoding": "compiled" if getattr(self.loaded.decoding, "enabled", False) else "eager"},
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
        student = load_student_dir(run.path, loaded.model, loaded.geometry, self.model_name)
        adapter_sha = hashlib.sha256((run.path / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:16]
        fingerprint = self.fingerprint("student", {"adapter_sha256": adapter_sha})
        try:
            previous = self.log(run.name, fingerprint).previous()
            extra = {"run": str(run.path), "adapter": {"method": run.adapter.method, "variant": run.adapter.variant},
                     "parameters": sum(p.numel() for _, p in student.trainable()),
                     "l2": self.l2(run, student, (previous or {}).get("l2"))}
            return self.mode(run.name, "student", 0, fingerprint, extra)
        finally:
            student.detach()

    def l2(self, run: Any, student: Any, previous: dict | None) -> dict:
        """Per-layer L2 distances (and ``l2_<result>.png``), or why they were skipped (also printed)."""
        if not self.config.l2:
            return {"skipped": "--l2 false"}
        if run.store is None or not run.store.exists():
            return self.skip_l2(run, f"the run's teacher store {run.store} does not exist")
        png = self.png(run.name)
        if previous and previous.get("requested") == self.config.l2_queries and png.is_file():
            return previous  # same adapter and model (the fingerprint matched): same distances
        try:
            result = layer_distances(self.loaded, self.task, student, run.store,
                                     list(self.examples[: self.config.l2_queries]), self.config.batch_size)
        except UserError as err:
            return self.skip_l2(run, str(err))
        curves = {"zero-shot": result["zero-shot"], run.name: result["student"]}
        title = f"{self.task.name}: L2 to {run.adapter.store_fingerprint.get('shots', '?')}-shot ICL states"
        self.folder.write_png(png, lambda path: plot_layer_distances(curves, path, title))
        return {**result, "png": str(png), "requested": self.config.l2_queries}

    def skip_l2(self, run: Any, reason: str) -> dict:
        if self.show_progress:
            print(f"note: no L2 analysis for {run.name}: {reason}")
        return {"skipped": reason}
