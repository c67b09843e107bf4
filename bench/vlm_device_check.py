"""Does the demo VLM compute the same thing on two devices? 8-shot ICL prompts of ``shapes_group_vqa``.

    python bench/vlm_device_check.py --n 24 --devices cpu cuda

For the first ``--n`` eval queries with the pipeline's own 8-shot prompts (``stages.evaluation.build_queries``,
the prompts `pipeline evaluate --modes icl` generates from), in float32:

1. vision features (``model.get_image_features``) of every image of the prompts, device A vs device B;
2. next-token logits at the last prompt position, one prompt at a time, A vs B (max |diff|, argmax agreement);
3. the same logits (and with the stock sdpa attention instead of the routed one) from left-padded batches of ``--batch`` on each device vs one prompt at a time there;
4. greedy answers (``pipeline.forward.generate_batch``, the function evaluate calls) and their VQA accuracy
   on each device, at batch 1 and at ``--batch``.

Prints the library versions and the attention implementation: a difference between two machines can come
from the device or from the libraries, and this separates the two when run on one machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    import transformers

    from pipeline.attention import ATTN_NAME, route_attention
    from pipeline.forward import generate_batch
    from pipeline.metrics import vqa_accuracy
    from pipeline.runtime import load_for_stage
    from pipeline.tasks import load_task
    from stages.evaluation import build_queries

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--devices", nargs=2, default=["cpu", "cuda"])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    task = load_task("shapes_group_vqa")
    examples = list(task.split("eval")[: args.n])
    models = {}
    for dev in args.devices:
        models[dev] = load_for_stage("smollm2-vlm", device=dev, dtype="float32")
    a, b = args.devices
    la = models[a]
    print(f"attention: {la.model.config._attn_implementation}", flush=True)
    queries = build_queries(task, la, examples, args.shots, 0)
    out: dict = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                 "n": len(queries), "devices": args.devices}

    def inputs(dev, qs):
        loaded = models[dev]
        batch = loaded.family.collate([q.prompt.encoded for q in qs], loaded.processor, "left")
        return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}

    with torch.inference_mode():
        # 1. vision features
        batch = inputs(a, queries[:1])
        pix = batch["pixel_values"]
        feats = {}
        for dev in args.devices:
            f = models[dev].model.get_image_features(pixel_values=pix.to(dev))
            f = f.pooler_output if hasattr(f, "pooler_output") else f
            f = torch.cat(list(f)) if isinstance(f, (list, tuple)) else f
            feats[dev] = f.float().cpu()
        out["vision_max_abs_diff"] = float((feats[a] - feats[b]).abs().max())
        out["vision_max_abs"] = float(feats[a].abs().max())
        print(f"1. vision features of {pix.shape[0]} images: max |{a} - {b}| = {out['vision_max_abs_diff']:.3g} "
              f"(max |value| {out['vision_max_abs']:.3g})", flush=True)

        # 2./3. last-position logits
        def last_logits(dev, bs):
            rows = []
            for s in range(0, len(queries), bs):
                batch = inputs(dev, queries[s : s + bs])
                batch.pop("position_ids", None)
                rows.append(models[dev].model(**batch).logits[:, -1].float().cpu())
            return torch.cat(rows)

        single = {dev: last_logits(dev, 1) for dev in args.devices}
        batched = {dev: last_logits(dev, args.batch) for dev in args.devices}
        d = (single[a] - single[b]).abs().max().item()
        agree = (single[a].argmax(-1) == single[b].argmax(-1)).float().mean().item()
        out["logits_1"] = {"max_abs_diff": d, "argmax_agree": agree}
        print(f"2. last logits, one prompt at a time: max |{a} - {b}| = {d:.3g}, argmax agree {100 * agree:.1f}%",
              flush=True)
        for dev in args.devices:
            d = (batched[dev] - single[dev]).abs().max().item()
            agree = (batched[dev].argmax(-1) == single[dev].argmax(-1)).float().mean().item()
            out[f"logits_batch_vs_1_{dev}"] = {"max_abs_diff": d, "argmax_agree": agree}
            print(f"3. {dev}: batch {args.batch} vs 1: max |diff| = {d:.3g}, argmax agree {100 * agree:.1f}%", flush=True)

        # 3b. the stock sdpa attention (not routed through MimIC's function) on each device
        for dev in args.devices:
            m = models[dev].model
            m.set_attn_implementation("sdpa")
            stock = last_logits(dev, 1)
            d = (stock - single[dev]).abs().max().item()
            out[f"logits_stock_vs_routed_{dev}"] = d
            print(f"3b. {dev}: stock sdpa vs routed attention, one prompt at a time: max |diff| = {d:.3g}", flush=True)
            route_attention(m, models[dev].family.attn_implementation(ATTN_NAME))

        # 4. greedy answers
        for dev in args.devices:
            for bs in (1, args.batch):
                preds = []
                for s in range(0, len(queries), bs):
                    texts = generate_batch(models[dev], [q.prompt for q in queries[s : s + bs]],
                                           task.spec.max_new_tokens, 1)
                    preds += [task.postprocess(t) for t in texts]
                acc = 100 * sum(vqa_accuracy(p, q.example.answers) for p, q in zip(preds, queries, strict=True)) / len(queries)
                out[f"accuracy_{dev}_b{bs}"] = acc
                out[f"predictions_{dev}_b{bs}"] = preds
                print(f"4. {dev} batch {bs}: VQA accuracy {acc:.2f}  first answers {preds[:6]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
