"""Measure zero-shot vs k-shot ICL of the embedded SmolLM2-135M on the built-in text tasks.

    python bench/icl_text_tasks.py --tasks antonyms plurals --shots 0 4 8 --n 50 --seed 0

Prompts are built here directly from token ids (docs/architecture.md §4): ``[BOS] demo_1 ... demo_k query`` with
each demonstration ``"{input} -> {answer}\\n"`` and the query ``"{input} ->"``, every segment
tokenised on its own. Demonstrations are drawn per query from the support split with a seed
(nested: the 4-shot demos are the first 4 of the 8-shot ones). Generation is greedy (``--beams 1``)
or beam search, at most 10 new tokens, cut at the first newline; exact match after lower-casing,
stripping and dropping a trailing period.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import load_model  # noqa: E402
from pipeline.tasks.builtin_text import TEXT_TASK_NAMES, load_text_task_splits  # noqa: E402


def normalise(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip().rstrip(".").strip().lower()


def demos_for(query_id: str, support: tuple, k_max: int, seed: int) -> list:
    """``k_max`` support examples for one query (never the query itself), stable per (seed, id)."""
    pool = [e for e in support if e.id != query_id]
    return random.Random(f"{seed}:{query_id}").sample(pool, min(k_max, len(pool)))


def prompt_ids(tokenizer, demos: list, query) -> list[int]:
    ids = [tokenizer.bos_token_id]
    for demo in demos:
        ids += tokenizer(f"{demo.question} -> {demo.answers[0]}\n", add_special_tokens=False).input_ids
    return ids + tokenizer(f"{query.question} ->", add_special_tokens=False).input_ids


def newline_token_ids(tokenizer) -> list[int]:
    """Every token whose text holds a newline: generation may stop on any of them."""
    return [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], args, stop_ids: list[int]) -> list[str]:
    """Left-padded batched generation; returns the decoded continuations in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, str] = {}
    for start in range(0, len(order), args.batch):
        idx = order[start : start + args.batch]
        width = max(len(prompts[i]) for i in idx)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=10,
            do_sample=False,
            num_beams=args.beams,
            eos_token_id=stop_ids,
            pad_token_id=pad,
        )
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return [outputs[i] for i in range(len(prompts))]


def run_cell(model, tokenizer, task: str, shots: int, args, stop_ids: list[int]) -> dict:
    splits = load_text_task_splits(task)
    queries = list(splits[args.split])
    queries = random.Random(args.seed).sample(queries, min(args.n, len(queries)))
    k_max = max(args.shots)
    prompts = [prompt_ids(tokenizer, demos_for(q.id, splits["support"], k_max, args.seed)[:shots], q) for q in queries]
    start = time.perf_counter()
    generated = generate(model, tokenizer, prompts, args, stop_ids)
    seconds = time.perf_counter() - start
    correct = [normalise(g) == q.answers[0].strip().lower() for g, q in zip(generated, queries, strict=True)]
    errors = [(q.question, q.answers[0], normalise(g)) for g, q, ok in zip(generated, queries, correct, strict=True) if not ok]
    return {"task": task, "shots": shots, "n": len(queries), "correct": sum(correct),
            "accuracy": sum(correct) / len(queries), "seconds": seconds, "errors": errors}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TEXT_TASK_NAMES), choices=TEXT_TASK_NAMES)
    parser.add_argument("--shots", nargs="+", type=int, default=[0, 4, 8])
    parser.add_argument("--n", type=int, default=50, help="queries per task (sampled from --split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="eval", choices=("support", "train", "eval"))
    parser.add_argument("--beams", type=int, default=1, help="1 = greedy; 3 = the paper's harness")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--show-errors", type=int, default=0, help="print this many mistakes per cell")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer, source = load_model(args.model)
    print(f"model {source.alias} ({source.path}, {source.fingerprint[:19]}) loaded in {time.perf_counter() - start:.1f}s")
    stop_ids = newline_token_ids(tokenizer) + [tokenizer.eos_token_id]
    results = []
    for task in args.tasks:
        for shots in args.shots:
            cell = run_cell(model, tokenizer, task, shots, args, stop_ids)
            results.append(cell)
            print(f"  {task:<13} {shots}-shot {cell['correct']:>3}/{cell['n']}  {cell['seconds']:.1f}s", flush=True)
            for question, answer, got in cell["errors"][: args.show_errors]:
                print(f"      {question!r}: expected {answer!r}, got {got!r}")
    header = "| task | " + " | ".join(f"{k}-shot" for k in args.shots) + " | seconds |"
    print(f"\n{header}\n|---|" + "---|" * (len(args.shots) + 1))
    for task in args.tasks:
        cells = [r for r in results if r["task"] == task]
        accs = " | ".join(f"{100 * r['accuracy']:.0f}% ({r['correct']}/{r['n']})" for r in cells)
        print(f"| {task} | {accs} | {sum(r['seconds'] for r in cells):.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
