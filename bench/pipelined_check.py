"""Are teacher-cache's stored states right when the host does not wait for the device after each batch?

teacher-cache issues a shard's forwards before it waits for the previous shard's device-to-host copies
(``TeacherRunner.launch``; docs/benchmarks.md, eighth round). If a copy were read before it finished, the store
would hold stale page-locked memory: silently wrong states. The CPU tests cannot see that (copies there are
synchronous), so this runs on CUDA: every device-to-host copy is made to start late (``torch.cuda._sleep`` is
queued before it, ~``--delay-ms`` of device time), and the store is compared bit for bit with one written with
every copy waited for at once (``to_host(wait=True)``), top-k log-probs included. Exit 1 on any difference.
That the comparison sees an early read is shown on the same model: with the wait for the copies' event
removed (``torch.cuda.Event.synchronize`` a no-op) and longer delays, the stores must differ.

    python bench/pipelined_check.py                       # the 2-layer test model of Idefics2 on CUDA
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARRAYS = ("hs", "done", "lengths", "token_ids", "icd_ids", "query_ids", "topk_values", "topk_indices")


def cycles_per_ms() -> float:
    """Clock cycles ``torch.cuda._sleep`` spins per millisecond on this GPU (measured)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="idefics2-8b")
    ap.add_argument("--n", type=int, default=24, help="queries")
    ap.add_argument("--delay-ms", type=float, default=30.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    import pipeline.forward as fw
    from pipeline.config import load_config
    from pipeline.runtime import wrap_model
    from pipeline.store import open_store
    from stages import teacher_cache as tc

    device = torch.device("cuda")
    model, processor = build_model(args.model, device, tiny=True)
    loaded = wrap_model(model, processor, args.model, device=device)
    original = fw.to_host
    spin = int(cycles_per_ms() * args.delay_ms)

    def late(t: torch.Tensor, wait: bool = True) -> torch.Tensor:
        torch.cuda._sleep(spin)  # the copy queued after this starts late on the device
        return original(t, wait)

    def at_once(t: torch.Tensor, wait: bool = True) -> torch.Tensor:
        return original(t, True)

    def store(tmp: str, name: str, n: int, to_host) -> object:
        fw.to_host = to_host
        try:
            cfg = load_config(tc.TeacherCacheConfig, task="shapes_vqa", model=args.model, shots=2, n_queries=n,
                              out=str(Path(tmp) / f"{name}.zarr"), shard_size=4, batch_size=2, topk=3,
                              num_workers=2, device="cuda")
            return open_store(tc.run(cfg, loaded=loaded, show_progress=False))
        finally:
            fw.to_host = original

    def differ(a, b) -> list[str]:
        return [k for k in ARRAYS if not np.array_equal(a.read_array(k), b.read_array(k))]

    with tempfile.TemporaryDirectory() as tmp:
        waited = store(tmp, "waited", args.n, at_once)
        issued = store(tmp, "issued", args.n, late)
        bad = differ(waited, issued)
        nonzero = bool(np.abs(issued.read_array("hs").astype(np.float32)).sum() > 0)
        # sensitivity: the same run without waiting for the copies must differ
        spin = int(cycles_per_ms() * 20 * args.delay_ms)
        event_wait = torch.cuda.Event.synchronize
        torch.cuda.Event.synchronize = lambda self: None
        try:
            unwaited = differ(store(tmp, "waited8", 8, at_once), store(tmp, "unwaited", 8, late))
        finally:
            torch.cuda.Event.synchronize = event_wait
    print(f"pipelined check: {args.n} queries, copies delayed {args.delay_ms} ms; arrays that differ: {bad or 'none'}; "
          f"states non-zero: {nonzero}; without waiting for the copies (8 queries, {20 * args.delay_ms} ms): "
          f"{unwaited or 'none'} differ (expected: some)")
    sys.exit(1 if bad or not nonzero or not unwaited else 0)


if __name__ == "__main__":
    main()
