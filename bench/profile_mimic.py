"""Where the time of MimIC's per-layer work goes: host (Python + dispatch) vs device, per call.

    python bench/profile_mimic.py --out results/profile.json      # GPU

For one attention call (transformers' sdpa function, and the MimIC function with heads attached,
eager ops or the fused compiled function) at the Idefics2 student shape (B8/H32/KV8/T82/D128,
forward and forward+backward) and at a beam-search decode step (B3, Tq=1, Tkv=90): host time =
wall time of N back-to-back calls without synchronising (the CPU cost when the GPU keeps up),
device time = CUDA-event time of the same N calls after a synchronisation. Then a torch.profiler
table (top ops by self CPU time) of the MimIC call in each mode.
"""

from __future__ import annotations

import argparse
import time

import torch
from attention import Stub
from harness import Report
from log_z2 import padded_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pipeline.attention import _STATE_KEY, _HeadState, mimic_attention_forward
from pipeline.methods.base import Switch as _Switch
from pipeline.mimic import MimicHeads, MuKernels


def host_device_us(fn, n: int = 50) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / n * 1e3


def make(bsz, tq, tkv, grad, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(bsz, 32, tq, 128, generator=g, device=device).bfloat16().requires_grad_(grad)
    k = torch.randn(bsz, 8, tkv, 128, generator=g, device=device).bfloat16().requires_grad_(grad)
    v = torch.randn(bsz, 8, tkv, 128, generator=g, device=device).bfloat16().requires_grad_(grad)
    if tq == 1:
        mask = torch.ones(bsz, 1, 1, tkv, dtype=torch.bool, device=device)
    else:
        mask = padded_mask(bsz, tq, tkv, [tkv - b % 3 for b in range(bsz)], "right", device)
    return q, k, v, mask


def whole_model(report: Report, tables: dict, alias: str) -> None:
    """One student forward (B8, ~80 tokens) of the full-size model: wall time vs the sum of device
    kernel time, stock sdpa vs MimIC heads (fused)."""
    from harness import build_model, set_attention
    from model_overhead import device_batch, student_prompts

    from pipeline.runtime import wrap_model
    from pipeline.students import new_student

    model, processor = build_model(alias)
    loaded = wrap_model(model, processor, alias, device="cuda")
    batch = device_batch(loaded, student_prompts(loaded, 8))
    for mode in ("sdpa", "mimic"):
        set_attention(model, mode)
        student = new_student("mimic", "mimic", model, loaded.geometry) if mode == "mimic" else None

        def fwd():
            with torch.inference_mode():
                model(**batch, use_cache=False, logits_to_keep=1)

        host, dev = host_device_us(fwd, 10)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.self_device_time_total for e in events) / 1e3
        report.add(f"model fwd {mode} host ms", host / 1e3, "ms")
        report.add(f"model fwd {mode} wall ms", dev / 1e3, "ms")
        report.add(f"model fwd {mode} device kernel ms", kernels, "ms", ref=f"model fwd {mode} wall ms")
        tables[f"model fwd {mode}"] = events.table(sort_by="self_cpu_time_total", row_limit=25)
        print(f"== model fwd {mode}\n{tables[f'model fwd {mode}']}", flush=True)
        if student is not None:
            student.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/profile.json")
    ap.add_argument("--model", default=None, help="also profile a student forward of this full-size model")
    args = ap.parse_args()
    report = Report("MimIC per-call host vs device time (us)")
    stock, with_heads = Stub(4), Stub(4)
    heads = MimicHeads(32, 128).cuda()
    kernels = {fused: MuKernels(fused=fused) for fused in (False, True)}
    with torch.no_grad():
        heads.shift.normal_()
    with_heads.__dict__[_STATE_KEY] = _HeadState(heads, _Switch())
    tables = {}
    for shape, (bsz, tq, tkv) in {"student B8/T82": (8, 82, 82), "decode B3/Tq1/Tkv90": (3, 1, 90)}.items():
        for grad in ((False, True) if tq > 1 else (False,)):
            q, k, v, mask = make(bsz, tq, tkv, grad)
            g_out = torch.randn(bsz, tq, 32, 128, device="cuda").bfloat16()
            kind = "fwd+bwd" if grad else "fwd"

            def call(module, tensors=(q, k, v, mask), grad=grad, g_out=g_out):
                def run():
                    fn = mimic_attention_forward if module is with_heads else sdpa_attention_forward
                    out, _ = fn(module, *tensors, scaling=128**-0.5)
                    if grad:
                        out.backward(g_out)
                return run

            base = None
            for mode in ("sdpa", "mimic eager", "mimic fused"):
                heads.kernels = kernels[mode == "mimic fused"]
                fn = call(stock if mode == "sdpa" else with_heads)
                host, dev = host_device_us(fn)
                name = f"{kind} {shape} {mode}"
                report.add(f"host {name}", host, "us", ref=base and f"host {base}")
                report.add(f"device {name}", dev, "us", ref=base and f"device {base}")
                base = base or name
                if mode != "sdpa":
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for _ in range(10):
                            fn()
                        torch.cuda.synchronize()
                    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
                    tables[name] = table
                    print(f"== {name}\n{table}", flush=True)
    if args.model:
        whole_model(report, tables, args.model)
    report.extra["profiles"] = tables
    report.save(args.out)
    print(report.table())


if __name__ == "__main__":
    main()
