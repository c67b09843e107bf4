"""The cost of collating one Idefics2 8-shot teacher batch on the host, alone and beside a busy Python thread.

    python bench/collate_cost.py [--batch 8] [--images 9] [--repeats 5]

Stage 1's collate thread took 0.62-0.71 s per such batch on the H200 host (docs/benchmarks.md, third
round) whatever the bytes. This script times ``pipeline.families.idefics2.collate_crops`` (one copy per
sample) against the per-crop copies it replaced (written out below as they were), on synthetic crops of
Idefics2's size (378 px, bf16 pixels, bool masks), each alone and while another thread runs small tensor
ops in a loop (a stand-in for the main thread's eager forward). It prints ms per batch and the ratios.
No model runs; the figures are this machine's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.families.base import Encoded  # noqa: E402
from pipeline.families.idefics2 import IDEFICS2, collate_crops  # noqa: E402


def per_crop(batch: list[Encoded]) -> dict:
    """The collation before commit 237cf94: one copy per crop and per mask."""
    crops = [image["pixel_values"] for enc in batch for image in enc.images]
    _, c, h, w = crops[0].shape
    n_max = max(sum(i["pixel_values"].shape[0] for i in enc.images) for enc in batch)
    pixels = torch.zeros(len(batch), n_max, c, h, w, dtype=crops[0].dtype)
    mask = torch.zeros(len(batch), n_max, h, w, dtype=torch.bool)
    for i, enc in enumerate(batch):
        start = 0
        for image in enc.images:
            pix, pmask = image["pixel_values"], image["pixel_attention_mask"]
            n = pix.shape[0]
            pixels[i, start : start + n, :, : pix.shape[-2], : pix.shape[-1]] = pix
            mask[i, start : start + n, : pix.shape[-2], : pix.shape[-1]] = pmask
            start += n
    return {"pixel_values": pixels, "pixel_attention_mask": mask}


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the collate thread is one thread
    g = torch.Generator().manual_seed(0)
    batch = [Encoded([1, 2, 3], [{"pixel_values": torch.randn(1, 3, 378, 378, generator=g).to(torch.bfloat16),
                                  "pixel_attention_mask": torch.ones(1, 378, 378, dtype=torch.bool)}
                                 for _ in range(args.images)]) for _ in range(args.batch)]
    new = collate_crops(IDEFICS2, None, batch, {})
    old = per_crop(batch)
    assert all(torch.equal(new[k], old[k]) for k in old), "the two collations differ"
    stop = threading.Event()

    def busy() -> None:
        x = torch.zeros(4)
        while not stop.is_set():
            x.add_(1)

    rows = {}
    for name, fn in (("per crop", lambda: per_crop(batch)), ("per sample", lambda: collate_crops(IDEFICS2, None, batch, {}))):
        rows[f"{name}, alone"] = timed(fn, args.repeats)
        stop.clear()
        thread = threading.Thread(target=busy)
        thread.start()
        try:
            rows[f"{name}, beside a busy thread"] = timed(fn, args.repeats)
        finally:
            stop.set()
            thread.join()
    base = rows["per crop, alone"]
    print(f"| collate {args.batch} x {args.images} crops (378 px, bf16) | ms per batch | vs per crop, alone |")
    print("|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
