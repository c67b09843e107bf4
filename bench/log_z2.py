"""log Z2 on CUDA: the compiled flex_attention path against the exact chunked path (docs/architecture.md §3).

    python bench/log_z2.py --out results/log_z2.json            # GPU: checks, then timings
    python bench/log_z2.py --quick                               # CPU smoke test (chunked only)

Checks (fresh random inputs per case, float64 reference on upcast inputs): fp32 and bf16 inputs,
right and left padding (fully masked rows), GQA 32/8 and MHA, causal via mask None, a KV cache
(Tq < Tkv), decode (Tq = 1) with a padded bool mask; values and gradients in query and key.
Timings (median of CUDA-event timings, triton do_bench): forward and forward+backward at
B4/H32/KV8/T2048/D128, the Idefics2 student shape B8/T82, the teacher shape B8/T740, decode,
and a length sweep around ``MuKernels.flex_min_scores``; every flex figure is printed
with its ratio to the chunked figure of the same shape.
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import Report, bench_kernel, machine  # noqa: F401  (sys.path set by harness)

from pipeline import mimic

KERNELS = mimic.MuKernels(flex_max_shapes=10**6)
"""One compiled flex kernel and block-mask cache for every call of this script (which compiles many shapes)."""


def reference(q, k, mask, scale):
    """float64 logsumexp over visible keys and the valid rows; q (B,H,Tq,D), k (B,Hkv,Tkv,D)."""
    groups = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(groups, dim=1)
    scores = q.double() @ kk.transpose(-1, -2) * scale
    tq, tkv = q.shape[2], k.shape[2]
    if mask is None:  # sdpa's rule without a mask: top-left causal over the first Tq key slots (one query: all)
        mask = torch.arange(tkv, device=q.device)[None] <= torch.arange(tq, device=q.device)[:, None]
        mask = mask[None, None] if tq > 1 else torch.ones_like(mask)[None, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    valid = mask.any(-1).expand(q.shape[0], q.shape[1], tq)
    lse = torch.logsumexp(scores, -1)
    return torch.where(valid, lse, torch.zeros_like(lse)), valid


def padded_mask(bsz, tq, tkv, lengths, side, device):
    """bool (B,1,Tq,Tkv): causal (queries at the end of the keys) and key padding on ``side``."""
    causal = torch.arange(tkv, device=device)[None] <= torch.arange(tkv - tq, tkv, device=device)[:, None]
    mask = causal[None, None].repeat(bsz, 1, 1, 1)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, ..., n:] = False
        else:
            mask[b, ..., : tkv - n] = False
    return mask


def make_case(bsz, heads, kv_heads, tq, tkv, dim, dtype, mask_kind, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    q = (torch.randn(bsz, heads, tq, dim, generator=g, device=device) * 1.5).to(dtype)
    k = (torch.randn(bsz, kv_heads, tkv, dim, generator=g, device=device) * 1.5).to(dtype)
    lengths = [tkv - (b * 37) % max(1, tkv // 2) for b in range(bsz)]
    if mask_kind == "none":
        mask = None
    elif mask_kind == "full":  # decode: one query sees every (unpadded) key
        mask = torch.ones(bsz, 1, tq, tkv, dtype=torch.bool, device=device)
        for b, n in enumerate(lengths):
            mask[b, ..., : tkv - n] = False
    else:
        mask = padded_mask(bsz, tq, tkv, lengths, mask_kind, device)
    return q, k, mask


CASES = [  # name, B, H, KV, Tq, Tkv, D, mask; few distinct padded shapes (each costs a compilation)
    ("prefill right-pad GQA", 3, 32, 8, 300, 300, 128, "right"),
    ("prefill left-pad GQA (empty rows)", 3, 32, 8, 300, 300, 128, "left"),
    ("prefill causal mask=None", 3, 32, 8, 300, 300, 128, "none"),
    ("static-cache prefill Tq=5 mask=None", 3, 32, 8, 5, 300, 128, "none"),
    ("KV cache Tq=7 left-pad", 3, 32, 8, 7, 300, 128, "left"),
    ("decode Tq=1 left-pad", 3, 32, 8, 1, 300, 128, "full"),
    ("prefill MHA right-pad (Idefics1)", 3, 32, 32, 300, 300, 128, "right"),
]
FP32_CASES = 2  # fp32 inputs: the first cases only (the same kernels in another dtype)


def rel(a, b, valid):
    a, b = a.double()[valid], b.double()[valid]
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(device: str, backends: list[str], report: Report) -> bool:
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for i, (name, bsz, h, kv, tq, tkv, d, mk) in enumerate(CASES):
            if dtype == torch.float32 and i >= FP32_CASES and device == "cuda":
                continue
            q, k, mask = make_case(bsz, h, kv, tq, tkv, d, dtype, mk, device, seed=100 + i)
            scale = d**-0.5
            ref, ref_valid = reference(q, k, mask, scale)
            w = torch.randn(ref.shape, device=device, dtype=torch.float64) * ref_valid
            qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
            lse_d, _ = reference(qd, kd, mask, scale)
            gq_ref, gk_ref = torch.autograd.grad((lse_d * w).sum(), (qd, kd))
            for backend in backends:
                qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
                lse, valid = mimic.masked_log_z2(qq, kk, mask, scale, backend=backend, kernels=KERNELS)
                gq, gk = torch.autograd.grad((lse.double() * w).sum(), (qq, kk))
                errs = {"lse_max_abs": float((lse.double() - ref).abs()[ref_valid].max()) if ref_valid.any() else 0.0,
                        "dq_rel": rel(gq, gq_ref, slice(None)), "dk_rel": rel(gk, gk_ref, slice(None)),
                        "valid_equal": bool(torch.equal(valid, ref_valid)),
                        "finite": bool(torch.isfinite(lse).all() and torch.isfinite(gq).all() and torch.isfinite(gk).all())}
                # fp32: accumulation order and tf32 (~3e-4); bf16: gradients are returned in bf16 (~2e-3)
                tol = 2e-3 if dtype == torch.float32 else 1e-2
                good = (errs["valid_equal"] and errs["finite"] and errs["lse_max_abs"] < 2e-2
                        and errs["dq_rel"] < tol and errs["dk_rel"] < tol)
                ok &= good
                tag = f"check {backend} {str(dtype)[6:]} {name}"
                report.extra[tag] = errs
                print(f"{'PASS' if good else 'FAIL'} {tag}: " + ", ".join(f"{k_}={v:.2e}" if isinstance(v, float) else
                                                                         f"{k_}={v}" for k_, v in errs.items()), flush=True)
    return ok


TIMING_SHAPES = [  # name, B, H, KV, T, D, mask ("right" = causal + right padding)
    ("B4/H32/KV8/T2048/D128", 4, 32, 8, 2048, 128, "right"),
    ("teacher B8/T740 (Idefics2 8-shot)", 8, 32, 8, 740, 128, "right"),
    ("student B8/T82 (Idefics2)", 8, 32, 8, 82, 128, "right"),
    ("student B8/T20 (Idefics1)", 8, 32, 32, 20, 128, "right"),
]
SWEEP = [256, 512]


def time_shape(report: Report, name, bsz, h, kv, t, d, mk, device, grad: bool, tq=None):
    tq = t if tq is None else tq
    q, k, mask = make_case(bsz, h, kv, tq, t, d, torch.bfloat16, mk, device, seed=7)
    scale = d**-0.5
    q.requires_grad_(grad)
    k.requires_grad_(grad)
    g = torch.randn(bsz, h, tq, device=device)

    def run(backend, fresh_mask):
        def call():
            m = mask.clone() if (fresh_mask and mask is not None) else mask
            lse, _ = mimic.masked_log_z2(q, k, m, scale, backend=backend, kernels=KERNELS)
            if grad:
                torch.autograd.grad(lse, (q, k), g)
        return call

    kind = "fwd+bwd" if grad else "fwd"
    t0 = time.perf_counter()
    run("flex", False)()
    torch.cuda.synchronize()
    report.extra[f"compile+first call s {kind} {name}"] = time.perf_counter() - t0
    chunked = bench_kernel(run("chunked", False))
    report.add(f"{kind} chunked {name}", chunked, "ms")
    report.add(f"{kind} flex (block mask cached) {name}", bench_kernel(run("flex", False)), "ms",
               ref=f"{kind} chunked {name}")
    report.add(f"{kind} flex (block mask built) {name}", bench_kernel(run("flex", True)), "ms",
               ref=f"{kind} chunked {name}")


def timings(report: Report, device: str) -> None:
    for shape in TIMING_SHAPES:
        for grad in (False, True):
            time_shape(report, *shape, device=device, grad=grad)
    for t in (100, 800):
        time_shape(report, f"decode B3/Tq=1/Tkv={t}", 3, 32, 8, t, 128, "full", device, grad=False, tq=1)
    for t in SWEEP:
        time_shape(report, f"sweep B8/H32/KV8/T{t}", 8, 32, 8, t, 128, "right", device, grad=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/log_z2.json")
    ap.add_argument("--quick", action="store_true", help="CPU: check the chunked path only, no timings")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # this script compiles many shapes on purpose
    report = Report("log Z2: flex vs chunked")
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    backends = ["chunked", "flex"] if device == "cuda" else ["chunked"]
    ok = check(device, backends, report)
    report.extra["checks_pass"] = ok
    print(f"checks {'PASS' if ok else 'FAIL'}", flush=True)
    if device == "cuda":
        timings(report, device)
    report.save(args.out)
    print(report.table())


if __name__ == "__main__":
    main()
