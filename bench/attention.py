"""MimIC attention vs the stock sdpa attention function, one layer, forward and forward+backward.

    python bench/attention.py --out results/attention.json     # GPU
    python bench/attention.py --quick                           # CPU smoke test

Both run through transformers' ``sdpa_attention_forward`` (the MimIC function adds mu(q) v on top),
with a bool mask (causal + right padding, as stage 1 and 2 batch), bf16, at the shapes of the
teacher (stage 1) and student (stage 2) forwards of Idefics2-8B (H32/KV8/D128) and Idefics-9B
(H32/KV32/D128). The MimIC figures are printed with their ratio to stock sdpa at the same shape;
MimIC by its eager ops (chunked log Z2), by the fused compiled function, by eager ops around the flex
log Z2 kernel, and as the pipeline picks (``auto``).
"""

from __future__ import annotations

import argparse

import torch
from harness import Report, bench_kernel
from log_z2 import padded_mask
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pipeline import mimic
from pipeline.attention import _STATE_KEY, _HeadState, mimic_attention_forward
from pipeline.methods.base import Switch as _Switch

SHAPES = [  # name, B, H, KV, T, D
    ("Idefics2 teacher 8-shot B8/T740", 8, 32, 8, 740, 128),
    ("Idefics2 student B8/T82", 8, 32, 8, 82, 128),
    ("Idefics-9B teacher 32-shot B8/T560", 8, 32, 32, 560, 128),
    ("Idefics-9B student B8/T20", 8, 32, 32, 20, 128),
]


VARIANTS = {  # name: the MuKernels settings
    "eager chunked": {"flex_min_scores": 10**12},  # the CPU path's ops (one-pass <= 256 queries), on the GPU
    "fused dense": {"path": "one_pass", "fused": True},  # one compiled function, full score matrix
    "eager+flex": {"flex_min_scores": 0},  # eager ops around the flex log Z2 kernel
    "auto": {},  # what the pipeline uses
}


class Stub(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def one_shape(report: Report, kernels: dict, name, bsz, h, kv, t, d, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(bsz, h, t, d, generator=g, device=device).to(dtype)
    k = torch.randn(bsz, kv, t, d, generator=g, device=device).to(dtype)
    v = torch.randn(bsz, kv, t, d, generator=g, device=device).to(dtype)
    mask = padded_mask(bsz, t, t, [t - (b * 7) % max(1, t // 4) for b in range(bsz)], "right", device)
    stock, with_heads = Stub(h // kv), Stub(h // kv)
    heads = mimic.MimicHeads(h, d).to(device)
    with torch.no_grad():
        heads.shift.normal_()
    with_heads.__dict__[_STATE_KEY] = _HeadState(heads, _Switch())
    scale = d**-0.5
    grad_out = torch.randn(bsz, t, h, d, generator=g, device=device).to(dtype)

    def call(module, grad):
        def run():
            qq, kk, vv = (x.requires_grad_(grad) for x in (q, k, v))
            out, _ = (mimic_attention_forward if module is with_heads else sdpa_attention_forward)(
                module, qq, kk, vv, mask, scaling=scale)
            if grad:
                out.backward(grad_out)
        return run

    for grad in (False, True):
        kind = "fwd+bwd" if grad else "fwd"
        base = f"{kind} sdpa {name}"
        report.add(base, bench_kernel(call(stock, grad)), "ms")
        for backend in VARIANTS:
            if backend != "eager chunked" and device != "cuda":
                continue
            heads.kernels = kernels[backend]
            call(with_heads, grad)()  # compile outside the timing
            report.add(f"{kind} mimic[{backend}] {name}", bench_kernel(call(with_heads, grad)), "ms", ref=base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/attention.json")
    ap.add_argument("--quick", action="store_true", help="CPU, small shapes")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    # one MuKernels per variant for every shape: each compiles its kernels once
    kernels = {name: mimic.MuKernels(flex_max_shapes=10**6, **settings) for name, settings in VARIANTS.items()}
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    report = Report("attention: MimIC vs stock sdpa (one layer)")
    shapes = SHAPES if not args.quick else [("tiny", 2, 4, 2, 16, 8)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for shape in shapes:
        one_shape(report, kernels, *shape, device=device, dtype=dtype)
    report.save(args.out)
    print(report.table())


if __name__ == "__main__":
    main()
