"""Inference per query: base zero-shot, MimIC student (zero demonstrations), 8-shot and 32-shot ICL.
Used by bench/suite.py.

One query at a time (batch 1), beam search with 3 beams and exactly 10 new tokens (``min_new_tokens``
= ``max_new_tokens`` = 10: random weights would otherwise stop at arbitrary points; stop strings are
left out for the same reason, and image tokens are suppressed so a generated placeholder never asks
for image features). Base and ICL run with stock sdpa attention; the student with MimIC heads
(random non-zero parameters) through the MimIC attention function. Latency = collate + host-to-device
+ ``generate``, median over the queries after one warm-up per mode; prompt building (CPU: images and
tokenisation) is timed separately. With ``batch`` > 1 the same is measured with that many queries per
``generate`` call (as the evaluate stage batches them), reported per query. With ``compiled`` every
mode decodes through ``pipeline.decoding.CompiledDecoding`` (evaluate's ``--compile``; figures tagged
"compiled"); its compilation happens in the warm-up batches and is reported apart.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any

import torch
from harness import Report, set_attention, sync


def eval_prompts(loaded, task, shots: int, n: int) -> tuple[list[Any], float]:
    from pipeline.prompts import build_prompt
    from pipeline.tasks.sampling import sample_demonstrations

    support, queries = task.split("support"), task.split("eval")
    prompts, times = [], []
    for i in range(n):
        t0 = time.perf_counter()
        demos = [support[j] for j in sample_demonstrations(support, queries[i], shots, 3407)] if shots else []
        prompts.append(build_prompt(loaded.family, loaded.processor, task.spec, queries[i], demos,
                                    [task.demo_answer(d) for d in demos], None))
        times.append(time.perf_counter() - t0)
    return prompts, statistics.median(times)


def generate_batch(loaded, prompts, suppress: list[int]) -> None:
    from pipeline.families.base import pad_token_id
    from pipeline.forward import to_device

    coll = loaded.family.collate([p.encoded for p in prompts], loaded.processor, "left")
    coll.pop("position_ids", None)
    batch = to_device(coll, loaded.device, next(loaded.model.parameters()).dtype)
    config = loaded.model.config
    extra = getattr(config, "additional_vocab_size", 0) or 0
    # Idefics1's logits are vocab_size + additional_vocab_size wide; transformers 5.17's beam search
    # reshapes by config.vocab_size and fails ("shape '[1, 96000]' is invalid for input of size 96006")
    if extra:
        config.vocab_size += extra
    options = dict(min_new_tokens=10, do_sample=False, pad_token_id=pad_token_id(loaded.processor),
                   suppress_tokens=suppress)
    try:
        with torch.inference_mode():
            if loaded.decoding is not None:  # evaluate --compile: decode steps compiled (pipeline.decoding)
                loaded.decoding.generate(batch, 10, 3, **options)
            else:
                loaded.model.generate(**batch, max_new_tokens=10, num_beams=3, **options)
    finally:
        if extra:
            config.vocab_size -= extra


def median_batch_seconds(loaded, batches, suppress, after_warmup=None) -> float:
    """Seconds of one ``generate`` call: the first batch warms up (then ``after_warmup()``, e.g. a reset of
    the peak-memory counter), the median over the following batches. Compiled decoding warms up on every
    batch (each new shape may compile; a compilation must not land in a timing)."""
    for b in batches if loaded.decoding is not None else batches[:1]:  # compiled: every shape compiles here
        generate_batch(loaded, b, suppress)
    if after_warmup is not None:
        after_warmup()
    times = []
    for b in batches[1:]:
        sync()
        t0 = time.perf_counter()
        generate_batch(loaded, b, suppress)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batched_latency(loaded, prompts, suppress, batch: int) -> float:
    """ms per query when ``batch`` queries share one ``generate`` (as the evaluate stage does): the
    first batch warms up, the median over the following batches is divided by ``batch``."""
    batches = [prompts[i : i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
    return median_batch_seconds(loaded, batches, suppress) * 1e3 / batch


@contextmanager
def random_student(loaded):
    """A MimIC student with random non-zero parameters, attention routed through MimIC, then removed."""
    from pipeline.students import new_student

    set_attention(loaded.model, "mimic")
    student = new_student("mimic", "mimic", loaded.model, loaded.geometry)
    with torch.no_grad():
        for p in student.module.parameters():
            p.normal_(0, 0.02)
    try:
        yield student
    finally:
        student.detach()


def inference(report: Report, loaded, n_queries: int = 6, shot_list: tuple[int, ...] = (8, 32),
              batch: int = 1, compiled: bool = False) -> None:
    """Per-query latency of every mode at batch 1 (``n_queries``; the first warms up) and, when
    ``batch`` > 1, with ``batch`` queries per ``generate`` call (three batches; the first warms up)."""
    from pipeline.decoding import CompiledDecoding

    if compiled:
        loaded.decoding = CompiledDecoding(loaded.model)
        t0 = time.perf_counter()
        try:
            _inference(report, loaded, n_queries, shot_list, batch, "compiled ")
        finally:
            report.extra["compiled decoding s (compilation included)"] = time.perf_counter() - t0
            report.extra["compiled decoding steps"] = dict(loaded.decoding.steps, enabled=loaded.decoding.enabled)
            loaded.decoding = None
        return
    _inference(report, loaded, n_queries, shot_list, batch, "")


def _inference(report: Report, loaded, n_queries: int, shot_list: tuple[int, ...], batch: int, kind: str) -> None:
    from pipeline.tasks import load_task

    task = load_task("shapes_vqa")
    tok = loaded.processor.tokenizer
    suppress = [tok.convert_tokens_to_ids(t) for t in ("<image>", "<fake_token_around_image>")]
    info = {}
    for size, n in ((1, n_queries), (batch, 3 * batch))[: 1 if batch <= 1 else 2]:
        tag = kind + ("" if size == 1 else f"B{size} ")
        zero, zero_build = eval_prompts(loaded, task, 0, n)
        info.setdefault("zero-shot", {"tokens": statistics.median(len(p.encoded) for p in zero),
                                      "build_ms": zero_build * 1e3})
        set_attention(loaded.model, "sdpa")
        # measured first and again last: on the benchmark VM the first timings of a process pay for
        # first-touch memory and are slower; the ratios use the second
        first_zero = batched_latency(loaded, zero, suppress, size)
        icl = {}
        for k in shot_list:
            prompts, build = eval_prompts(loaded, task, k, n)
            info.setdefault(f"{k}-shot", {"tokens": statistics.median(len(p.encoded) for p in prompts),
                                          "build_ms": build * 1e3})
            icl[k] = batched_latency(loaded, prompts, suppress, size)
        with random_student(loaded):
            student_ms = batched_latency(loaded, zero, suppress, size)
        set_attention(loaded.model, "sdpa")
        report.add(f"{tag}zero-shot ms/query (first)", first_zero, "ms")
        report.add(f"{tag}zero-shot ms/query", batched_latency(loaded, zero, suppress, size), "ms",
                   ref=f"{tag}zero-shot ms/query (first)")
        report.add(f"{tag}MimIC student ms/query", student_ms, "ms", ref=f"{tag}zero-shot ms/query")
        for k, ms in icl.items():
            report.add(f"{tag}{k}-shot ICL ms/query", ms, "ms", ref=f"{tag}MimIC student ms/query")
    if kind:
        return
    for mode, i in info.items():
        report.add(f"{mode} prompt build ms/query (CPU)", i["build_ms"], "ms")
    report.extra["inference_prompts"] = info
