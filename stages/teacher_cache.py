"""Stage 1 — run k-shot ICL once and cache the teacher's per-layer states at the query tokens.

load config -> set up (model, task, plan, store) -> run (shards owned by this rank, batched by
length, written by a background thread) -> save (done flags per shard; validate at the end).

Teacher sequence: BOS + k demonstrations + query + teacher-forced answer; the student's sequence
is BOS + query + answer, and the query+answer token ids must be identical (checked per sample).
Aligned positions: every query+answer token (query image tokens included), BOS excluded.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from pipeline.config import UserError
from pipeline.families import Encoded
from pipeline.forward import TeacherRunner, cast_images, model_dtype, sorted_batches, without_images
from pipeline.locks import held_on_rank0, store_lock
from pipeline.prompts import DemoCache, Prompt, build_prompt, check_alignment
from pipeline.provenance import default_shots
from pipeline.retrieval import DemoIndex, method_for, model_index
from pipeline.runtime import (
    Loaded,
    Progress,
    barrier,
    check_task_fits_model,
    default_store_path,
    dist_info,
    load_for_stage,
    loader_workers,
)
from pipeline.settings import TeacherCacheConfig
from pipeline.store import (
    SHARD_LARGE,
    SampleRecord,
    ShardWriter,
    StoreError,
    StoreLayout,
    StorePath,
    create_store,
    default_shard_size,
    open_store,
    remove_store,
    store_location,
)
from pipeline.tasks import load_task
from pipeline.tasks.sampling import sample_demonstrations
from pipeline.versions import library_versions


@dataclass
class Planned:
    """One training query: its index in the train split, its demonstrations, its student span ids
    and where the answer starts within them."""

    query_index: int
    demo_indices: list[int]
    span_ids: list[int]
    answer_offset: int


class PlanData(torch.utils.data.Dataset):
    """One ``Planned`` per training query (a student prompt is built: images and tokenisation)."""

    def __init__(self, task: Any, loaded: Loaded, shots: int, n: int, seed: int, demos: str = "random",
                 index: DemoIndex | None = None):
        self.task, self.loaded, self.shots, self.n, self.seed = task, loaded, shots, n, seed
        self.demos, self.index = demos, index  # index: --demos similar, its queries embedded beforehand

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Planned:
        task, loaded = self.task, self.loaded
        query = task.split("train")[i]
        demos = (sample_demonstrations(task.split("support"), query, self.shots, self.seed, self.demos, self.index)
                 if self.shots else [])
        student = build_prompt(loaded.family, loaded.processor, task.spec, query, [], [], task.demo_answer(query))
        return Planned(i, list(demos), student.encoded.input_ids[student.span_start :],
                       student.answer_start - student.span_start)


def plan_data(task: Any, loaded: Loaded, shots: int, n_queries: int, seed: int, demos: str = "random") -> PlanData:
    """The plan as a lazy sequence: each ``Planned`` is made (deterministically) when read, in whichever process
    reads it. ``demos="similar"``: the support split's index is built (or read from its cache) and every query
    embedded here, before any worker forks."""
    queries = task.split("train")
    task.split("support")  # loaded before workers fork
    n = min(n_queries, len(queries))
    if n == 0:
        raise UserError(f"task {task.name} has no training queries")
    index = None
    if demos == "similar" and shots:
        index = model_index(loaded, task)
        index.add_queries([queries[i] for i in range(n)])
    return PlanData(task, loaded, shots, n, seed, demos, index)


def plan_queries(task: Any, loaded: Loaded, shots: int, n_queries: int, seed: int,
                 num_workers: int = 0, demos: str = "random",
                 meanwhile: Callable[[Sequence[Planned]], None] | None = None,
                 data: PlanData | None = None) -> list[Planned]:
    """Sample demonstrations and tokenise the student side of every query (for T_max and checks),
    in ``num_workers`` processes when > 0 (``data``: ``plan_data``'s sequence, made here when None).
    ``meanwhile``: with workers, called on a thread of this process while the workers plan (``warm_up``), with
    the plan as a lazy sequence (an item is planned in the thread when read), after the workers forked and
    joined before this returns, so no later fork happens while it runs."""
    if data is None:
        data = plan_data(task, loaded, shots, n_queries, seed, demos)
    n = len(data)
    if num_workers <= 0:
        return [data[i] for i in range(n)]
    planned = _planned_by_workers(data, num_workers)  # the workers fork here
    thread = None
    if meanwhile is not None:
        thread = threading.Thread(target=lambda: meanwhile(data), name="teacher-warm-up", daemon=True)
        thread.start()
    try:
        return list(planned)
    finally:
        if thread is not None:
            thread.join()


def _planned_by_workers(data: PlanData, num_workers: int) -> Iterator[Planned]:
    """The plan's items from ``num_workers`` processes, in order; they fork in this call."""
    loader = torch.utils.data.DataLoader(data, batch_size=None, collate_fn=_keep, num_workers=num_workers,
                                         prefetch_factor=8)
    return iter(loader)


class PlanAhead:
    """The plan (``plan_queries``'s list) made while the caller runs forwards: the plan workers fork at
    construction, on the calling thread, and a thread collects their items. ``result`` waits for the plan;
    ``cancel`` (also on leaving it as a context manager) stops collecting and joins the thread, whose loader
    (and with it the workers) ends there: a failed run neither waits for the whole plan nor leaves the thread
    inside the loader at exit (the process then aborted: "terminate called without an active exception")."""

    def __init__(self, data: PlanData, num_workers: int):
        held = [_planned_by_workers(data, num_workers)]  # forked here, before any forward; the thread takes it
        self._stop = threading.Event()
        self._future: Future = Future()
        self._thread = threading.Thread(target=self._collect, args=(held,), name="teacher-plan", daemon=True)
        self._thread.start()

    def _collect(self, held: list) -> None:
        planned, out = held.pop(), []
        try:
            for item in planned:
                if self._stop.is_set():
                    break
                out.append(item)
            else:
                self._future.set_result(out)
        except BaseException as err:  # noqa: BLE001 - handed to result()
            self._future.set_exception(err)
        finally:
            del planned  # the loader's workers end here, on this thread
        if not self._future.done():
            self._future.cancel()

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> list[Planned]:
        return self._future.result()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> PlanAhead:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()  # a no-op once the plan is in


WARM_UP_DEVICES = ("cuda",)
"""Devices whose first forwards of a process are slow enough to hide behind planning (``warm_up``)."""
WARMED: set[str] = set()
"""Devices this process warmed up already: its first teacher-cache only (a process loads libraries once)."""


def warm_up(task: Any, loaded: Loaded, runner: TeacherRunner, plans: Sequence[Planned], limit: int | None) -> None:
    """One forward of a batch like stage 1's, nothing kept: ``runner.batch_size`` rows cycling through the
    teacher prompts of the first queries, as many as it takes to meet two lengths (so that the batch is
    padded, as real batches are). Why: a process's first forwards on CUDA load libraries and kernels and
    build cuDNN's attention plans; on the H200 the first shard of a fresh process took 5.9 s against 0.8 s
    warm (docs/benchmarks.md, fifth round). Two lengths, not one prompt repeated: a batch without padding
    passes no attention mask, so it would not run the masked attention every real batch runs. (On a fresh
    machine the first real batches still build cuDNN plans for padded lengths of other alignments, 1-2 s
    each; sixth round.) ``plan_queries`` runs this on a thread while its workers plan, so the cost overlaps
    planning instead of delaying the first shard. Any failure here is left to the real forwards, which meet
    the same problem and report it (an over-long prompt, out of memory). Once per device and process
    (``WARMED``): a second teacher-cache of the same process finds everything loaded, and the warm-up would
    only hold the GIL while the plan comes in (+0.85 s of planning in such a run)."""
    try:
        prompts: list[Any] = []  # the first queries' prompts, up to two lengths: building one costs ~0.35 s
        for i in range(min(len(plans), runner.batch_size)):
            prompts += teacher_prompts(task, loaded, [plans[i]], limit)
            if len({len(p.encoded) for p in prompts}) > 1:
                break
        runner.forward([prompts[i % len(prompts)] for i in range(runner.batch_size)])
        WARMED.add(str(loaded.device))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - see the docstring: the run itself raises it with its own message
        pass


def store_attrs(config: TeacherCacheConfig, task: Any, loaded: Loaded, shots: int, plan: list[Planned]) -> dict:
    """The fingerprint of what produced the store (docs/architecture.md §4); stage 2 checks it."""
    geometry = loaded.geometry
    queries = task.split("train")
    query_ids = [str(queries[p.query_index].id) for p in plan]
    support = task.split("support")
    # .ids() reads one column instead of building every example (443k rows for VQAv2)
    support_ids = [str(i) for i in support.ids()] if hasattr(support, "ids") else [str(e.id) for e in support]
    return {
        "model": loaded.source.recorded,  # absolute for a local directory
        "model_revision": loaded.source.revision,
        "model_fingerprint": loaded.source.fingerprint,
        "family": loaded.family.name,
        "layer_target": config.layer_target,
        "layers": geometry.num_layers,
        "hidden": geometry.hidden_size,
        "shots": shots,
        "demo_strategy": config.demos,
        # --demos similar: which of the model's embeddings chose them (pipeline.retrieval)
        **({"demo_embedding": method_for(support)} if config.demos == "similar" else {}),
        "demo_seed": config.seed,
        "prompt_template": task.spec.prompt_id,
        "answer_template": task.spec.answer,
        "task": task.name,
        # how later stages reload the task: a user task only by its YAML path
        "task_source": str(Path(config.task).resolve()) if Path(config.task).suffix in (".yaml", ".yml") else config.task,
        "data_root": config.data_root,
        "split": "train",
        "n": len(plan),
        "query_example_ids": query_ids,
        "support_fingerprint": hashlib.sha256("\n".join(support_ids).encode()).hexdigest()[:16],
        "topk": config.topk,
        # volatile (pipeline.store.VOLATILE_ATTRS): recorded, never compared, so a library upgrade leaves a
        # store reusable: {"mimic-pipeline", "python", "torch", "transformers", "peft", "zarr"} -> version
        "code_version": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def open_or_create(path: StorePath, layout: StoreLayout, attrs: dict, overwrite: bool, rank: int) -> Any:
    """Resume a store made by the same configuration, refuse a different one unless ``overwrite``.

    Every rank reads the existing store and reaches the same decision (so a refusal stops all ranks
    instead of leaving some waiting at a barrier); only rank 0 removes or creates it.
    """
    same = False
    if path.exists():
        try:
            existing = open_store(path)
            diff = existing.differences(attrs)
            same = not diff
            problem = f"a store made with a different configuration ({'; '.join(diff)}) exists"
            if same:  # resuming: what is already written must be intact (cheap checks, not every byte)
                existing.verify(full=False, allow_incomplete=True)
        except StoreError as err:
            same, problem = False, f"{path} is not a usable teacher store ({err})"
        if not same and not overwrite:
            raise UserError(f"{problem} at {path}; pass --overwrite to replace it or --out to write elsewhere")
    barrier()  # every rank has looked before rank 0 touches anything
    if rank == 0:
        if path.exists() and not same:
            remove_store(path)
        if not path.exists():
            create_store(path, layout, attrs)
    barrier()
    store = open_store(path, mode="r+")
    if rank == 0:
        store.cleanup_partials()
    barrier()
    return store


def _text_config(model: Any) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def context_limit(model: Any, max_length: int | None) -> int | None:
    """The longest teacher prompt allowed: ``--max-length``, at most the model's positions."""
    positions = getattr(_text_config(model), "max_position_embeddings", None)
    if max_length is not None and positions is not None and max_length > positions:
        raise UserError(f"--max-length {max_length} is more than the model's {positions} positions; prompts that "
                        f"long would run past what the model was trained on: use --max-length <= {positions}")
    return max_length if max_length is not None else positions


def check_topk(model: Any, topk: int) -> None:
    """``--topk`` keeps that many answer log-probs per token: at most the vocabulary."""
    vocab = getattr(_text_config(model), "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
    if topk > vocab:
        raise UserError(f"--topk {topk} is more than the model's vocabulary of {vocab} tokens; use e.g. --topk 20")


def teacher_prompts(task: Any, loaded: Loaded, plan: list[Planned], limit: int | None,
                    demo_cache: DemoCache | None = None) -> list[Any]:
    """Build and check the teacher prompts of some planned samples (demonstrations through
    ``demo_cache`` when given)."""
    queries, support = task.split("train"), task.split("support")
    prompts = []
    for p in plan:
        query = queries[p.query_index]
        demos = [support[j] for j in p.demo_indices]
        prompt = build_prompt(
            loaded.family, loaded.processor, task.spec, query, demos,
            [task.demo_answer(d) for d in demos], task.demo_answer(query), demo_cache,
            answer_offset=p.answer_offset,  # found (and checked as a prefix) when the plan built the student
        )
        try:  # the student side, as planned: its span ids from position 0
            check_alignment(prompt, Prompt(Encoded(p.span_ids), 0, p.answer_offset), query.id)
        except ValueError as err:
            raise UserError(str(err)) from err
        if limit is not None and len(prompt.encoded) > limit:
            raise UserError(
                f"query {query.id} (sample {p.query_index}): the {len(p.demo_indices)}-shot teacher prompt has "
                f"{len(prompt.encoded)} tokens, more than the limit {limit}; use fewer --shots or a larger --max-length"
            )
        prompts.append(prompt)
    return prompts


class ShardData(torch.utils.data.Dataset):
    """Whole shards, each built in one DataLoader worker while the device runs earlier shards: its planned
    items (read from ``plan``: a list, or a ``PlanData`` that plans them in the worker), the teacher
    prompts of its samples (image processing and tokenisation, ~75 ms of one CPU core per Idefics2 8-shot
    prompt; pixels cast to the model's 16-bit dtype) and their batches collated as ``launch_sorted`` runs them.

    Why collate here: on the H200 host the main process's collate thread spent 0.62-0.71 s per Idefics2
    batch (docs/benchmarks.md, third round), 15x what the same collation costs alone, bounding stage 1 at
    0.43-0.49x the stock forward; in a worker process it shares no GIL with the forward loop, and the main
    process receives each batch as a few tensors instead of ~150 per-image ones to copy. Each worker
    reuses demonstration encodings through its own copy of ``demo_cache`` (empty at fork). A user error
    (a prompt over the length limit) comes back as a value, re-raised by the consumer: raised in a worker,
    the DataLoader would wrap it in a multi-line message with the worker's traceback."""

    def __init__(self, task: Any, loaded: Loaded, plan: list[Planned], shards: list[list[int]],
                 limit: int | None, batch_size: int):
        self.task, self.loaded, self.plan, self.shards, self.limit = task, loaded, plan, shards, limit
        self.batch_size = batch_size
        self.demo_cache = DemoCache()
        self.dtype = model_dtype(loaded.model)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, k: int) -> tuple[list[Planned], list[Any], tuple] | UserError:
        try:
            items = [self.plan[i] for i in self.shards[k]]  # planned here when ``plan`` is a PlanData
            prompts = [cast_images(p, self.dtype)  # pixels cross to the main process in the model's dtype
                       for p in teacher_prompts(self.task, self.loaded, items, self.limit, self.demo_cache)]
        except UserError as err:
            return err
        # the batches carry the pixels; the prompts go back without theirs (the consumer needs lengths and
        # spans, and rebuilds the prompts in the rare case it must collate again: a smaller batch after OOM)
        return items, [without_images(p) for p in prompts], sorted_batches(self.loaded, prompts, self.batch_size)


def _keep(item: Any) -> Any:
    return item


def shard_prompts(task: Any, loaded: Loaded, plan: Sequence[Planned], rows: list[list[int]],
                  limit: int | None, num_workers: int, batch_size: int) -> Iterator[tuple[list[Planned], list[Any],
                                                                                         tuple | None]]:
    """(planned items, teacher prompts, collated batches or None) for the samples of each shard in ``rows``,
    in order. With ``num_workers`` > 0 whole shards are built and collated (``ShardData``) that many processes
    ahead of the consumer, the prompts coming without their images (``without_images``); the workers fork
    in this call, not at the first item (so that ``start_early`` can start them before the plan is made).
    Without workers the prompts are built here, item by item, and collated by ``collate_ahead``."""
    if num_workers <= 0:
        def built_here() -> Iterator[tuple[list[Planned], list[Any], None]]:
            demo_cache = DemoCache()
            for shard_rows in rows:
                items = [plan[i] for i in shard_rows]
                yield items, teacher_prompts(task, loaded, items, limit, demo_cache), None
        return built_here()
    loader = torch.utils.data.DataLoader(ShardData(task, loaded, plan, rows, limit, batch_size), batch_size=None,
                                         collate_fn=_keep, num_workers=num_workers, prefetch_factor=2)
    def from_workers(built: Iterator[Any]) -> Iterator[tuple[list[Planned], list[Any], tuple]]:
        # the generator alone holds the DataLoader's iterator: closing it stops the workers at once
        for item in built:
            if isinstance(item, UserError):
                raise UserError(str(item))
            yield item
    return from_workers(iter(loader))  # iter(): the workers fork and start on the first shards now


@dataclass
class EarlyShards:
    """Shard workers started before the plan is made (``start_early``): their shards' rows, assumed from the
    sample count and the shard size, and the iterator ``shard_prompts`` returned for them.
    ``_write_while_planning`` runs them; if the store made after the plan has other shards, what they gave is
    dropped and ``_write`` builds the shards again. (``_write``, when given it, takes it only if its store has
    exactly these pending shards and rows; otherwise it is closed unused.)"""

    rows: list[list[int]]
    shards: Iterator[Any]

    def close(self) -> None:
        close = getattr(self.shards, "close", None)
        if close is not None:
            close()  # a generator: its DataLoader iterator goes, and with it the workers


def start_early(config: TeacherCacheConfig, task: Any, loaded: Loaded, data: PlanData, path: StorePath,
                limit: int | None, workers: int, batch_size: int) -> EarlyShards | None:
    """Start building the shards while the plan is made, where the shards can be known before it: shard
    workers (``num_workers`` > 0), one process, no store at ``path`` yet (every shard pending), and a shard size
    known without ``t_max`` (``--shard-size``, or query 0's span already over the large-sample size, which
    ``t_max`` then is too). The workers plan their own items (``PlanData`` is deterministic);
    ``_write_while_planning`` runs their shards while the plan is made and checks them against it. Why:
    planning (student prompts of every query, for ``t_max``) and the first shard's build (one worker, ~2 s for
    16 Idefics2 8-shot prompts) came one after the other before the first forward (docs/benchmarks.md, sixth
    round); now they overlap, and the forwards with them."""
    if workers <= 0 or dist_info()[1] > 1 or path.exists():
        return None
    n = len(data)
    size = config.shard_size
    if size is None:
        geometry = loaded.geometry
        size = default_shard_size(len(data[0].span_ids), geometry.num_layers, geometry.hidden_size)
        if size != SHARD_LARGE:  # a later, longer query could still make t_max large: wait for the plan
            return None
    size = min(size, n)
    rows = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
    return EarlyShards(rows, shard_prompts(task, loaded, data, rows, limit, workers, batch_size))


COLLATE_THREADS = 4
"""Intra-op threads (torch's OpenMP team) of the collate thread, at most. With the default (every core) its
page-locking copies, which overlap each shard's first forward, take cores from the thread that launches that
forward's kernels: on a 16-core H200 host, in a fresh process, those forwards took 0.373 s (median) against
0.349 s capped at 4 and 0.341 s for the shard's second forward (docs/benchmarks.md, seventh round). One
shard's copies still take ~0.1 s of the ~0.7 s its forwards take."""


def _fewer_threads(n: int) -> None:
    """On a pool thread, at its start: this thread's intra-op threads down to ``n``. With OpenMP the count is
    per thread; torch also keeps it as the default of threads that start later, which ``collate_ahead``
    restores when its pool is done."""
    torch.set_num_threads(max(1, min(n, torch.get_num_threads())))


def collate_ahead(runner: TeacherRunner, shards: Any):
    """Yield (shard, items, prompts, collated) for (shard, ``shard_prompts`` item) pairs, with each shard's
    batches collated (or, collated by a prompt worker, page-locked) on a thread while the device runs the
    previous shard. The thread runs its copies on ``COLLATE_THREADS`` intra-op threads at most."""
    from concurrent.futures import ThreadPoolExecutor

    pool, previous, threads = None, None, torch.get_num_threads()
    try:
        for shard, (items, prompts, collated) in shards:
            pool = pool or ThreadPoolExecutor(1, thread_name_prefix="teacher-collate",  # after workers fork
                                              initializer=_fewer_threads, initargs=(COLLATE_THREADS,))
            future = (pool.submit(runner.collate_sorted, prompts) if collated is None
                      else pool.submit(runner.pin_sorted, collated))
            if previous is not None:
                yield *previous[:3], previous[3].result()
            previous = (shard, items, prompts, future)
        if previous is not None:
            yield *previous[:3], previous[3].result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)  # this thread's count, and the default of threads started later


def run(config: TeacherCacheConfig, loaded: Loaded | None = None, show_progress: bool = True) -> StorePath:
    """Write (or resume) the teacher store; returns its path."""
    rank, world, _ = dist_info()
    shots = config.shots if config.shots is not None else default_shots(config.model)
    task = load_task(config.task, **({"data_root": config.data_root} if config.data_root else {}))
    # a path or an fsspec URL; a bad protocol or an unreachable bucket is named before the model loads
    path = store_location(config.out) if config.out else default_store_path(config.task)
    if not isinstance(path, Path):
        path.check_bucket()
    if loaded is None:
        loaded = load_for_stage(config.model, config.device, config.dtype, config.revision, config.trust_remote_code)
    check_task_fits_model(task, loaded)
    workers = loader_workers(config.num_workers, loaded.device)
    limit = context_limit(loaded.model, config.max_length)
    check_topk(loaded.model, config.topk)
    runner = TeacherRunner(loaded, config.layer_target, config.topk, config.batch_size)
    meanwhile = ((lambda plans: warm_up(task, loaded, runner, plans, limit))
                 if loaded.device.type in WARM_UP_DEVICES and str(loaded.device) not in WARMED else None)
    data = plan_data(task, loaded, shots, config.n_queries, config.seed, config.demos)
    early = start_early(config, task, loaded, data, path, limit, workers, runner.batch_size)  # before plan forks
    try:
        if early is not None:  # one process (start_early): the store's lock now, before any forward
            with held_on_rank0(store_lock(path), rank, world):
                return _write_while_planning(config, task, loaded, shots, data, path, limit, workers, runner,
                                             show_progress, early)
        plan = plan_queries(task, loaded, shots, config.n_queries, config.seed, workers, config.demos, meanwhile,
                            data)
        layout = store_layout(config, loaded, shots, plan)
        with held_on_rank0(store_lock(path), rank, world):
            return _write(config, task, loaded, shots, plan, layout, path, limit, workers, runner, show_progress,
                          early)
    finally:
        if early is not None:
            early.close()


def store_layout(config: TeacherCacheConfig, loaded: Loaded, shots: int, plan: list[Planned]) -> StoreLayout:
    geometry = loaded.geometry
    return StoreLayout(
        n_samples=len(plan), t_max=max(len(p.span_ids) for p in plan), n_layers=geometry.num_layers,
        hidden=geometry.hidden_size, shots=shots, shard_size=config.shard_size, topk=config.topk or None,
    )


PLAN_AHEAD_SHARDS = 4
"""Shards whose states ``_write_while_planning`` holds in memory, at most, while the plan is not in (Idefics2-8B
8-shot: ~350 MB a shard of 16 queries); then the forwards wait for the plan."""


def _forward_shard(runner: TeacherRunner, task: Any, loaded: Loaded, limit: int | None, workers: int,
                   demo_cache: DemoCache, items: list[Planned], prompts: list[Any], collated: tuple | None
                   ) -> Callable[[], list[SampleRecord]]:
    """One shard's teacher forwards, issued (``launch_sorted``); the returned function waits for them and
    gives the store's records, each with its item's plan."""
    rebuild = None if workers <= 0 else (  # worker-built prompts come without their images
        lambda: teacher_prompts(task, loaded, items, limit, demo_cache))
    outputs = runner.launch_sorted(prompts, collated, rebuild)

    def records() -> list[SampleRecord]:
        return [SampleRecord(hs=hs, token_ids=p.span_ids, icd_ids=p.demo_indices, query_id=p.query_index,
                             topk_values=tv, topk_indices=ti)
                for p, (hs, tv, ti) in zip(items, outputs(), strict=True)]

    return records


def _one_behind(launched: Iterable[tuple[Any, Callable[[], Any]]]) -> Iterator[tuple[Any, Any]]:
    """(key, finish()) of each (key, finish) pair, yielded once the next pair is made: a shard's forwards
    are issued before the host waits for the previous shard's and writes them, so the device never waits
    for the host between shards (docs/benchmarks.md, eighth round). If making the next pair fails (a later
    shard's forwards), the pair before it is still yielded, so that its finished work is written, then the
    error is raised."""
    last = None
    pairs = iter(launched)
    while True:
        try:
            key, finish = next(pairs)
        except StopIteration:
            break
        except Exception:
            if last is not None:
                try:
                    done = last[1]()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    done = None
                if done is not None:
                    yield last[0], done
            raise
        if last is not None:
            yield last[0], last[1]()
        last = (key, finish)
    if last is not None:
        yield last[0], last[1]()


def _finish(progress: Progress, path: StorePath, n_queries: int, shots: int, loaded: Loaded,
            show_progress: bool) -> StorePath:
    """After the last shard: the progress line closed, the store validated (rank 0) and reported."""
    rank, world, _ = dist_info()
    elapsed = progress.close()
    barrier()
    if rank == 0:
        open_store(path).validate()
        if show_progress or world > 1:
            print(f"wrote {path} ({n_queries} queries, {shots}-shot, {loaded.geometry.num_layers} layers) in "
                  f"{elapsed:.1f}s with {world} process{'es' if world > 1 else ''}")
    return path


def _check_planned(shard: int, items: list[Planned], planned: list[Planned]) -> None:
    if items != planned:  # planned again by a shard worker
        raise UserError(
            f"shard {shard}: a worker process planned its queries differently from the main process (other "
            "demonstrations or tokens); the task's splits or the demonstration sampling are not "
            "deterministic across processes. Run with --num-workers 0, and report the task")


def _write_while_planning(config: TeacherCacheConfig, task: Any, loaded: Loaded, shots: int, data: PlanData,
                          path: StorePath, limit: int | None, workers: int, runner: TeacherRunner,
                          show_progress: bool, early: EarlyShards) -> StorePath:
    """``_write`` for early shards (one process, no store yet, locked by the caller), with the plan made
    meanwhile: the forwards start on the first shard the workers built, while the plan workers plan (the
    store's ``t_max`` and attributes need the whole plan). Up to ``PLAN_AHEAD_SHARDS`` shards of states wait in
    memory for it; then the store is made and they are checked against the plan (``_check_planned``) and
    written, in order. Nothing is written before the plan is in; a failure in planning stops the run with
    nothing written. If the store's shards are not the rows the workers assumed, their work is dropped and
    ``_write`` builds the shards again. Why: planning (a student prompt per query, ~3 s for 1,000 Idefics2
    queries on the H200 host) came before the first forward; the warm run's distance from the stock forward
    was mostly that (docs/benchmarks.md, seventh round). No warm-up forward here: the first real forwards
    meet the same one-time costs, and planning overlaps them as it overlapped the warm-up."""
    progress = Progress(sum(len(r) for r in early.rows), f"teacher-cache {task.name} ({shots}-shot)",
                        enabled=show_progress)
    waiting: list[tuple[int, list[Planned], list[SampleRecord]]] = []  # forwarded shards, before the store
    state: dict[str, Any] = {}  # once the plan is in: plan, layout; once the store is made: store, writer
    demo_cache = DemoCache()

    def flush(plan_future: PlanAhead, stack: contextlib.ExitStack) -> bool:
        """Make the store once the plan is in, then write every waiting shard; False: the store's shards are
        not the workers' rows (nothing written)."""
        if "writer" not in state:
            plan = state["plan"] = plan_future.result()
            layout = state["layout"] = store_layout(config, loaded, shots, plan)
            attrs = store_attrs(config, task, loaded, shots, plan) | {"shard_size": layout.shard_size}
            store = open_or_create(path, layout, attrs, config.overwrite, 0)
            if [list(store.shard_samples(s)) for s in store.pending_shards(0, 1)] != early.rows:
                return False
            state.update(store=store, writer=stack.enter_context(ShardWriter(store, writers=config.writers)))
        for shard, items, records in waiting:
            _check_planned(shard, items, [state["plan"][i] for i in state["store"].shard_samples(shard)])
            state["writer"].submit(shard, records)
        waiting.clear()
        return True

    written = False
    # leaving: the writer (once made) finishes its shards, then the plan's thread is stopped if still running
    with PlanAhead(data, workers) as plan_future, contextlib.ExitStack() as stack:
        launched = (((shard, items, prompts), _forward_shard(runner, task, loaded, limit, workers, demo_cache, items,
                                                             prompts, collated))
                    for shard, items, prompts, collated in collate_ahead(runner, enumerate(early.shards)))
        for (shard, items, prompts), records in _one_behind(launched):
            waiting.append((shard, items, records))
            progress.update(len(items), sum(len(p.encoded) for p in prompts), batch=runner.batch_size)
            due = "writer" in state or plan_future.done() or len(waiting) >= PLAN_AHEAD_SHARDS
            if due and not flush(plan_future, stack):
                break
        else:
            written = flush(plan_future, stack)
    if not written:
        progress.close()
        early.close()  # the store's shards are other rows: build them again, after the plan
        return _write(config, task, loaded, shots, state["plan"], state["layout"], path, limit, workers, runner,
                      show_progress)
    return _finish(progress, path, len(state["plan"]), shots, loaded, show_progress)


def _write(config: TeacherCacheConfig, task: Any, loaded: Loaded, shots: int, plan: list[Planned],
           layout: StoreLayout, path: StorePath, limit: int | None, workers: int, runner: TeacherRunner,
           show_progress: bool, early: EarlyShards | None = None) -> StorePath:
    """Create or resume the store at ``path`` (locked by the caller) and write the pending shards (built by
    ``early``'s workers when its rows are exactly the pending shards')."""
    rank, world, _ = dist_info()
    attrs = store_attrs(config, task, loaded, shots, plan) | {"shard_size": layout.shard_size}
    store = open_or_create(path, layout, attrs, config.overwrite, rank)
    pending = store.pending_shards(rank, world)
    rows = [list(store.shard_samples(s)) for s in pending]
    total = sum(len(r) for r in rows)
    progress = Progress(total, f"teacher-cache {task.name} ({shots}-shot)", enabled=show_progress and rank == 0)
    with ShardWriter(store, writers=config.writers) as writer:
        if early is not None and early.rows == rows:
            built = early.shards
        else:
            if early is not None:
                early.close()
            built = shard_prompts(task, loaded, plan, rows, limit, workers, runner.batch_size)
        demo_cache = DemoCache()

        def launched() -> Iterator[tuple[Any, Callable[[], list[SampleRecord]]]]:
            for shard, items, prompts, collated in collate_ahead(runner, zip(pending, built, strict=True)):
                _check_planned(shard, items, [plan[i] for i in store.shard_samples(shard)])
                yield (shard, items, prompts), _forward_shard(runner, task, loaded, limit, workers, demo_cache,
                                                              items, prompts, collated)

        for (shard, items, prompts), records in _one_behind(launched()):
            writer.submit(shard, records)
            progress.update(len(items), sum(len(p.encoded) for p in prompts), batch=runner.batch_size)
    return _finish(progress, path, len(plan), shots, loaded, show_progress)
