"""`TeacherStore.verify`: prove a teacher store intact before any stage trusts it.

Kept out of store.py for size. It imports no zarr: every storage access goes through TeacherStore's
private primitives (`_files`, `_read_files`, `_stored_sizes`, ...), so store.py stays the only zarr module,
and the same checks run on a local store and on one behind an fsspec URL (the file listing is the store's
listing: a directory walk, or one object listing with sizes on S3 and the like).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import dask
import numpy as np
from dask.diagnostics import ProgressBar
from numcodecs import CRC32C

from pipeline.store import (
    _DECODE_ERRORS,
    _RECREATE,
    _RESUME,
    DONE,
    HS,
    ICD_IDS,
    LENGTHS,
    QUERY_IDS,
    REQUIRED_ARRAYS,
    TOKEN_IDS,
    TOPK_INDICES,
    TOPK_VALUES,
    StoreError,
    StorePath,
    TeacherStore,
    _fmt_samples,
)

_EMPTY = 2**64 - 1  # an index entry with no data (both offset and length)
_SHOWN = 3  # problems named after the first, to keep the message one readable line


@dataclass(frozen=True)
class VerifyReport:
    """What `TeacherStore.verify` checked. samples: done samples. files: chunk and shard files of done
    samples found on disk. hs_shards: of those, the hs shards (index checked; full: every sample decoded).
    bytes_read: bytes of those files read and checked (of hs shards only the index unless full). seconds:
    wall time. str(): one line saying the store is intact, with the read rate."""

    path: StorePath
    full: bool
    samples: int
    files: int
    hs_shards: int
    bytes_read: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"{self.path}: intact ({'full' if self.full else 'quick'} check): {self.samples} samples, "
                f"{self.files} chunk files, {self.hs_shards} hs shards, {self.bytes_read / 1e6:.3g} MB read in "
                f"{self.seconds:.2f} s ({self.mb_per_s:.3g} MB/s)")


@dataclass(frozen=True)
class _Problem:
    array: str
    key: str
    rows: tuple[int, ...]
    what: str
    detail: str = ""  # the underlying error, spelled out for the first problem only

    def short(self) -> str:
        return f"{self.key} ({_fmt_samples(self.rows)}) {self.what}"

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        kind = "shard" if self.array == HS else "chunk"
        return f"{self.array} {kind} {self.short()}{detail}"


def _raise(path: StorePath, problems: list[_Problem]) -> None:
    rest = problems[1:]
    more = "" if not rest else (f" (and {len(rest)} more: {'; '.join(p.short() for p in rest[:_SHOWN])}"
                                f"{'; ...' if len(rest) > _SHOWN else ''})")
    raise StoreError(f"{path} is corrupt: {problems[0]}{more}; {_RECREATE}")


def _by_file(store: TeacherStore, name: str, bad: np.ndarray, what) -> list[_Problem]:
    """One problem per file of `name` holding samples where `bad` is set; what(rows) -> description."""
    out = []
    for key, rows in store._files(name):
        hit = [i for i in rows if bad[i]]
        if hit:
            out.append(_Problem(name, key, tuple(hit), what(hit)))
    return out


def _index_problem(key: str, rows: range, needed: list[int], blob: bytes | None, data_end: int) -> _Problem | None:
    # Hand-parsed because zarr has no public reader for a shard's index. Its layout is fixed by the zarr v3
    # sharding spec (and pinned by TeacherStore._metadata_problems): at the end of the file an (offset,
    # nbytes) uint64 little-endian pair per inner chunk (here one sample), both 2**64-1 for none, then crc32c.
    if blob is None:  # gone between listing and reading
        return _Problem(HS, key, tuple(needed), "is missing though its samples are done")
    try:
        pairs = np.frombuffer(CRC32C().decode(blob), "<u8").reshape(-1, 2)
    except (RuntimeError, ValueError) as e:
        return _Problem(HS, key, tuple(needed), "has a corrupt index: the file is truncated or damaged", str(e))
    empty = [i for i in needed if int(pairs[i - rows.start, 0]) == _EMPTY]
    if empty:
        return _Problem(HS, key, tuple(empty), "has no data for these done samples in its index (zarr would "
                        "read zeros)")
    beyond = [i for i in needed if int(pairs[i - rows.start, 0]) + int(pairs[i - rows.start, 1]) > data_end]
    if beyond:
        return _Problem(HS, key, tuple(beyond), "is truncated: its index points past the end of its data")
    return None


def _check_hs_shard(store: TeacherStore, key: str, samples: Sequence[int],
                    lengths: Sequence[int | None]) -> list[_Problem]:
    """Decode every sample of one shard, one at a time (bounded memory); a length (None: unknown) also
    checks that the states past it are zero padding."""
    failed, padded, error = [], [], None
    for i, t in zip(samples, lengths, strict=True):
        try:
            x = store._read_rows(HS, range(i, i + 1))  # one inner chunk: read, checksummed, decoded
        except _DECODE_ERRORS as e:
            failed.append(i)
            error = error or e
            continue
        if t is not None and x[0, t:].any():
            padded.append(i)
    out = []
    if failed:
        out.append(_Problem(HS, key, tuple(failed), "failed its checksum or decode", str(error)))
    if padded:
        out.append(_Problem(HS, key, tuple(padded), "has non-zero padding past the samples' lengths (hs and "
                            "lengths disagree)"))
    return out


def verify_store(store: TeacherStore, *, full: bool, progress: bool, allow_incomplete: bool,
                 workers: int | None) -> VerifyReport:
    """See `TeacherStore.verify`."""
    start = time.perf_counter()
    fresh = TeacherStore(store.path, "r")  # metadata as on disk now, not as when `store` was opened
    meta = fresh._metadata_problems()
    if fresh.layout != store.layout:
        meta.insert(0, f"its layout changed since it was opened ({store.layout} -> {fresh.layout})")
    if meta:
        raise StoreError(f"{store.path} has metadata this code did not write ({'; '.join(meta)}); it was "
                         f"edited or is corrupt: {_RECREATE}")
    path, n = store.path, fresh.layout.n_samples
    done, bad = fresh._read_files(DONE)
    problems = [_Problem(DONE, key, tuple(rows), "failed its checksum or decode", str(err))
                for key, rows, err in bad]
    done = done.astype(bool)  # samples of an unreadable done chunk count as not done: reported above
    sizes = fresh._stored_sizes()
    names = [name for name in (*REQUIRED_ARRAYS, TOPK_VALUES, TOPK_INDICES) if name in fresh._arrays]
    usable = {name: done.copy() for name in names}  # done samples whose chunk of the array reads
    found, present = _presence(fresh, names, done, sizes, usable)
    problems += found
    found, shards = _shard_indexes(fresh, [(key, rows, needed) for name, key, rows, needed in present
                                           if name == HS], sizes)
    problems += found
    values = {}
    for name in names:
        if name not in (HS, DONE):
            values[name], bad = fresh._read_files(name)
            for key, rows, err in bad:
                usable[name][rows.start:rows.stop] = False
                needed = tuple(i for i in rows if done[i])
                if needed:
                    problems.append(_Problem(name, key, needed, "failed its checksum or decode", str(err)))
    problems += _value_problems(fresh, values, usable)
    if problems:
        _raise(path, problems)
    n_done = int(done.sum())
    if n_done < n and not allow_incomplete:
        raise StoreError(f"{path} is incomplete: {n_done} of {n} samples done; {_RESUME}")
    index_nbytes = fresh._hs_index_nbytes()
    nbytes = sum(sizes[key] for name, key, _, _ in present if name != HS) + index_nbytes * len(shards)
    if full:
        lengths = values[LENGTHS]
        known = usable[LENGTHS] & (lengths >= 1) & (lengths <= fresh.layout.t_max)
        tasks = [dask.delayed(_check_hs_shard, pure=False)(
                     fresh, key, needed, [int(lengths[i]) if known[i] else None for i in needed])
                 for key, needed in shards]
        with ProgressBar() if progress else nullcontext():
            found = dask.compute(*tasks, scheduler="threads",
                                 num_workers=workers or min(8, os.cpu_count() or 1))
        problems = [p for shard in found for p in shard]
        if problems:
            _raise(path, problems)
        nbytes += sum(sizes[key] - index_nbytes for key, _ in shards)
    return VerifyReport(path, full, n_done, len(present), len(shards), nbytes, time.perf_counter() - start)


def _presence(store: TeacherStore, names: list[str], done: np.ndarray, sizes: dict[str, int],
              usable: dict[str, np.ndarray]) -> tuple[list[_Problem], list[tuple[str, str, range, list[int]]]]:
    """Every chunk file a done sample needs is on disk (`usable` cleared where not); (problems, (array,
    key, samples, done samples) of each file there)."""
    problems, present = [], []
    for name in names:
        for key, rows in store._files(name):
            needed = [i for i in rows if done[i]]
            if needed and key not in sizes:
                problems.append(_Problem(name, key, tuple(needed), "is missing though its samples are done"))
                usable[name][rows.start:rows.stop] = False
            elif needed:
                present.append((name, key, rows, needed))
    return problems, present


def _shard_indexes(store: TeacherStore, hs_files: list[tuple[str, range, list[int]]],
                   sizes: dict[str, int]) -> tuple[list[_Problem], list[tuple[str, list[int]]]]:
    """Each hs shard's index, read alone (bytes, not the shard); (problems, (key, done samples) of the
    shards whose index is sound)."""
    index_nbytes = store._hs_index_nbytes()
    problems = [_Problem(HS, key, tuple(needed), f"is truncated: {sizes[key]} bytes, less than its "
                         f"{index_nbytes}-byte index") for key, _, needed in hs_files if sizes[key] < index_nbytes]
    hs_files = [f for f in hs_files if sizes[f[0]] >= index_nbytes]
    blobs = store._read_suffixes([key for key, _, _ in hs_files], index_nbytes)
    sound = []
    for (key, rows, needed), blob in zip(hs_files, blobs, strict=True):
        problem = _index_problem(key, rows, needed, blob, sizes[key] - index_nbytes)
        problems += [problem] if problem else []
        sound += [] if problem else [(key, needed)]
    return problems, sound


def _lengths(lengths: np.ndarray, rows: list[int]) -> str:
    return ", ".join(f"length[{i}]={int(lengths[i])}" for i in rows[:3]) + (", ..." if len(rows) > 3 else "")


def _value_problems(store: TeacherStore, values: dict[str, np.ndarray],
                    usable: dict[str, np.ndarray]) -> list[_Problem]:
    """Values that decode fine but cannot be what teacher-cache wrote, named by sample."""
    t_max, lengths = store.layout.t_max, values[LENGTHS]
    problems = _by_file(store, LENGTHS, usable[LENGTHS] & ((lengths < 1) | (lengths > t_max)),
                        lambda hit: f"has lengths outside 1..{t_max} ({_lengths(lengths, hit)})")
    known = usable[LENGTHS] & (lengths >= 1) & (lengths <= t_max)  # rows below are judged against lengths
    real = np.arange(t_max)[None, :] < lengths[:, None]  # (N, T): a token, not padding

    def padded(name: str, a: np.ndarray, what: str) -> list[_Problem]:  # a: (N, T, ...), >= 0 then -1
        r = real.reshape(real.shape + (1,) * (a.ndim - 2))
        bad = ~np.where(r, a >= 0, a == -1).reshape(len(a), -1).all(1)
        return _by_file(store, name, usable[name] & known & bad,
                        lambda hit: f"disagrees with lengths ({_lengths(lengths, hit)}: {what} >= 0 for a "
                                    "sample's tokens, -1 after)")

    problems += padded(TOKEN_IDS, values[TOKEN_IDS], "ids")
    problems += _by_file(store, QUERY_IDS, usable[QUERY_IDS] & (values[QUERY_IDS] < 0),
                         lambda _: "has negative query ids (never written)")
    icd = values[ICD_IDS]
    pad = icd == -1
    ok = (icd >= -1).all(1) & (pad[:, :-1] <= pad[:, 1:]).all(1)  # demonstration ids, then only -1 padding
    problems += _by_file(store, ICD_IDS, usable[ICD_IDS] & ~ok, lambda _: "holds ids that are not ids >= 0 "
                         "then -1 padding")
    if store.layout.topk is not None:
        problems += padded(TOPK_INDICES, values[TOPK_INDICES], "indices")
        stray = ((values[TOPK_VALUES] != 0) & ~real[:, :, None]).any((1, 2))
        problems += _by_file(store, TOPK_VALUES, usable[TOPK_VALUES] & known & stray,
                             lambda hit: f"has non-zero padding past the samples' lengths "
                                         f"({_lengths(lengths, hit)})")
    return problems
