"""Teacher store I/O (pipeline.store) against what one GPU step needs. Used by bench/suite.py.

Reads the store stage 1 wrote: one process sample by sample (``TeacherStore.read``), then a
DataLoader with ``workers`` processes (as stage 2 reads it). Writes the same records into a new store
shard by shard in this thread (``write_shard``: pack, blosc-zstd + crc32c, files) and through the
background ``ShardWriter``. MB are MiB of uncompressed bf16 states. The store lies on the machine's
local disk and was just written, so reads come from the page cache (cold-disk reads not measured).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from harness import Report


class _Reader(torch.utils.data.Dataset):
    def __init__(self, path: str):
        self.path, self.store = path, None

    def __len__(self) -> int:
        from pipeline.store import open_store

        return len(open_store(self.path))

    def __getitem__(self, i: int):
        from pipeline.store import open_store

        if self.store is None:
            self.store = open_store(self.path)
        return self.store.read(i).hs


def _first(batch):
    return batch


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_io(report: Report, store_path: Path, workers: int, stage1_rate: float, stage2_rate: float,
             work: Path) -> None:
    from pipeline.store import ShardWriter, create_store, open_store

    store = open_store(store_path)
    n = len(store)
    t0 = time.perf_counter()
    records = [store.read(i) for i in range(n)]
    read_s = time.perf_counter() - t0
    raw = sum(r.hs.numel() * 2 for r in records)
    mb_per_sample = raw / n / 2**20
    report.add("sample size (bf16 states)", mb_per_sample, "MiB")
    report.add("compression ratio on disk", raw / dir_bytes(store_path / "hs"), "x")
    report.add("stage 2 needs (offline samples/s)", stage2_rate, "samples/s")
    report.add("read samples/s, 1 process", n / read_s, "samples/s", ref="stage 2 needs (offline samples/s)")
    loader = torch.utils.data.DataLoader(_Reader(str(store_path)), batch_size=None, num_workers=workers,
                                         collate_fn=_first, prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    report.add(f"read samples/s, DataLoader {workers} workers", n / (time.perf_counter() - t0), "samples/s",
               ref="stage 2 needs (offline samples/s)")
    report.add("stage 1 needs (teacher-cache MiB/s)", stage1_rate * mb_per_sample, "MiB/s")
    for mode in ("write_shard", "ShardWriter"):
        out = work / f"io-{mode}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        new = create_store(out, store.layout, {"bench": mode})
        t0 = time.perf_counter()
        if mode == "write_shard":
            for s in range(new.n_shards):
                new.write_shard(s, [records[i] for i in new.shard_samples(s)])
        else:
            with ShardWriter(new) as writer:
                for s in range(new.n_shards):
                    writer.submit(s, [records[i] for i in new.shard_samples(s)])
        seconds = time.perf_counter() - t0
        report.add(f"write MiB/s ({mode})", raw / 2**20 / seconds, "MiB/s", ref="stage 1 needs (teacher-cache MiB/s)")
        shutil.rmtree(out, ignore_errors=True)
