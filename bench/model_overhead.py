"""Whole-model cost of MimIC: stock sdpa routing vs MimIC heads attached (random non-zero v),
forward at the teacher (stage 1) and student (stage 2) batch shapes, and forward+backward at the
student shape. Used by bench/suite.py.

Forward+backward: both runs make the decoder's input embeddings require grad (a forward hook), so the
backward covers the same layers; the loss is the mean square of the logits for both; MimIC adds its
parameters' gradients. Figures are medians of synchronised wall-clock times of whole calls.

"compiled ...": the same with the model's forward through ``torch.compile`` (default mode, as
``train-student --compile`` runs it), stock vs MimIC (fused), each warmed up untimed so that compilation
is excluded; the compile seconds (the warm-up calls) are reported apart.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
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


def overhead(report: Report, loaded, teacher_batch: dict | None, batch: int, iters: int = 10) -> None:
    from pipeline.students import new_student

    model = loaded.model
    for p in model.parameters():  # the base model is frozen in every stage; only activations get grads
        p.requires_grad_(False)
    student_batch = device_batch(loaded, student_prompts(loaded, batch))
    shapes = {"student": student_batch}
    if teacher_batch is not None:
        shapes["teacher"] = teacher_batch

    def fwd(b):
        def run():
            with torch.inference_mode():
                model(**b, use_cache=False, logits_to_keep=1)
        return run

    def fwd_bwd(b):
        def run():
            out = model(**b, use_cache=False)
            out.logits.float().pow(2).mean().backward()
        return run

    from pipeline.mimic import MuKernels

    for routing in ("sdpa", "mimic", "mimic-eager"):
        student = None
        set_attention(model, "sdpa" if routing == "sdpa" else "mimic")
        if routing != "sdpa":
            student = new_student("mimic", "mimic", model, loaded.geometry)
            kernels = MuKernels(fused=routing == "mimic")  # eager: the plain ops of pipeline.mimic
            with torch.no_grad():
                for heads in student.module:
                    heads.kernels = kernels
                for p in student.module.parameters():
                    p.normal_(0, 0.02)
        try:
            for name, b in shapes.items():
                ref = f"fwd stock sdpa {name} B{len(b['input_ids'])}/T{b['input_ids'].shape[1]}"
                label = ref if routing == "sdpa" else ref.replace("stock sdpa", TAGS[routing])
                report.add(label, time_fn(fwd(b), 2, iters)["median_ms"], "ms", ref=None if routing == "sdpa" else ref)
            hook = _embed_requires_grad(model)
            try:
                b = student_batch
                ref = f"fwd+bwd stock sdpa student B{len(b['input_ids'])}/T{b['input_ids'].shape[1]}"
                label = ref if routing == "sdpa" else ref.replace("stock sdpa", TAGS[routing])
                report.add(label, time_fn(fwd_bwd(b), 2, iters)["median_ms"], "ms",
                           ref=None if routing == "sdpa" else ref)
            finally:
                hook.remove()
        finally:
            if student is not None:
                student.detach()
            for p in model.parameters():
                p.requires_grad_(False)
    set_attention(model, "mimic")
    compiled_overhead(report, model, loaded, shapes, student_batch, iters)


def compiled_overhead(report: Report, model, loaded, shapes: dict, student_batch: dict, iters: int) -> None:
    """Stock vs MimIC with ``model.forward`` compiled; compile seconds (the untimed warm-up) as extras."""
    import torch._dynamo
    from harness import sync

    from pipeline.mimic import MuKernels
    from pipeline.students import new_student

    def fwd(b):
        def run():
            with torch.inference_mode():
                model(**b, use_cache=False, logits_to_keep=1)
        return run

    def fwd_bwd(b):
        def run():
            out = model(**b, use_cache=False)
            out.logits.float().pow(2).mean().backward()
        return run

    def warm(fn, name: str) -> None:
        t0 = time.perf_counter()
        for _ in range(3):  # compiles (static graph, then the backward) and settles
            fn()
        sync()
        report.extra[f"compile_s {name}"] = round(time.perf_counter() - t0, 2)

    own = model.__dict__.get("forward")
    for routing in ("sdpa", "mimic"):
        student = None
        set_attention(model, "sdpa" if routing == "sdpa" else "mimic")
        if routing != "sdpa":
            student = new_student("mimic", "mimic", model, loaded.geometry)
            kernels = MuKernels(fused=True)
            with torch.no_grad():
                for heads in student.module:
                    heads.kernels = kernels
                for p in student.module.parameters():
                    p.normal_(0, 0.02)
            with torch.no_grad():  # the student's one-time layer check (a self-removing hook) runs eagerly
                model(**student_batch, use_cache=False, logits_to_keep=1)
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        eager = model.forward
        model.forward = functools.wraps(eager)(torch.compile(eager))
        try:
            for name, b in shapes.items():
                ref = f"compiled fwd stock sdpa {name} B{len(b['input_ids'])}/T{b['input_ids'].shape[1]}"
                label = ref if routing == "sdpa" else ref.replace("stock sdpa", TAGS[routing])
                warm(fwd(b), label)
                report.add(label, time_fn(fwd(b), 0, iters)["median_ms"], "ms", ref=None if routing == "sdpa" else ref)
            hook = _embed_requires_grad(model)
            try:
                b = student_batch
                ref = f"compiled fwd+bwd stock sdpa student B{len(b['input_ids'])}/T{b['input_ids'].shape[1]}"
                label = ref if routing == "sdpa" else ref.replace("stock sdpa", TAGS[routing])
                warm(fwd_bwd(b), label)
                report.add(label, time_fn(fwd_bwd(b), 0, iters)["median_ms"], "ms",
                           ref=None if routing == "sdpa" else ref)
            finally:
                hook.remove()
        finally:
            if own is None:
                del model.forward
            else:
                model.forward = own
            if student is not None:
                student.detach()
            for p in model.parameters():
                p.requires_grad_(False)
    set_attention(model, "mimic")
