"""First-call cost of torch's scaled_dot_product_attention per sequence length, in a fresh process.

Why: in a fresh process (and a machine that never ran them) the first teacher-cache forwards of some padded
lengths took 1-2 s more than the rest (docs/benchmarks.md, sixth round), while later lengths were fast. This
times the first and the second call of sdpa at the language model's attention shape (Idefics2-8B's Mistral:
32 query heads, 8 key-value heads (repeated to 32 with a mask, as transformers does), head size 128, bf16, batch 8) for each length in turn, with a padding mask
(bool, as transformers passes it for a padded batch) and, for a few lengths, causal without a mask, so that
a one-time cost shows against the length (or the length's alignment) that triggered it.

    python bench/sdpa_first_call.py --out results/sdpa_first_call.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="728,727,730,729,731,732,733,734,735,736,737,738,740,744,752,760,768")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    dev, rows = torch.device("cuda"), []
    torch.ones(1, device=dev)  # the context, before anything is timed
    for masked in (True, False):
        for t in [int(x) for x in args.lengths.split(",")][: None if masked else 4]:
            q = torch.randn(args.batch, 32, t, 128, device=dev, dtype=torch.bfloat16)
            # transformers repeats the key-value heads when it passes a mask, and lets sdpa share them without
            k = torch.randn(args.batch, 32 if masked else 8, t, 128, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            if masked:  # causal and right padding: row 0 ends 3 tokens early
                mask = torch.ones(t, t, device=dev, dtype=torch.bool).tril()[None, None].repeat(args.batch, 1, 1, 1)
                mask[0, :, :, t - 3:] = False
                mask[0, :, t - 3:, :] = torch.ones(t, device=dev, dtype=torch.bool)[None]  # padded rows see all
                call = lambda q=q, k=k, v=v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
            else:
                call = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True,  # noqa: E731
                                                                            enable_gqa=True)
            first, second = timed(call), timed(call)
            rows.append({"T": t, "T % 8": t % 8, "mask": masked, "first_ms": round(first, 2),
                         "second_ms": round(second, 3)})
            print(f"| {t} | {t % 8} | {'bool mask' if masked else 'causal'} | {first:.1f} | {second:.3f} |", flush=True)
    # steady speed of each backend that takes a mask, at the first length (is cuDNN worth its first calls?)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t = int(args.lengths.split(",")[0])
    q = torch.randn(args.batch, 32, t, 128, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = torch.ones(t, t, device=dev, dtype=torch.bool).tril()[None, None].repeat(args.batch, 1, 1, 1)
    backends = {}
    for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        with sdpa_kernel(getattr(SDPBackend, name)):
            call = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
            timed(call)
            backends[name] = round(sorted(timed(call) for _ in range(10))[5], 3)
        print(f"steady masked T={t}: {name} {backends[name]} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                       "gpu": torch.cuda.get_device_name(), "rows": rows, "steady_masked_ms": backends}, f, indent=1)


if __name__ == "__main__":
    main()
