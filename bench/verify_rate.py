"""Read rate of `pipeline inspect STORE --verify` (``TeacherStore.verify(full=True)``: every chunk read,
decoded and checksummed by dask threads) against a plain sequential read of the same files (`cat FILES >
/dev/null`), in the same run.

    python bench/verify_rate.py --gb 2 --out results/verify_rate.json    # builds /tmp/verify-rate.zarr first
    python bench/verify_rate.py --store cache/vqav2.zarr                 # an existing store, left as found

The store is built through the store's own API (``create_store`` + ``write_shard``) from a pool of random
bf16 states (standard normal, so they compress like real states: ~1.4x) of the Idefics2-8B geometry (32
layers x 4096 hidden, T_max 64 aligned tokens: 16.8 MB per sample, 16 samples per shard); ``--gb`` is the
size of those states (the hs array's nbytes), the size on disk is printed. Nothing is dropped from the page
cache: each read says which share of the files' pages was resident before it (mincore), so a figure is a
cold-disk, a warm-cache or a mixed one. Order: cat (as found) -> verify -> cat (warm) -> inspect's norm pass
(``per_layer_mean_norm``, the other full read `pipeline inspect` does) -> the disk itself, read with O_DIRECT
(`dd iflag=direct`, which bypasses the page cache instead of dropping it).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import mmap
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from harness import Report, machine

from pipeline.store import SampleRecord, StoreLayout, create_store, open_store, per_layer_mean_norm

POOL = 8  # distinct random samples, cycled: generating 2 GB of normals would take longer than verifying it
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_fraction(files: list[Path]) -> float:
    """Share of the files' pages in the page cache now (mincore on a read-only mapping; reads nothing)."""
    resident = total = 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        pages = math.ceil(size / _PAGE)
        # a private (copy-on-write) mapping: ctypes needs a writable buffer for its address; nothing is written
        with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
            vec = (ctypes.c_ubyte * pages)()
            start = ctypes.c_char.from_buffer(m)
            ok = _LIBC.mincore(ctypes.byref(start), ctypes.c_size_t(size), vec) == 0
            del start  # release the export before the mapping closes
            if not ok:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            resident += sum(b & 1 for b in bytes(vec))
            total += pages
    return resident / max(total, 1)


def random_states(t: int, layers: int, hidden: int, seed: int) -> torch.Tensor:
    """(t, layers, hidden) bf16 standard-normal states."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((t, layers, hidden), dtype=np.float32)).bfloat16()


def build(path: Path, gb: float, t_max: int, layers: int, hidden: int) -> None:
    """A complete store of ~gb GB of bf16 states, every sample T_max tokens (no padding), written shard by shard."""
    n = max(1, round(gb * 1e9 / (t_max * layers * hidden * 2)))
    store = create_store(path, StoreLayout(n, t_max, layers, hidden, shots=1),
                         {"model": "bench/random", "task": "verify_rate", "shots": 1, "layer_target": "mlp"})
    pool = [random_states(t_max, layers, hidden, seed) for seed in range(POOL)]
    tokens = list(range(t_max))
    for s in range(store.n_shards):
        store.write_shard(s, [SampleRecord(pool[i % POOL], tokens, [0], i) for i in store.shard_samples(s)])


def data_files(store_path: Path) -> list[Path]:
    """Every chunk and shard file of the store (what a full verify reads), in path order."""
    return sorted(p for p in store_path.glob("*/c/**/*") if p.is_file())


def cat_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def direct_seconds(files: list[Path]) -> float:
    """Read every file with O_DIRECT (`dd iflag=direct`): the disk's rate, bypassing the page cache without
    dropping anything from it: what a cold-cache read could reach at best."""
    start = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"], check=True)
    return time.perf_counter() - start


def cache_state(fraction: float) -> str:
    return f"page cache {'warm' if fraction > 0.99 else 'cold' if fraction < 0.01 else 'mixed'}: " \
           f"{100 * fraction:.0f}% of the pages resident before"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, help="an existing store to measure (default: build one)")
    ap.add_argument("--gb", type=float, default=2.0, help="GB of bf16 states of the built store (default 2)")
    ap.add_argument("--path", type=Path, default=Path("/tmp/verify-rate.zarr"), help="where to build it")
    ap.add_argument("--t-max", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=None, help="verify's threads (default min(8, CPUs))")
    ap.add_argument("--keep", action="store_true", help="keep the built store")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()

    path, built = args.store or args.path, args.store is None
    if built:
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        build(path, args.gb, args.t_max, args.layers, args.hidden)
        print(f"built {path} in {time.perf_counter() - start:.1f} s", flush=True)
    try:
        measure(path, args.workers, args.out)
    finally:
        if built and not args.keep:
            shutil.rmtree(path, ignore_errors=True)


def measure(path: Path, workers: int | None, out: Path | None) -> None:
    store = open_store(path)
    files = data_files(path)
    nbytes = sum(f.stat().st_size for f in files)
    lay = store.layout
    print(f"store {path}: {lay.n_samples} samples of {lay.t_max}x{lay.n_layers}x{lay.hidden} bf16 "
          f"({lay.n_samples * lay.t_max * lay.n_layers * lay.hidden * 2 / 1e9:.2f} GB of states), "
          f"{len(files)} files, {nbytes / 1e9:.2f} GB on disk; {os.cpu_count()} CPUs", flush=True)
    report = Report("verify read rate")
    report.extra |= {"machine": machine(), "store": str(path), "files": len(files), "bytes_on_disk": nbytes,
                     "samples": lay.n_samples, "workers": workers or min(8, os.cpu_count() or 1)}

    before = resident_fraction(files)
    report.add("cat FILES > /dev/null, first", nbytes / 1e6 / cat_seconds(files), "MB/s", note=cache_state(before))
    resident = resident_fraction(files)
    rep = store.verify(full=True, workers=workers)
    assert rep.bytes_read == nbytes, (rep.bytes_read, nbytes)  # verify read exactly these files
    report.add("verify --full (dask threads, crc32c + blosc decode)", rep.mb_per_s, "MB/s",
               ref="cat FILES > /dev/null, first", note=cache_state(resident))
    resident = resident_fraction(files)
    report.add("cat FILES > /dev/null, again", nbytes / 1e6 / cat_seconds(files), "MB/s", note=cache_state(resident))
    report.add("verify vs warm cat", rep.mb_per_s, "MB/s", ref="cat FILES > /dev/null, again")
    hs_bytes = sum(f.stat().st_size for f in files if f.relative_to(path).parts[0] == "hs")
    start = time.perf_counter()
    per_layer_mean_norm(path)
    norm_rate = hs_bytes / 1e6 / (time.perf_counter() - start)
    report.add("inspect's per-layer norm pass (hs only, float64)", norm_rate, "MB/s",
               ref="cat FILES > /dev/null, again",
               note=cache_state(resident_fraction(files)))
    report.add("dd iflag=direct (the disk, page cache bypassed)", nbytes / 1e6 / direct_seconds(files), "MB/s",
               ref="cat FILES > /dev/null, again")
    report.extra["verify"] = {"bytes_read": rep.bytes_read, "seconds": rep.seconds, "mb_per_s": rep.mb_per_s}
    print(report.table())
    if out:
        report.save(out)


if __name__ == "__main__":
    main()
