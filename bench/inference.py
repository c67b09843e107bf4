"""Inference per query: base zero-shot, MimIC student (zero demonstrations), 8-shot and 32-shot ICL.
Used by bench/suite.py.

One query at a time (batch 1), beam search with 3 beams and exactly 10 new tokens (``min_new_tokens``
= ``max_new_tokens`` = 10: random weights would otherwise stop at arbitrary points; stop strings are
left out for the same reason, and image tokens are suppressed so a generated placeholder never asks
for image features). Base and ICL run with stock sdpa attention; the student with MimIC heads
(random non-zero parameters) through the MimIC attention function. Latency = collate + host-to-device
+ ``generate``, median over the queries after one warm-up per mode; prompt building (CPU: images and
tokenisation) is timed separately.
"""

from __future__ import annotations

import statistics
import time
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


def generate_one(loaded, prompt, suppress: list[int]) -> None:
    from pipeline.families.base import pad_token_id
    from stages.teacher_cache import to_device

    coll = loaded.family.collate([prompt.encoded], loaded.processor, "left")
    coll.pop("position_ids", None)
    batch = to_device(coll, loaded.device, next(loaded.model.parameters()).dtype)
    config = loaded.model.config
    extra = getattr(config, "additional_vocab_size", 0) or 0
    # Idefics1's logits are vocab_size + additional_vocab_size wide; transformers 5.17's beam search
    # reshapes by config.vocab_size and fails ("shape '[1, 96000]' is invalid for input of size 96006")
    config.vocab_size += extra
    try:
        with torch.inference_mode():
            loaded.model.generate(**batch, max_new_tokens=10, min_new_tokens=10, num_beams=3, do_sample=False,
                                  pad_token_id=pad_token_id(loaded.processor), suppress_tokens=suppress)
    finally:
        config.vocab_size -= extra


def latency(loaded, prompts, suppress) -> float:
    generate_one(loaded, prompts[0], suppress)
    times = []
    for p in prompts[1:]:
        sync()
        t0 = time.perf_counter()
        generate_one(loaded, p, suppress)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def inference(report: Report, loaded, n_queries: int = 6, shot_list: tuple[int, ...] = (8, 32)) -> None:
    from pipeline.students import new_student
    from pipeline.tasks import load_task

    task = load_task("shapes_vqa")
    tok = loaded.processor.tokenizer
    suppress = [tok.convert_tokens_to_ids(t) for t in ("<image>", "<fake_token_around_image>")]
    zero, zero_build = eval_prompts(loaded, task, 0, n_queries)
    info = {"zero-shot": {"tokens": statistics.median(len(p.encoded) for p in zero), "build_ms": zero_build * 1e3}}
    set_attention(loaded.model, "sdpa")
    report.add("zero-shot ms/query", latency(loaded, zero, suppress), "ms")
    icl = {}
    for k in shot_list:
        prompts, build = eval_prompts(loaded, task, k, n_queries)
        info[f"{k}-shot"] = {"tokens": statistics.median(len(p.encoded) for p in prompts), "build_ms": build * 1e3}
        icl[k] = latency(loaded, prompts, suppress)
    set_attention(loaded.model, "mimic")
    student = new_student("mimic", "mimic", loaded.model, loaded.geometry)
    with torch.no_grad():
        for p in student.module.parameters():
            p.normal_(0, 0.02)
    try:
        report.add("MimIC student ms/query", latency(loaded, zero, suppress), "ms", ref="zero-shot ms/query")
    finally:
        student.detach()
    for k, ms in icl.items():
        report.add(f"{k}-shot ICL ms/query", ms, "ms", ref="MimIC student ms/query")
    for mode, i in info.items():
        report.add(f"{mode} prompt build ms/query (CPU)", i["build_ms"], "ms")
    report.extra["inference_prompts"] = info
