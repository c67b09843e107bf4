"""Whole-model cost of MimIC: stock sdpa routing vs MimIC heads attached (random non-zero v),
forward at the teacher (stage 1) and student (stage 2) batch shapes, and forward+backward at the
student shape. Used by bench/suite.py.

Forward+backward: both runs make the decoder's input embeddings require grad (a forward hook), so the
backward covers the same layers; the loss is the mean square of the logits for both; MimIC adds its
parameters' gradients, set to None before each call as the trainer's ``zero_grad(set_to_none=True)`` does
(they never accumulate across calls). Figures are medians of synchronised wall-clock times of whole calls.

"compiled ...": the same with the model's forward through ``torch.compile`` (default mode, as
``train-student --compile`` runs it), stock vs MimIC with the default (eager-op) kernels, the trainer's
path (the third round on the H200 compiled the fused variant instead), each warmed up untimed so that
compilation is excluded; the compile seconds (the warm-up calls) are reported apart.

Env: ``OVERHEAD_EAGER`` / ``OVERHEAD_COMPILED`` (comma-separated routings, default ``sdpa,mimic,mimic-eager``
/ ``sdpa,mimic-eager``) to measure fewer; ``OVERHEAD_PROFILE=1``: after each forward+backward (eager and compiled),
``torch.profiler`` over 3 more calls (tables in ``suite.json``, ``overhead_profile``); ``OVERHEAD_MODE``: the
``torch.compile`` mode of the compiled figures (e.g. ``reduce-overhead``: the compiled graphs replayed as CUDA
graphs; each call then starts with ``torch.compiler.cudagraph_mark_step_begin``); ``OVERHEAD_FWD=0``: the
forward+backward figures only.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch
import torch._dynamo
from harness import Report, set_attention, time_fn

TAGS = {"mimic": "MimIC heads (fused)", "mimic-eager": "MimIC heads (eager ops)"}


def student_prompts(loaded, n: int) -> list[Any]:
    from pipeline.prompts import build_prompt
    from pipeline.tasks import load_task

    task = load_task("shapes_vqa")
    queries = task.split("train")
    return [build_prompt(loaded.family, loaded.processor, task.spec, queries[i], [], [], task.demo_answer(queries[i]))
            for i in range(n)]


def device_batch(loaded, prompts) -> dict:
    from pipeline.forward import to_device

    coll = loaded.family.collate([p.encoded for p in prompts], loaded.processor, "right")
    return to_device(coll, loaded.device, next(loaded.model.parameters()).dtype)


def _embed_requires_grad(model):
    def hook(_module, _args, output):
        return output.detach().requires_grad_()

    return model.get_input_embeddings().register_forward_hook(hook)


def _fwd(model, b):
    def run():
        with torch.inference_mode():
            model(**b, use_cache=False, logits_to_keep=1)
    return run


def _fwd_bwd(model, b, graphs: bool = False, params: tuple = ()):
    """One call = a training step's forward and backward: ``params`` (the student's) start without gradients,
    as the trainer's ``zero_grad(set_to_none=True)`` leaves them, so gradients never accumulate across calls
    (with CUDA graphs an accumulated gradient would read a graph output the next replay overwrote)."""
    def run():
        for p in params:
            p.grad = None
        if graphs:  # a new step: the graphs' outputs of the previous call may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        out = model(**b, use_cache=False)
        out.logits.float().pow(2).mean().backward()
    return run


def overhead(report: Report, loaded, teacher_batch: dict | None, batch: int, iters: int = 10) -> None:
    model = loaded.model
    for p in model.parameters():  # the base model is frozen in every stage; only activations get grads
        p.requires_grad_(False)
    student_batch = device_batch(loaded, student_prompts(loaded, batch))
    shapes = {"student": student_batch}
    if teacher_batch is not None:
        shapes["teacher"] = teacher_batch
    for routing in filter(None, os.environ.get("OVERHEAD_EAGER", "sdpa,mimic,mimic-eager").split(",")):
        measure(report, loaded, shapes, routing, iters, compiled=False)
    # compiled: stock and the trainer's path (MimIC with the default, eager-op kernels)
    for routing in filter(None, os.environ.get("OVERHEAD_COMPILED", "sdpa,mimic-eager").split(",")):
        measure(report, loaded, shapes, routing, iters, compiled=True)
    set_attention(model, "mimic")


def profile_calls(fn, calls: int = 3) -> dict:
    """Key averages of ``calls`` calls of ``fn`` under torch.profiler (CPU and CUDA): by CPU total, by device
    self time."""
    from harness import profile_tables, profiler, sync

    sync()
    with profiler() as prof:
        for _ in range(calls):
            fn()
        sync()
    return {"calls": calls, **profile_tables(prof)}


@contextlib.contextmanager
def routed(loaded, batch: dict, routing: str, compiled: bool, mode: str | None = None):
    """The model as ``routing`` runs it while the block runs: stock sdpa, or MimIC heads (random non-zero
    parameters; ``mimic``: the fused kernels, ``mimic-eager``: the plain ops of pipeline.mimic); ``compiled``:
    its forward through ``torch.compile`` in ``mode``. Yields the student's parameters (none for stock). Afterwards
    the student is detached and every base parameter frozen (``batch`` runs the student's one-time layer check
    eagerly before compiling)."""
    from pipeline.decoding import compile_fn, forward_replaced
    from pipeline.mimic import MuKernels
    from pipeline.students import new_student

    model, student = loaded.model, None
    set_attention(model, "sdpa" if routing == "sdpa" else "mimic")
    try:
        if routing != "sdpa":
            student = new_student("mimic", "mimic", model, loaded.geometry)
            kernels = MuKernels(fused=routing == "mimic")
            with torch.no_grad():
                for heads in student.module:
                    heads.kernels = kernels
                for p in student.module.parameters():
                    p.normal_(0, 0.02)
            if compiled:
                with torch.no_grad():  # the student's one-time layer check (a self-removing hook) runs eagerly
                    model(**batch, use_cache=False, logits_to_keep=1)
        params = () if student is None else tuple(student.module.parameters())
        if not compiled:
            yield params
            return
        torch._dynamo.reset()
        with forward_replaced(model, compile_fn(model.forward, mode=mode)):
            yield params
    finally:
        if student is not None:
            student.detach()
        for p in model.parameters():
            p.requires_grad_(False)


def measure(report: Report, loaded, shapes: dict, routing: str, iters: int, compiled: bool) -> None:
    """Forward at every shape and forward+backward at the student shape, for one routing; ``compiled``:
    through ``torch.compile(model.forward)``, warmed up untimed (the warm-up seconds reported apart)."""
    from harness import sync

    model, student_batch = loaded.model, shapes["student"]
    mode = os.environ.get("OVERHEAD_MODE") if compiled else None
    graphs = mode == "reduce-overhead"
    prefix = (f"compiled ({mode}) " if mode else "compiled ") if compiled else ""
    fwd_shapes = shapes if os.environ.get("OVERHEAD_FWD", "1") != "0" else {}

    def timed(label: str, fn, ref: str | None) -> None:
        if compiled:
            t0 = time.perf_counter()
            for _ in range(3):  # compiles (static graph, then the backward) and settles
                fn()
            sync()
            report.extra[f"compile_s {label}"] = round(time.perf_counter() - t0, 2)
        report.add(label, time_fn(fn, 0 if compiled else 2, iters)["median_ms"], "ms", ref=ref)

    with routed(loaded, student_batch, routing, compiled, mode) as params:
        for name, b in fwd_shapes.items():
            ref = f"{prefix}fwd stock sdpa {name} B{len(b['input_ids'])}/T{b['input_ids'].shape[1]}"
            label = ref if routing == "sdpa" else ref.replace("stock sdpa", TAGS[routing])
            timed(label, _fwd(model, b), None if routing == "sdpa" else ref)
        hook = _embed_requires_grad(model)
        try:
            b = student_batch
            ref = f"{prefix}fwd+bwd stock sdpa student B{len(b['input_ids'])}/T{b['input_ids'].shape[1]}"
            label = ref if routing == "sdpa" else ref.replace("stock sdpa", TAGS[routing])
            timed(label, _fwd_bwd(model, b, graphs, params), None if routing == "sdpa" else ref)
            if os.environ.get("OVERHEAD_PROFILE"):
                report.extra.setdefault("overhead_profile", {})[label] = profile_calls(_fwd_bwd(model, b, graphs, params))
        finally:
            hook.remove()
