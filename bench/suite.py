"""Stage 1, stage 2, whole-model overhead, inference and store I/O for one full-size model, in one
process (the random bf16 model is built once).

    python bench/suite.py --model idefics2-8b --shots 8 --out results/idefics2     # GPU
    python bench/suite.py --model idefics-9b --shots 32 --out results/idefics1      # GPU
    python bench/suite.py --model idefics2-8b --tiny --n 8 --batch 2 --steps 3      # CPU smoke test

Every figure is printed as it is measured, with its ratio to its comparison from the same run; the
table is printed last and everything (timers, per-step times, machine) saved to <out>/suite.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch
from harness import Report, build_model, machine, matmul_tflops

SECTIONS = ("stage1", "stage2", "overhead", "infer", "compiled", "store")
"""compiled: the inference section again with decode steps compiled (evaluate --compile, pipeline.decoding)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="idefics2-8b")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--n", type=int, default=96, help="stage 1 queries (stage 2 trains on them)")
    ap.add_argument("--batch", type=int, default=8, help="stage 1 and stage 2 batch size")
    ap.add_argument("--steps", type=int, default=12, help="stage 2 optimiser steps per timed run")
    ap.add_argument("--workers", type=int, default=8, help="prompt / store reader processes")
    ap.add_argument("--writers", type=int, default=None, help="teacher-cache --writers (default: its own)")
    ap.add_argument("--queries", type=int, default=6, help="inference queries per mode")
    ap.add_argument("--infer-batch", type=int, default=8,
                    help="also time inference with this many queries per generate call (1: batch 1 only)")
    ap.add_argument("--icl-shots", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out", default="results/suite")
    ap.add_argument("--work", default=None, help="scratch folder for stores and runs (default: a temp dir)")
    ap.add_argument("--tiny", action="store_true", help="the 2-layer float32 test model (smoke test)")
    ap.add_argument("--device", default="auto", help="auto: cuda when available")
    args = ap.parse_args()
    sections = args.sections.split(",")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    work = Path(args.work or tempfile.mkdtemp(prefix="mimic-bench-"))
    out = Path(args.out)
    report = Report(f"{args.model} {args.shots}-shot")
    report.extra["args"] = vars(args)
    print(machine(), flush=True)

    from pipeline.runtime import wrap_model

    t0 = time.perf_counter()
    model, processor = build_model(args.model, device, args.tiny)
    report.extra["build_model_s"] = time.perf_counter() - t0
    loaded = wrap_model(model, processor, args.model, device=device)
    peak = matmul_tflops()
    state: dict = {}

    def section(name, fn):
        if name not in sections:
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception:  # keep the other sections' figures
            report.extra[f"{name}_error"] = traceback.format_exc()
            print(f"SECTION {name} FAILED\n{traceback.format_exc()}", flush=True)
        report.extra[f"{name}_s"] = time.perf_counter() - t
        report.save(out / "suite.json")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            report.extra[f"{name}_max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30

    saved = work / "stage1.json"  # what a later call with the same --work reads instead of re-running stage 1

    def s1():
        from stage_speed import stage1

        state.update(stage1(report, loaded, args.model, args.shots, args.n, args.batch, args.workers, work, peak,
                                     args.writers))
        saved.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in state.items()}))

    def stage1_store() -> Path:
        """Stage 1's store: from this call, or from an earlier call's --work (sections stage2 and store)."""
        if "store" not in state:
            if not saved.exists():
                raise RuntimeError(f"this section needs stage 1's store: add stage1 to --sections, or pass the --work "
                                   f"of an earlier call that ran it (no {saved})")
            state.update(json.loads(saved.read_text()))
            state["store"] = Path(state["store"])
        return state["store"]

    def s2():
        from stage_speed import stage2

        state.update(stage2(report, loaded, args.model, args.shots, stage1_store(), args.n, args.batch, args.steps,
                            args.workers, work))

    def s3():
        from model_overhead import device_batch, overhead

        teacher = None
        if "store" in state:  # a teacher batch of the stage 1 shape, rebuilt from the task
            from inference import eval_prompts

            from pipeline.tasks import load_task

            prompts, _ = eval_prompts(loaded, load_task("shapes_vqa"), args.shots, args.batch)
            teacher = device_batch(loaded, prompts)
        overhead(report, loaded, teacher, args.batch)

    def s4():
        from inference import inference

        inference(report, loaded, args.queries, tuple(args.icl_shots), args.infer_batch)

    def s_compiled():
        from inference import inference

        inference(report, loaded, args.queries, tuple(args.icl_shots), args.infer_batch, compiled=True)

    def s5():
        from store_io import store_io

        store = stage1_store()
        store_io(report, store, args.workers, state["samples_per_s"], state.get("offline_samples_per_s", 0.0),
                 work)

    for name, fn in zip(SECTIONS, (s1, s2, s3, s4, s_compiled, s5), strict=True):
        section(name, fn)
    report.save(out / "suite.json")
    (out / "table.md").write_text(report.table() + "\n")
    print(report.table())
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
