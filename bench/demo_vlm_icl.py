"""Zero-shot vs k-shot ICL of the demo VLM (``smollm2-vlm``) on held-out rendered scenes.

    python bench/demo_vlm_icl.py --shots 0 1 4 8 --n 100 --beams 1

Prompts are the pipeline's own: ``pipeline.prompts.build_prompt`` with the task's templates
(``Question:{question} Short answer:`` / `` {answer}``), demonstrations drawn from the support split
by ``pipeline.tasks.sampling.sample_demonstrations`` (seed ``--seed``), ``family.collate(..., "left")``.
Generation: greedy or ``--beams`` beams, at most the task's 10 new tokens, stopping at a newline;
the prediction is ``task.postprocess`` of the new text, scored with ``pipeline.metrics.vqa_accuracy``.
Queries are the first ``--n`` of the eval split (scenes never used to train the tower/projector).
``--text-oracle`` replaces every image (demonstrations and query) by its scene's caption, e.g.
``Two shapes: a red circle and a blue square.`` (group scenes: ``three red circles``), through the same model: the accuracy SmolLM2 reaches
when it is *told* the scene, an upper bound for what a frozen-LM VLM can draw from these prompts.

Measured on 2 CPU cores (n = 200, seed 0), VQA accuracy at 0 / 1 / 4 / 8 shots:

    shapes_group_vqa (default; chance 27.3 uniform, 36.0 best constant)
      smollm2-vlm, greedy         0.5 / 40.0 / 59.0 / 65.5   (8-shot: count 92, shape 53, colour 44)
      SmolLM2 + text oracle       8-shot 68.3 (n = 120)
    --task shapes_vqa (chance 27.4 uniform, 40.0 best constant; weights trained on mixed scenes only)
      smollm2-vlm, greedy         0.0 / 17.0 / 31.5 / 41.5   (8-shot: count 63, kind_count 49, shape 31, colour 27)
      smollm2-vlm, 3 beams        0.0 / 14.5 / 31.0 / 41.5
      SmolLM2 + text oracle       0.0 / 20.0 / 42.0 / 40.0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.families import family_for  # noqa: E402
from pipeline.families.base import pad_token_id, tokenizer_of  # noqa: E402
from pipeline.metrics import vqa_accuracy  # noqa: E402
from pipeline.prompts import build_prompt  # noqa: E402
from pipeline.tasks import load_task  # noqa: E402
from pipeline.tasks.sampling import sample_demonstrations  # noqa: E402
from pipeline.tasks.synthetic import is_group, scene_captions  # noqa: E402


def question_type(question: str) -> str:
    """``count`` / ``kind_count`` / ``shape`` / ``color`` as in ``pipeline.tasks.synthetic``."""
    if question.startswith("How many shapes"):
        return "count"
    if question.startswith("How many"):
        return "kind_count"
    return "shape" if question.startswith("What shape") else "color"



ANSWER_OPTIONS = {"color": ("red", "green", "blue", "yellow"), "shape": ("circle", "square", "triangle"),
                  "count": ("1", "2", "3", "4"), "kind_count": ("1", "2", "3", "4")}
"""Every answer a question type can have: the chance baselines guess among these."""


def chance_baselines(queries) -> dict[str, float]:
    """``uniform``: expected accuracy of a uniform guess among the type's answers; ``constant``: the
    best single answer per question type (an oracle prior, e.g. always "1" for "How many circles")."""
    by_type = defaultdict(list)
    for q in queries:
        by_type[question_type(q.question)].append(q)
    uniform = constant = 0.0
    for qtype, qs in by_type.items():
        per_option = [sum(vqa_accuracy(o, q.answers) for q in qs) for o in ANSWER_OPTIONS[qtype]]
        uniform += sum(per_option) / len(per_option)
        constant += max(per_option)
    return {"uniform": uniform / len(queries), "constant": constant / len(queries)}


def newline_ids(tokenizer) -> list[int]:
    """Every token whose text holds a newline (generation stops on any of them)."""
    return [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]


@torch.inference_mode()
def generate(model, processor, family, prompts, args, stop_ids: list[int]) -> list[str]:
    """Left-padded batched generation; the new text of each prompt, in input order."""
    tok = tokenizer_of(processor)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    out: dict[int, str] = {}
    for start in range(0, len(order), args.batch):
        idx = order[start : start + args.batch]
        batch = family.collate([prompts[i].encoded for i in idx], processor, "left")
        batch.pop("position_ids")  # generate derives cumsum(mask) - 1 itself
        gen = model.generate(**batch, max_new_tokens=args.max_new_tokens, num_beams=args.beams, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=pad_token_id(processor))
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            out[i] = tok.decode(gen[row, width:], skip_special_tokens=True)
    return [out[i] for i in range(len(prompts))]


def scenes_by_id(*splits) -> dict:
    """Example id -> its scene, for ``SceneExamples`` splits."""
    return {i: scene for split in splits for i, scene in zip(split.ids(), split.scenes, strict=True)}


def as_text(example, scenes: dict, style: str):
    """The example with its image replaced by the scene's counted caption (the text oracle)."""
    scene = scenes[example.id]
    caption = scene_captions(scene, style)[2 if style == "mixed" else 0]
    return dataclasses.replace(example, question=f"{caption[0].upper()}{caption[1:]}.\nQuestion:{example.question}",
                               image=None)


