"""Evaluation at scale: the largest batch that fits for zero-shot, the MimIC student and k-shot ICL with
3 beams, the queries/s at each batch, and the memory it takes.

    python bench/eval_batch.py --model idefics2-8b --shots 8 32 --max-batch 256 --out results/eval_batch

For each mode the batch doubles from 1 (1, 2, 4, ... ``--max-batch``) until a batch does not fit
(``torch.cuda.OutOfMemoryError``) or the limit is reached. Each batch size generates one warm-up batch and
then ``--repeats`` timed batches of distinct queries (the median is reported) with ``bench/inference.py``'s
``generate_batch``: 3 beams, exactly 10 new tokens (random weights would stop anywhere), image tokens
suppressed. Base and ICL run with stock sdpa attention, the student with random non-zero MimIC heads
through the MimIC attention function, as ``bench/inference.py`` measures batch 1. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed batches (the weights included). Prompt building is not
timed (``bench/inference.py`` reports it). The table lists, per mode: queries/s at each batch, the best
queries/s and its batch, and the largest batch that fit; the JSON keeps every row.

``--tiny`` runs the 2-layer float32 test model on the CPU (a smoke test of the script, no figure to keep).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Report, build_model, machine, set_attention  # noqa: E402
from inference import eval_prompts, median_batch_seconds, random_student  # noqa: E402


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def sweep(loaded, prompts_for, suppress, max_batch: int, repeats: int) -> list[dict]:
    """Rows {batch, queries_per_s, ms_per_query, peak_gib} for batch 1, 2, 4, ... until one does not fit."""
    rows, batch = [], 1
    while batch <= max_batch:
        prompts = prompts_for((repeats + 1) * batch)
        batches = [prompts[i * batch : (i + 1) * batch] for i in range(repeats + 1)]
        try:
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            reset = (lambda: torch.cuda.reset_peak_memory_stats(loaded.device)) if loaded.device.type == "cuda" else None
            seconds = median_batch_seconds(loaded, batches, suppress, reset)  # peak memory of the timed batches
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch": batch, "oom": True})
            break
        rows.append({"batch": batch, "queries_per_s": batch / seconds, "ms_per_query": 1e3 * seconds / batch,
                     "peak_gib": peak_gib(loaded.device)})
        print(f"  batch {batch}: {batch / seconds:.2f} queries/s, peak {rows[-1]['peak_gib']:.1f} GiB", flush=True)
        batch *= 2
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="idefics2-8b")
    ap.add_argument("--shots", type=int, nargs="*", default=[8, 32], help="ICL modes (0 shots = zero-shot)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="timed batches per size (after one warm-up)")
    ap.add_argument("--tiny", action="store_true", help="the 2-layer float32 test model (smoke test)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/eval_batch")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    from pipeline.runtime import wrap_model
    from pipeline.tasks import load_task

    print(machine(), flush=True)
    model, processor = build_model(args.model, device, args.tiny)
    loaded = wrap_model(model, processor, args.model, device=device)
    task = load_task("shapes_vqa")
    tok = processor.tokenizer
    suppress = [i for i in (tok.convert_tokens_to_ids(t) for t in ("<image>", "<fake_token_around_image>"))
                if i is not None and i != tok.unk_token_id]
    report = Report(f"{args.model} evaluation batch sweep, 3 beams")
    report.extra["args"] = vars(args)
    built: dict[int, list] = {}

    def prompts_for(shots: int):
        def take(n: int) -> list:
            if len(built.get(shots, [])) < n:
                built[shots] = eval_prompts(loaded, task, shots, n)[0]
            return built[shots][:n]
        return take

    modes = [("zero-shot", 0, False), ("MimIC student", 0, True)] + [(f"{k}-shot ICL", k, False) for k in args.shots]
    results = {}
    for name, shots, student in modes:
        print(f"{name}:", flush=True)
        set_attention(loaded.model, "sdpa")
        if student:
            with random_student(loaded):
                rows = sweep(loaded, prompts_for(shots), suppress, args.max_batch, args.repeats)
        else:
            rows = sweep(loaded, prompts_for(shots), suppress, args.max_batch, args.repeats)
        set_attention(loaded.model, "sdpa")
        results[name] = rows
        fit = [r for r in rows if not r.get("oom")]
        for r in fit:
            report.add(f"{name} B{r['batch']} queries/s", r["queries_per_s"], "queries/s",
                       ref=f"{name} B1 queries/s" if r["batch"] > 1 else None)
        if fit:
            best = max(fit, key=lambda r: r["queries_per_s"])
            report.add(f"{name} best queries/s (batch {best['batch']})", best["queries_per_s"], "queries/s",
                       ref=f"{name} B1 queries/s")
            report.add(f"{name} largest batch that fit", fit[-1]["batch"], "queries",
                       note="out of memory at the next" if rows[-1].get("oom") else f"--max-batch {args.max_batch}")
            report.add(f"{name} peak memory at batch {fit[-1]['batch']}", fit[-1]["peak_gib"], "GiB")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.extra["rows"] = results
    report.save(out / "eval_batch.json")
    (out / "table.md").write_text(report.table() + "\n")
    print(report.table())
    print(json.dumps({k: [r.get("batch") for r in v] for k, v in results.items()}))


if __name__ == "__main__":
    main()
