"""Which copies and in-place adds one compiled forward+backward runs, stock vs MimIC, with where they come from.

Why: on the H200 the compiled MimIC fwd+bwd of ``model_overhead.py`` made ~100 more ``cudaMemcpyAsync`` a call
than stock (3 a layer, as many as MimIC's parameters a layer; docs/benchmarks.md, sixth round). This runs the
same call (``model_overhead._fwd_bwd`` through ``torch.compile``, 3 warm-up calls) once under torch.profiler
with stacks and counts ``aten::copy_``, ``aten::clone`` and ``aten::add_`` by input shapes and the first frames
outside torch, for stock sdpa and for MimIC (eager-op kernels, random non-zero parameters).

    python bench/compiled_ops.py --tiny            # the 2-layer test model on the CPU
    python bench/compiled_ops.py --out results/compiled_ops.json   # Idefics2-8B shape, random bf16, on CUDA
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from harness import build_model
from model_overhead import _embed_requires_grad, _fwd_bwd, device_batch, routed, student_prompts

OPS = ("aten::copy_", "aten::clone", "aten::add_")


def count(loaded, batch: dict, routing: str, calls: int = 3) -> list[dict]:
    with routed(loaded, batch, routing, compiled=True) as params:
        hook = _embed_requires_grad(loaded.model)
        try:
            fn = _fwd_bwd(loaded.model, batch, params=params)
            for _ in range(calls):
                fn()
            with torch.profiler.profile(with_stack=True, record_shapes=True) as prof:
                fn()
        finally:
            hook.remove()
    found: collections.Counter = collections.Counter()
    for e in prof.events():
        if e.name in OPS:
            frames = tuple(f for f in (e.stack or []) if "/torch/" not in f)[:3]
            found[(e.name, str(e.input_shapes)[:100], frames)] += 1
    return [{"op": op, "shapes": shapes, "frames": list(frames), "count": n}
            for (op, shapes, frames), n in found.most_common()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="idefics2-8b")
    ap.add_argument("--tiny", action="store_true", help="the 2-layer float32 test model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from pipeline.runtime import wrap_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = build_model(args.model, device, args.tiny)
    loaded = wrap_model(model, processor, args.model, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = device_batch(loaded, student_prompts(loaded, args.batch))
    report = {}
    for routing in ("sdpa", "mimic-eager"):
        report[routing] = count(loaded, batch, routing)
        print(f"== {routing}: " + ", ".join(f"{op} {sum(r['count'] for r in report[routing] if r['op'] == op)}"
                                            for op in OPS))
        for row in report[routing][:12]:
            print(f"  {row['count']:4d} {row['op']} {row['shapes']} {' <- '.join(row['frames'])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
