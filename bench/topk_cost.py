"""What storing the teacher's top-k log-probs costs stage 1 (teacher-cache's default --topk 20).

    python bench/topk_cost.py --model smollm2-135m --task plurals --shots 8 --n 32 --rounds 3

Times ``TeacherRunner.forward`` on the same 8-shot prompts with ``topk=0`` and ``topk=20``, alternating
the two in every round (so a busy machine slows both alike), and prints the median time per batch of
each and their ratio; then the store bytes per token of the states and of the top-k arrays.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.forward import TeacherRunner
from pipeline.prompts import build_prompt
from pipeline.runtime import load_for_stage
from pipeline.tasks import load_task
from pipeline.tasks.sampling import sample_demonstrations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="plurals")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    loaded = load_for_stage(args.model, args.device)
    task = load_task(args.task)
    support, queries = task.split("support"), task.split("train")
    prompts = []
    for q in list(queries)[: args.n]:
        demos = [support[i] for i in sample_demonstrations(support, q, args.shots, 3407)]
        prompts.append(build_prompt(loaded.family, loaded.processor, task.spec, q, demos,
                                    [task.demo_answer(d) for d in demos], task.demo_answer(q)))
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    runners = {k: TeacherRunner(loaded, "mlp", topk=k, batch_size=args.batch) for k in (0, 20)}
    times: dict[int, list[float]] = {0: [], 20: []}
    for b in batches[:1]:
        for runner in runners.values():
            runner.forward(b)  # warm-up
    for _ in range(args.rounds):
        for b in batches:
            for k, runner in runners.items():
                if loaded.device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = runner.forward(b)
                if loaded.device.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(len(p.encoded) for p in prompts) / len(prompts)
    states, values, _ = out[0]
    per_token = states.shape[1] * states.shape[2] * 2  # bf16 bits as uint16
    print(f"{args.model} {args.task} {args.shots}-shot, {len(prompts)} prompts of {tokens:.0f} tokens on average, "
          f"batch {args.batch}, {args.rounds} rounds, device {loaded.device}")
    print(f"| figure | value | vs | ratio |\n|---|---|---|---|\n| teacher forward, topk 0 | {1000 * med[0]:.1f} ms/batch "
          f"| | |\n| teacher forward, topk 20 | {1000 * med[20]:.1f} ms/batch | topk 0 | {med[20] / med[0]:.3f} |")
    print(f"uncompressed bytes per aligned token: states {per_token}, top-k {values.shape[-1] * 8} "
          f"({100 * values.shape[-1] * 8 / per_token:.2f}% of the states)")


if __name__ == "__main__":
    main()
