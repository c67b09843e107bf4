"""Stage 1 (teacher-cache, store written) vs a plain transformers forward of the same batches, and
stage 2 offline (from the store) vs --online (teacher every step). Used by bench/suite.py.

Stage 1: ``stages.teacher_cache.run`` on an in-process model, wall-clock end to end (planning, prompt
building in ``num_workers`` processes, forwards, capture, device-to-host copy, compression and
writes of the store, final validation); its forwards are timed on the device with CUDA events (no
synchronisation: teacher-cache issues a shard's forwards before it waits for the previous shard's), and every
timer below is host time without waiting for the device.
The warm run keeps the prompts and batches it saw (page-locked: the stock forward copies from the same memory);
the cold one keeps only the sizes of its page-locked tensors, so that its page-locked pool grows as a user's
run's does (to the few shards in flight, not to every batch of the run), and before the warm run the pool is
grown to those sizes (allocated and freed), as a cold run that had kept its batches would leave it. The stock
forward then runs the same batches (same order, same batch size, collated beforehand; host-to-device copy
included) with attention routed to stock sdpa:
once with every logit (a plain ``model(**batch)``) and once with ``logits_to_keep=1``.
Stage 2: ``stages.train_student.run`` twice (offline, online) with the same model, batch and steps (env
``STAGE2_WORKERS=4,2``: offline again with those ``--num-workers``);
per-step wall times come from wrapping ``Trainer.step`` and the waits for the DataLoader from wrapping
``Trainer.loader`` (the Trainer's own ``data_s`` is never incremented). With env ``STAGE2_PROFILE=1``, one more
offline run of 14 steps runs its steps 0-3 and 10-13 under ``torch.profiler`` (CPU and CUDA), the step's parts marked
(``bench::step``, ``bench::accumulate``, ``bench::targets``, ``bench::student_loss``, ``bench::backward``;
step minus accumulate: clipping, optimiser, schedule); the tables land in ``suite.json`` (``stage2_profile``).
With ``STAGE1_STORE_ONLY=1 STAGE1_PROFILE=1`` the one cold teacher-cache runs under ``torch.profiler``
(``stage1_profile``: key averages and the longest single host events, for the first shard's one-time costs).
``STAGE1_SKIP=early,warm_up,few_threads`` runs teacher-cache without its early shard workers (``start_early``;
with them the forwards run while the plan is made, and ``plan_wait_s`` is the forwards' wait for it), its warm-up
forward (``warm_up``) or the cap on its collate thread's intra-op threads (``COLLATE_THREADS``). Each model
forward is recorded with its start, duration, shape and the page-locked blocks allocated so far (``*_each`` in
the timers), and each ``pin_batch`` call with its start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import (
    Report,
    counted_flops,
    forward_flops,
    longest_events,
    profile_tables,
    profiler,
    set_attention,
    sync,
)


class Timers(dict):
    def __init__(self) -> None:
        super().__init__()
        self.start = time.perf_counter()  # what the ``*_each`` lists' start times count from

    def add(self, key: str, seconds: float) -> None:
        self[key] = self.get(key, 0.0) + seconds

    def each(self, key: str, t0: float, seconds: float) -> None:
        self.setdefault(key + "_each", []).append((round(t0 - self.start, 3), round(seconds, 4)))


def _host_allocs() -> tuple[int, float]:
    """(blocks torch's caching host allocator has page-locked so far, microseconds spent doing it)."""
    if not torch.cuda.is_available():
        return 0, 0.0
    stats = torch.cuda.host_memory_stats()
    return int(stats.get("num_host_alloc", 0)), float(stats.get("host_alloc_time.total", 0.0))


def _wrap(owner: Any, name: str, timers: Timers, key: str, keep: list | None = None, arg: int = 1,
          each: bool = False, kept: Callable[[tuple], Any] = lambda a: a, wait: bool = True):
    """``owner.name`` timed into ``timers[key]``; ``wait``: after a device synchronisation (the call's device
    work counted), else host time only (a synchronisation would change what it measures: teacher-cache issues
    the next batch while the device computes)."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"bench::{key}"):  # a named range when a profiler runs
            out = original(*args, **kwargs)
        if wait:
            sync()
        timers.add(key, time.perf_counter() - t0)
        if each:  # every call with its start: what overlapped what
            timers.each(key, t0, time.perf_counter() - t0)
        if keep is not None:
            keep.append(kept(args[arg:]))
        return out

    setattr(owner, name, wrapped)
    return lambda: setattr(owner, name, original)


def _timed_generator(module: Any, name: str, timers: Timers, key: str):
    """Wrap a function that returns an iterator: total seconds waiting for its items in ``timers[key]``, and
    each wait with its start (seconds since the function was called) in ``timers[key + "_each"]``. The
    function runs at the call, as unwrapped (``shard_prompts`` forks its workers there)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        start, each = time.perf_counter(), timers.setdefault(key + "_each", [])
        return _timed_items(original(*args, **kwargs), start, each, timers, key)

    setattr(module, name, wrapped)
    return lambda: setattr(module, name, original)


def _timed_items(it: Any, start: float, each: list, timers: Timers, key: str):
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            timers.add(key, time.perf_counter() - t0)
            each.append((round(t0 - start, 3), round(time.perf_counter() - t0, 3)))
        yield item


def _model_timer(model: Any, timers: Timers):
    """Every model forward (hooks on the top module), timed without making the host wait for the device (a
    synchronisation per forward would stop the host from issuing the next batch while the device computes,
    as teacher-cache does): on CUDA with events, read when the hooks are removed. Per forward: its duration
    on the device (``model_forward_s_each``; on the CPU its host time), its start on the device relative to
    the first forward's (``model_forward_gpu_start_each``), the host time its call began
    (``model_forward_start_each``), its batch shape with whether a mask was passed, and the page-locked blocks
    allocated when its call returned (``host_alloc_each``: count, microseconds)."""
    marks: list = []
    start = {}

    def pre(_m, _args, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is not None:  # (B, T, mask passed?): which attention kind each forward ran
            timers.setdefault("model_forward_shape_each", []).append((*ids.shape, mask is not None))
        start["t"] = time.perf_counter()
        start["ev"] = _event()

    def post(_m, _args, _kwargs, _out):
        end = time.perf_counter()
        marks.append((start["t"], end, start["ev"], _event()))
        timers.setdefault("model_forward_start_each", []).append(round(start["t"] - timers.start, 3))
        timers.setdefault("host_alloc_each", []).append(_host_allocs())

    def remove() -> None:
        for h in handles:
            h.remove()
        sync()
        first = marks[0][2] if marks else None
        for t0, t1, e0, e1 in marks:
            took = e0.elapsed_time(e1) / 1e3 if e0 is not None else t1 - t0
            timers.add("model_forward_s", took)
            timers.setdefault("model_forward_s_each", []).append(round(took, 4))
            if first is not None:
                timers.setdefault("model_forward_gpu_start_each", []).append(round(first.elapsed_time(e0) / 1e3, 4))

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    return remove


def _event():
    """A CUDA event recorded now on the current stream (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def _pinned_sizes(args: tuple) -> list[tuple[int, torch.dtype]]:
    """(elements, dtype) of each page-locked tensor of a ``launch_sorted`` call's collated batches."""
    collated = args[1] if len(args) > 1 else None
    if collated is None:
        return []
    return [(t.numel(), t.dtype) for _, b in collated[1] for t in b.values()
            if isinstance(t, torch.Tensor) and t.is_pinned()]


def grow_pinned_pool(kept: list[list[tuple[int, torch.dtype]]]) -> int:
    """Page-lock tensors of these sizes all at once and free them: torch's caching host allocator keeps the
    blocks for the next run, as it would after a run that had kept its batches. Returns the blocks allocated."""
    before = _host_allocs()[0]
    held = [torch.empty(n, dtype=d, pin_memory=True) for sizes in kept for n, d in sizes]
    del held
    return _host_allocs()[0] - before


def teacher_cache_run(loaded, alias: str, shots: int, n: int, batch: int, workers: int, out: Path,
                      writers: int | None = None, keep_batches: bool = True) -> dict:
    """Stage 1 end to end, with a breakdown: planning, waiting for prompts (DataLoader), issuing a shard's
    forwards (``launch_sorted``: host-to-device, forward, capture, device-to-host copies issued), the model
    forwards on the device, collate, waiting to submit a shard to the writer, and the writer thread's
    write_shard. ``runs``: each launch_sorted call's (prompts, collated, rebuild), or with ``keep_batches``
    False only its page-locked tensors' sizes (``_pinned_sizes``)."""
    import pipeline.forward as fw
    import pipeline.store as store_mod
    import stages.teacher_cache as tc

    timers, runs = Timers(), []
    undo = [_wrap(tc.TeacherRunner, "launch_sorted", timers, "issue_s", runs, wait=False,  # keeps its arguments
                  kept=(lambda a: a) if keep_batches else _pinned_sizes),
            _wrap(tc, "plan_queries", timers, "plan_s", wait=False),
            _wrap(tc.PlanAhead, "result", timers, "plan_wait_s", wait=False),  # early shards: waiting for the plan
            _wrap(tc, "warm_up", timers, "warm_up_s", wait=False),  # on a thread inside plan_queries (CUDA)
            _wrap(store_mod.TeacherStore, "validate", timers, "validate_s", wait=False),
            _wrap(fw, "to_device", timers, "to_device_s", wait=False),
            _wrap(fw, "pin_batch", timers, "pin_s", each=True, wait=False),
            _wrap(store_mod.ShardWriter, "submit", timers, "submit_wait_s", wait=False),
            _wrap(store_mod.TeacherStore, "write_shard", timers, "writer_thread_write_s", wait=False),
            _timed_generator(tc, "shard_prompts", timers, "prompt_wait_s"),
            _model_timer(loaded.model, timers)]
    family = loaded.family
    original_collate = family.collate

    def collate(*args, **kwargs):
        t0 = time.perf_counter()
        out_ = original_collate(*args, **kwargs)
        timers.add("collate_s", time.perf_counter() - t0)
        return out_

    object.__setattr__(family, "collate", collate)
    undo.append(lambda: object.__delattr__(family, "collate"))
    cfg = tc.TeacherCacheConfig(task="shapes_vqa", model=alias, out=str(out), shots=shots, n_queries=n,
                                batch_size=batch, num_workers=workers, overwrite=True, device=str(loaded.device),
                                writers=writers)
    for part in filter(None, os.environ.get("STAGE1_SKIP", "").split(",")):  # what a cold run costs without it
        name = {"early": "start_early", "warm_up": "warm_up", "few_threads": "COLLATE_THREADS"}[part]
        saved = getattr(tc, name)  # early: the shard workers fork after the plan; few_threads: copies on every core
        setattr(tc, name, 1 << 16 if part == "few_threads" else (lambda *a, **k: None))
        undo.append(lambda name=name, saved=saved: setattr(tc, name, saved))
    shutil.rmtree(out, ignore_errors=True)  # a complete store of the same settings would be resumed: nothing timed
    before = _host_allocs()
    try:
        timers.start = t0 = time.perf_counter()
        tc.run(cfg, loaded=loaded, show_progress=False)
        wall = time.perf_counter() - t0
    finally:
        for u in reversed(undo):
            u()
    after = _host_allocs()
    timers["host_alloc"] = (after[0] - before[0], round((after[1] - before[1]) / 1e6, 3))  # blocks, seconds
    return {"wall_s": wall, **timers, "runs": runs}


def stock_batches(runs: list[tuple]) -> list[tuple[dict, int, int]]:
    """(CPU batch, real text tokens, images): the batches launch_sorted ran (collated by the prompt workers or
    the collate thread), in its order."""
    out = []
    for prompts, (_, chunks), _ in runs:
        for chunk, coll in chunks:
            encoded = [prompts[j].encoded for j in chunk]
            out.append((coll, sum(len(e) for e in encoded), sum(len(e.images) for e in encoded)))
    return out


def stock_forward(loaded, batches, keep_last: bool) -> float:
    from pipeline.forward import to_device

    dtype = next(loaded.model.parameters()).dtype
    extra = {"logits_to_keep": 1} if keep_last else {}
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for coll, _, _ in batches:
            loaded.model(**to_device(coll, loaded.device, dtype), use_cache=False, **extra)
    sync()
    return time.perf_counter() - t0


def ablations(report: Report, loaded, alias: str, shots: int, n: int, batch: int, workers: int, work: Path) -> None:
    """Teacher-cache again without one host-side optimisation each, named in env ``STAGE1_AB``
    (comma-separated): ``nopin`` (collated batches left pageable), ``nocache`` (no reuse of encoded
    demonstrations). Reported against the end-to-end run above."""
    import pipeline.forward as fw
    import stages.teacher_cache as tc
    from pipeline.prompts import DemoCache

    for name in filter(None, os.environ.get("STAGE1_AB", "").split(",")):
        module, attr, fake = {"nopin": (fw, "pin_batch", lambda b, pin: b),
                              "nocache": (tc, "DemoCache", lambda: DemoCache(max_bytes=0))}[name]
        saved = getattr(module, attr)
        setattr(module, attr, fake)
        try:
            run = teacher_cache_run(loaded, alias, shots, n, batch, workers, work / f"stage1-{name}.zarr")
        finally:
            setattr(module, attr, saved)
        report.extra.setdefault("stage1_ablations", {})[name] = {k: v for k, v in run.items() if k != "runs"}
        report.add(f"teacher-cache + store samples/s ({name})", n / run["wall_s"], "samples/s",
                   ref="teacher-cache + store samples/s (end to end)")


def stage1(report: Report, loaded, alias: str, shots: int, n: int, batch: int, workers: int, work: Path,
           peak_tflops: float, writers: int | None = None) -> dict:
    """Teacher-cache with store vs stock forward; returns the store path and per-sample numbers.

    Twice: cold (the first teacher-cache of this process, as a user meets it: call this first) and warm
    (the same again in the same process); the stock forward runs after both. Env ``STAGE1_STORE_ONLY=1``:
    the cold run only (stage 2's store), no stock forward."""
    if os.environ.get("STAGE1_STORE_ONLY"):  # one (cold) teacher-cache for stage 2's store, nothing compared
        prof = profiler() if os.environ.get("STAGE1_PROFILE") else contextlib.nullcontext()
        with prof:
            run = teacher_cache_run(loaded, alias, shots, n, batch, workers, work / "stage1.zarr", writers,
                                    keep_batches=False)
        run.pop("runs")
        report.extra["stage1"] = {"n": n, "batch": batch, "cold_timers": run, "store_only": True}
        if os.environ.get("STAGE1_PROFILE"):  # the cold run under torch.profiler: where a fresh process's first shard goes
            report.extra["stage1_profile"] = {**profile_tables(prof, rows=50), "longest": longest_events(prof)}
        report.add("teacher-cache + store samples/s (cold: first run of the process)", n / run["wall_s"], "samples/s")
        return {"store": work / "stage1.zarr", "samples_per_s": n / run["wall_s"], "n": n}
    cold = teacher_cache_run(loaded, alias, shots, n, batch, workers, work / "stage1-cold.zarr", writers,
                             keep_batches=False)
    cold["pinned_pool_grown_blocks"] = grow_pinned_pool(cold.pop("runs"))  # as if the cold run had kept its batches
    run = teacher_cache_run(loaded, alias, shots, n, batch, workers, work / "stage1.zarr", writers)
    runs = run.pop("runs")
    if torch.cuda.is_available():  # teacher-cache collates into page-locked memory: the same tensors?
        prompts, _, rebuild = runs[0]  # the first shard's prompts (rebuilt with their images after workers)
        chunk = [p.encoded for p in (rebuild() if rebuild is not None else prompts)[:batch]]
        plain = loaded.family.collate(chunk, loaded.processor, "right")
        pinned = loaded.family.collate(chunk, loaded.processor, "right", pin=True)
        report.extra["pinned collate equals pageable"] = all(torch.equal(plain[k], pinned[k]) for k in plain)
        report.extra["pinned collate is pinned"] = bool(pinned["pixel_values"].is_pinned())
    batches = stock_batches(runs)
    tokens = sum(b[1] for b in batches)
    images = sum(b[2] for b in batches)
    set_attention(loaded.model, "sdpa")
    try:
        stock_forward(loaded, batches[:1], False)  # warm-up of the stock routing
        stock_full = stock_forward(loaded, batches, keep_last=False)
        stock_keep1 = stock_forward(loaded, batches, keep_last=True)
        from pipeline.forward import to_device

        first = to_device(batches[0][0], loaded.device, next(loaded.model.parameters()).dtype)
        with torch.inference_mode():
            counted = counted_flops(lambda: loaded.model(**first, use_cache=False, logits_to_keep=1))
    finally:
        set_attention(loaded.model, "mimic")
    n_batches = len(batches)
    flops_keep1 = forward_flops(loaded.model, tokens, images, n)
    flops_full = forward_flops(loaded.model, tokens, images, tokens)
    rule_first = forward_flops(loaded.model, batches[0][1], batches[0][2], len(batches[0][0]["input_ids"]))
    report.extra["stage1"] = {"n": n, "batch": batch, "batches": n_batches, "text_tokens": tokens, "images": images,
                              "tokens_per_sample": tokens / n, "timers": {k: v for k, v in run.items()},
                              "cold_timers": cold, "writers": writers,
                              "flops_rule_keep1": flops_keep1, "counted_flops_first_batch": counted,
                              "rule_flops_first_batch": rule_first["total"]}
    report.add("stock forward (all logits) samples/s", n / stock_full, "samples/s")
    report.add("stock forward (logits_to_keep=1) samples/s", n / stock_keep1, "samples/s",
               ref="stock forward (all logits) samples/s")
    report.add("teacher-cache + store samples/s (cold: first run of the process)", n / cold["wall_s"], "samples/s",
               ref="stock forward (all logits) samples/s")
    report.add("teacher-cache + store samples/s (end to end)", n / run["wall_s"], "samples/s",
               ref="stock forward (all logits) samples/s")
    loop = run["wall_s"] - run.get("plan_s", 0.0) - run.get("plan_wait_s", 0.0)
    report.add("teacher-cache + store samples/s (without planning)", n / loop, "samples/s",
               ref="stock forward (all logits) samples/s")
    report.add("teacher-cache forwards only samples/s", n / run["model_forward_s"], "samples/s",
               ref="stock forward (logits_to_keep=1) samples/s")
    ablations(report, loaded, alias, shots, n, batch, workers, work)
    report.add("stock forward (all logits) tokens/s", tokens / stock_full, "tokens/s")
    report.add("teacher-cache + store tokens/s (end to end)", tokens / run["wall_s"], "tokens/s",
               ref="stock forward (all logits) tokens/s")
    report.add("matmul bf16 8192^3", peak_tflops, "TFLOP/s")
    report.add("MFU stock forward (all logits)", flops_full["total"] / stock_full / 1e12, "TFLOP/s",
               ref="matmul bf16 8192^3")
    report.add("MFU teacher-cache end to end", flops_keep1["total"] / run["wall_s"] / 1e12, "TFLOP/s",
               ref="matmul bf16 8192^3")
    report.add("MFU teacher-cache cold", flops_keep1["total"] / cold["wall_s"] / 1e12, "TFLOP/s",
               ref="matmul bf16 8192^3")
    report.add("FLOP rule / FlopCounter (first batch)", rule_first["total"] / max(counted, 1.0), "ratio")
    return {"store": work / "stage1.zarr", "samples_per_s": n / run["wall_s"], "n": n,
            "tokens_per_sample": tokens / n}


# ---- stage 2 -------------------------------------------------------------------------------------
class _TimedIter:
    def __init__(self, it, timers: Timers):
        self.it, self.timers = it, timers

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.timers.add("data_wait_s", time.perf_counter() - t0)


def _marked(owner: Any, name: str, label: str):
    """``owner.name`` inside a ``torch.profiler.record_function(label)`` range."""
    original = getattr(owner, name)

    def marked(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, marked)
    return lambda: setattr(owner, name, original)


class StepProfile:
    """torch.profiler over windows of steps (``windows``: (first, count), steps counted from 0); after the
    run, ``tables[f"steps {first}-{last}"]``: the key averages by CPU total and by device self time."""

    def __init__(self, windows: tuple[tuple[int, int], ...] = ((0, 4), (10, 4))):
        self.windows, self.prof, self.tables = windows, None, {}

    def before(self, index: int) -> None:
        if any(index == first for first, _ in self.windows):
            self.prof = profiler()
            self.prof.__enter__()

    def after(self, index: int) -> None:
        window = next(((f, c) for f, c in self.windows if index == f + c - 1), None)
        if self.prof is not None and window is not None:
            sync()
            self.prof.__exit__(None, None, None)
            self.tables[f"steps {window[0]}-{index}"] = profile_tables(self.prof, rows=40)
            self.prof = None


def train_run(loaded, config, steps_out: list, profile: StepProfile | None = None) -> tuple[dict, Timers]:
    import stages.trainer as tr
    from stages.train_student import run
    from stages.training import StudentData

    timers = Timers()
    original_loader, original_step = tr.Trainer.loader, tr.Trainer.step

    origin = []

    def loader(self, micro):
        origin.append(time.perf_counter())
        t0 = time.perf_counter()
        it = iter(original_loader(self, micro))  # forks the workers
        timers.add("loader_start_s", time.perf_counter() - t0)
        return _TimedIter(it, timers)

    def step(self, *args, **kwargs):
        index = len(steps_out)
        if profile is not None:
            profile.before(index)
        t0 = time.perf_counter()
        timers.setdefault("step_start_s", []).append(round(t0 - origin[-1], 4))  # since the loader was made
        with torch.profiler.record_function("bench::step"):
            out = original_step(self, *args, **kwargs)
        steps_out.append(time.perf_counter() - t0)  # ends with float(grad_norm): synchronised
        if profile is not None:
            profile.after(index)
        return out

    tr.Trainer.loader, tr.Trainer.step = loader, step
    undo = [_wrap(StudentData, "teacher_prompts", timers, "teacher_prompts_s")]
    if profile is not None:
        import accelerate

        undo += [_marked(tr.Trainer, "accumulate", "bench::accumulate"),  # step minus this: clip, optimiser
                 _marked(tr.Trainer, "targets", "bench::targets"),
                 _marked(tr.Trainer, "student_loss", "bench::student_loss"),
                 _marked(accelerate.Accelerator, "backward", "bench::backward")]
    try:
        run_dir = run(config, loaded=loaded, show_progress=False)
    finally:
        tr.Trainer.loader, tr.Trainer.step = original_loader, original_step
        for u in undo:
            u()
    return json.loads((Path(run_dir) / "summary.json").read_text()), timers


def timed_train(loaded, config) -> dict:
    """One timed ``train_run``: its summary, timers, each step's seconds and the median step after the first
    two (the steady step; all of them for runs of 4 steps or fewer)."""
    steps_s: list[float] = []
    summary, timers = train_run(loaded, config, steps_s)
    steady = statistics.median(steps_s[2:] if len(steps_s) > 4 else steps_s)
    return {"summary": summary, "timers": dict(timers), "step_s": steps_s, "steady_step_s": steady}


def stage2(report: Report, loaded, alias: str, shots: int, store: Path, n: int, batch: int, steps: int,
           workers: int, work: Path) -> dict:
    from stages.train_student import TrainConfig

    common = dict(model=alias, batch_size=batch, grad_accum=1, num_workers=workers, runs_dir=str(work / "runs"),
                  overwrite=True, checkpoint_every=10**6, device=str(loaded.device))
    results = {}
    for mode in ("offline", "online"):
        mode_args = ({"cache": str(store)} if mode == "offline"
                     else {"online": True, "task": "shapes_vqa", "shots": shots, "n_queries": n, "layer_target": "mlp"})
        train_run(loaded, TrainConfig(**common, **mode_args, max_steps=2, name=f"warm-{mode}"), [])
        results[mode] = timed_train(loaded, TrainConfig(**common, **mode_args, max_steps=steps, name=mode))
    report.extra["stage2"] = results
    for w in filter(None, os.environ.get("STAGE2_WORKERS", "").split(",")):  # offline again, other --num-workers
        results[f"offline-w{w}"] = timed_train(loaded, TrainConfig(
            **{**common, "num_workers": int(w)}, cache=str(store), max_steps=steps, name=f"offline-w{w}"))
    if os.environ.get("STAGE2_PROFILE"):  # a separate offline run, so that the timed ones carry no profiler
        prof, prof_steps = StepProfile(), []
        train_run(loaded, TrainConfig(**common, cache=str(store), max_steps=14, name="profile"), prof_steps, prof)
        report.extra["stage2_profile"] = {"step_s": prof_steps, **prof.tables}
        for name, t in prof.tables.items():
            print(name, t["by_cpu_total"][:4000], flush=True)
    off, on = results["offline"], results["online"]
    report.add("online samples/s (end to end)", on["summary"]["samples_per_s"], "samples/s")
    report.add("offline samples/s (end to end)", off["summary"]["samples_per_s"], "samples/s",
               ref="online samples/s (end to end)")
    for mode, r in results.items():  # after the online row, so that each prints its ratio to it
        if mode.startswith("offline-w"):
            report.add(f"offline samples/s (end to end, --num-workers {mode[9:]})", r["summary"]["samples_per_s"],
                       "samples/s", ref="online samples/s (end to end)")
    report.add("online samples/s (steady, median step)", batch / on["steady_step_s"], "samples/s")
    report.add("offline samples/s (steady, median step)", batch / off["steady_step_s"], "samples/s",
               ref="online samples/s (steady, median step)")
    for mode, r in results.items():
        elapsed = r["summary"]["elapsed_s"]
        report.add(f"{mode} share of time waiting for data", r["timers"].get("data_wait_s", 0.0) / elapsed, "fraction")
        report.add(f"{mode} share of time in steps (compute)", sum(r["step_s"]) / elapsed, "fraction")
    report.add("online share of time building teacher prompts (CPU)",
               on["timers"].get("teacher_prompts_s", 0.0) / on["summary"]["elapsed_s"], "fraction")
    return {"offline_samples_per_s": batch / off["steady_step_s"]}
