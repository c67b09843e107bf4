"""Every mu path on CUDA against a float64 re-implementation, and the auto choice (GPU check, not timings).

    python bench/mu_paths.py --out results/mu_paths.json      # GPU
    python bench/mu_paths.py --quick                          # CPU: reference and one_pass only

For each case (student and teacher lengths, GQA and MHA, right / left padding and no mask, fp32 and
bf16 inputs) ``MimicHeads.forward`` under ``MuKernels(path=...)`` for reference, one_pass, one_pass
fused (compiled), flex and auto is compared with mu(q) v computed here in float64 from the paper's
formula, values and gradients in q, k, v (the shift) and f. Then: ``auto`` picks flex for a long
sequence and one_pass for a short one, ``choose`` leaves the compiled-shape budget as it was, and
a second ``MuKernels`` (a second student in the process) reuses the first one's compiled flex graph
(torch._dynamo's unique-graph counter does not grow).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from pipeline.mimic import MimicHeads, MuKernels

CASES = [  # name, B, H, KV, Tq, Tkv, D, padding
    ("student B4/T82 GQA right", 4, 8, 2, 82, 82, 64, "right"),
    ("student B4/T82 MHA left", 4, 8, 8, 82, 82, 64, "left"),
    ("student decode Tq1/Tkv90", 3, 8, 2, 1, 90, 64, None),
    ("teacher B2/T740 GQA right", 2, 8, 2, 740, 740, 64, "right"),
    ("teacher B2/T600 no mask", 2, 8, 2, 600, 600, 64, None),
]


def padded(bsz: int, q_len: int, kv_len: int, side: str | None, device) -> torch.Tensor | None:
    if side is None:
        return None
    mask = (torch.arange(kv_len, device=device)[None] <= torch.arange(kv_len - q_len, kv_len, device=device)[:, None])
    mask = mask[None, None].repeat(bsz, 1, 1, 1)
    for b in range(bsz):
        n = kv_len - 9 * b
        if side == "right":
            mask[b, ..., n:] = False
        else:
            mask[b, ..., : kv_len - n] = False
    return mask


def reference64(q, k, mask, heads: MimicHeads, scale: float) -> torch.Tensor:
    """mu(q) v (B, Tq, H, D) in float64, straight from Eq. 6-7 with the keys sdpa attends to."""
    bsz, n_heads, q_len, _ = q.shape
    kv = k.double().repeat_interleave(n_heads // k.shape[1], dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), kv) * scale
    if mask is None:  # sdpa's top-left causal rule (pipeline.mimic.implicit_mask)
        visible = torch.ones(q_len, kv.shape[2], dtype=torch.bool, device=q.device)
        if q_len > 1:
            visible = torch.arange(kv.shape[2], device=q.device)[None] <= torch.arange(q_len, device=q.device)[:, None]
        visible = visible[None, None]
    else:
        visible = mask
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1)
    valid = visible.expand_as(scores).any(-1)
    f = torch.einsum("bhtd,hd->bht", q.double(), heads.f_weight.double()) + heads.f_bias.double()[None, :, None]
    mu = torch.where(valid, torch.sigmoid(f - torch.where(valid, lse, torch.zeros_like(lse))), torch.zeros_like(lse))
    return (mu[..., None] * heads.shift.double()[None, :, None]).transpose(1, 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_case(name, bsz, h, kv, tq, tkv, d, side, dtype, device, paths, out: dict) -> bool:
    g = torch.Generator(device=device).manual_seed(hash(name) % 2**31)
    q = torch.randn(bsz, h, tq, d, generator=g, device=device).to(dtype)
    k = torch.randn(bsz, kv, tkv, d, generator=g, device=device).to(dtype)
    mask = padded(bsz, tq, tkv, side, device)
    heads = MimicHeads(h, d).to(device)
    with torch.no_grad():
        heads.shift.normal_(generator=g)
    scale = d**-0.5
    w = torch.randn(bsz, tq, h, d, generator=g, device=device, dtype=torch.float64)
    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    want = reference64(qd, kd, mask, heads, scale)
    grads_want = torch.autograd.grad((want * w).sum(), (qd, kd, heads.shift, heads.f_weight))
    ok = True
    for path, fused in paths:
        heads.kernels = MuKernels(path=path, fused=fused, flex_max_shapes=10**6)
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        got = heads(qq, kk, mask, scale)
        grads = torch.autograd.grad((got.double() * w).sum(), (qq, kk, heads.shift, heads.f_weight))
        errs = {"value": rel(got, want), **{f"d{n}": rel(a, b) for n, a, b in zip("qkvf", grads, grads_want, strict=True)}}
        tol = 2e-3 if dtype == torch.float32 else 2e-2  # tf32 / bf16 inputs against float64
        good = all(e < tol for e in errs.values()) and bool(torch.isfinite(got).all())
        ok &= good
        tag = f"{path}{'+fused' if fused else ''} {str(dtype)[6:]} {name}"
        out[tag] = errs
        print(f"{'PASS' if good else 'FAIL'} {tag}: " + ", ".join(f"{k_}={v:.1e}" for k_, v in errs.items()), flush=True)
    return ok


def check_choice(device, out: dict) -> bool:
    long_q = torch.randn(1, 8, 600, 64, device=device)
    short_q = torch.randn(1, 8, 80, 64, device=device)
    kernels = MuKernels()
    before = set(kernels.flex_shapes)
    picks = {"long": kernels.choose(long_q, long_q[:, :2], None, "mimic"),
             "short": kernels.choose(short_q, short_q[:, :2], None, "mimic")}
    pure = kernels.flex_shapes == before
    out["auto picks"] = picks
    ok = picks == {"long": "flex" if device == "cuda" else "reference", "short": "one_pass"} and pure
    print(f"{'PASS' if ok else 'FAIL'} auto picks {picks}; choose left the shape budget as it was: {pure}", flush=True)
    return ok


def check_graph_reuse(out: dict) -> bool:
    """A second student's MuKernels reuses the first one's compiled flex graph."""
    from torch._dynamo.utils import counters

    heads = MimicHeads(8, 64).cuda()
    q = torch.randn(2, 8, 600, 64, device="cuda")
    k = torch.randn(2, 2, 600, 64, device="cuda")
    heads.kernels = MuKernels()
    heads(q, k, None, 0.125)
    first = counters["stats"]["unique_graphs"]
    heads.kernels = MuKernels()
    heads(q, k, None, 0.125)
    second = counters["stats"]["unique_graphs"]
    out["unique graphs after first / second student"] = [first, second]
    ok = second == first
    print(f"{'PASS' if ok else 'FAIL'} compiled flex graphs after one / two students: {first} / {second}", flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/mu_paths.json")
    ap.add_argument("--quick", action="store_true", help="CPU: reference and one_pass only")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for case in CASES if device == "cuda" else [c for c in CASES if c[4] < 200]:
            tq = case[4]
            paths = [("reference", False), ("auto", False)]
            if tq <= 256 or device == "cuda":
                paths.append(("one_pass", False))
            if device == "cuda":
                paths.append(("one_pass", True))
                paths.append(("flex", False))
            ok &= check_case(*case, dtype=dtype, device=device, paths=paths, out=out)
    ok &= check_choice(device, out)
    if device == "cuda":
        ok &= check_graph_reuse(out)
    out["all_pass"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"mu paths: {'ALL PASS' if ok else 'SOME FAIL'}", flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