def run_cell(model, processor, task, queries, shots: int, args, stop_ids) -> dict:
    family = family_for(model.config)
    support = task.split("support")
    spec = dataclasses.replace(task.spec, prompt="{question} Short answer:") if args.text_oracle else task.spec
    style = "group" if all(is_group(s) for s in support.scenes) else "mixed"
    scenes = scenes_by_id(support, task.split("eval")) if args.text_oracle else None
    prompts = []
    for q in queries:
        demos = [support[j] for j in sample_demonstrations(support, q, shots, args.seed)]
        answers = [task.demo_answer(d) for d in demos]
        if args.text_oracle:
            q, demos = as_text(q, scenes, style), [as_text(d, scenes, style) for d in demos]
        prompts.append(build_prompt(family, processor, spec, q, demos, answers, None))
    start = time.perf_counter()
    raw = generate(model, processor, family, prompts, args, stop_ids)
    seconds = time.perf_counter() - start
    preds = [task.postprocess(r) for r in raw]
    scores = [vqa_accuracy(p, q.answers) for p, q in zip(preds, queries, strict=True)]
    by_type = defaultdict(list)
    for q, s in zip(queries, scores, strict=True):
        by_type[question_type(q.question)].append(s)
    return {"shots": shots, "n": len(queries), "accuracy": sum(scores) / len(scores), "seconds": round(seconds, 1),
            "predictions": [{"id": q.id, "question": q.question, "answer": q.answers[0], "generated": r, "score": s}
                            for q, r, s in zip(queries, raw, scores, strict=True)],
            "by_type": {t: round(sum(v) / len(v), 3) for t, v in sorted(by_type.items())},
            "prompt_tokens": sum(len(p.input_ids) for p in prompts) / len(prompts),
            "samples": [(q.question, q.answers[0], r) for q, r in zip(queries[:8], raw[:8], strict=True)]}


def load(args):
    """(model, processor, description): the alias (built on first use), a directory, or SmolLM2 + --weights."""
    if args.weights is None:
        from pipeline.demo_vlm import ALIAS, ensure_demo_vlm
        from pipeline.models import load_model

        name = str(ensure_demo_vlm()) if args.model == ALIAS else args.model
        model, processor, source = load_model(name)
        return model, processor, f"{args.model} ({source.path}, {source.fingerprint[:19]})"
    from safetensors.torch import load_file

    from pipeline.demo_vlm import assemble, base_lm_dir

    model, processor = assemble(base_lm_dir(), load_file(str(args.weights)))
    return model, processor, f"SmolLM2 + {args.weights}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-vlm", help="alias or model directory")
    parser.add_argument("--weights", type=Path, help="assemble SmolLM2 + this tower/projector file instead")
    parser.add_argument("--text-oracle", action="store_true",
                        help="replace every image by its scene's caption (what SmolLM2 does given perfect text)")
    parser.add_argument("--task", default="shapes_group_vqa", help="shapes_group_vqa or shapes_vqa")
    parser.add_argument("--shots", nargs="+", type=int, default=[0, 1, 4, 8])
    parser.add_argument("--n", type=int, default=100, help="eval queries (the first n of the eval split)")
    parser.add_argument("--seed", type=int, default=0, help="demonstration sampling seed")
    parser.add_argument("--beams", type=int, default=1, help="1 = greedy; 3 = the paper's harness")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor, what = load(args)
    print(f"model {what} loaded in {time.perf_counter() - start:.1f}s", flush=True)
    task = load_task(args.task)
    queries = list(task.split("eval")[: args.n])
    stop_ids = newline_ids(tokenizer_of(processor)) + [tokenizer_of(processor).eos_token_id]
    chance = chance_baselines(queries)
    print(f"chance: uniform guess per type {100 * chance['uniform']:.1f}, best constant per type "
          f"{100 * chance['constant']:.1f}", flush=True)
    results = []
    for shots in args.shots:
        cell = run_cell(model, processor, task, queries, shots, args, stop_ids)
        results.append(cell)
        print(f"  {shots}-shot  acc {100 * cell['accuracy']:.1f}  {cell['by_type']}  "
              f"{cell['prompt_tokens']:.0f} tokens/prompt  {cell['seconds']}s", flush=True)
        for question, answer, raw in cell["samples"][:4]:
            print(f"      {question!r}: expected {answer!r}, generated {raw!r}")
    print(f"\n| shots | VQA accuracy (n={len(queries)}, beams={args.beams}) | color | shape | count | kind_count |")
    print("|---|---|---|---|---|---|")
    for r in results:
        t = r["by_type"]
        print(f"| {r['shots']} | {100 * r['accuracy']:.1f} | " + " | ".join(
            f"{100 * t.get(k, 0):.0f}" for k in ("color", "shape", "count", "kind_count")) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "chance": chance,
                                         "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
