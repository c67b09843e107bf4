"""One writer at a time per store, run directory and results folder.

A lock is an exclusive ``fcntl.flock`` on a small file; the kernel releases it when its process
ends, however it ends (SIGKILL included), so a lock left by a dead process is simply taken over by
the next one — there is no stale-lock heuristic to get wrong. The file holds the holder's pid, host
and command line, only to name the holder in the refusal. Lock files are never deleted: deleting a
lock file while another process waits on it would let two processes hold "the" lock.

Under ``accelerate launch`` every rank writes the same store or run, so rank 0 takes the lock and
tells the other ranks whether it got it (``held_on_rank0``); all ranks then refuse alike.

A store at an fsspec URL (s3://, gs://, ...) cannot be flocked: object storage has no locks that die with
their holder, and a lock object in the bucket would need exactly the stale-lock heuristic (leases,
expiry) this module refuses. Its lock is a local file keyed by the URL (``remote_lock_file``): it keeps
two writers on one machine apart, and nothing more. One writer per remote store across machines is the
user's responsibility (one ``accelerate launch`` over several nodes is one writer: its ranks split the
shards, and rank 0 alone takes the lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.config import UserError

LOCK_SUFFIX = ".lock"


class LockedError(UserError):
    """Another process holds the lock of a directory this command would write."""


class DirLock:
    """An exclusive, non-blocking lock for ``what`` (a store, run or results directory).

    ``lock_file``: where the lock lives (``<store>.lock`` beside a store, which ``--overwrite`` may
    delete as a whole; a file inside run and results directories, which are never deleted whole).
    """

    def __init__(self, what: Path | Any, lock_file: Path) -> None:
        self.what = Path(what) if isinstance(what, str) and not _is_url(what) else what  # a URL stays one
        self.lock_file = Path(lock_file)
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        """Take the lock or raise ``LockedError`` naming the holder; idempotent while held."""
        if self._fd is not None:
            return self
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(
                f"{self.what} is in use by another process ({holder}); wait for it to finish, or write "
                "elsewhere (another --out / --name / --results-dir)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 400, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def _is_url(store: Any) -> bool:
    text = str(store)
    return not isinstance(store, Path) and "://" in text and not text.startswith("file://")


def remote_lock_file(url: str) -> Path:
    """The local lock file of the store at ``url`` (see the module docstring: this machine only), in a
    per-user directory of the system's temporary directory. Keyed by the URL as its filesystem spells it,
    so that spellings of one store (s3a:// for s3://, a trailing slash) share one lock."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        url = fs.unstrip_protocol(root)
    except Exception:  # noqa: BLE001 (an unknown protocol, a filesystem that cannot be made: the store's own
        pass  # access names the problem on one line; the lock then keys the URL as written)
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mimic-pipeline-locks-{os.getuid()}" / f"{digest}{LOCK_SUFFIX}"


def store_lock(store: Path | Any) -> DirLock:
    """The lock of a teacher store: ``<store>.lock`` beside it; for a URL, ``remote_lock_file``."""
    if _is_url(store):
        return DirLock(store, remote_lock_file(str(store)))
    store = Path(store)
    return DirLock(store, store.with_name(store.name + LOCK_SUFFIX))


def dir_lock(directory: Path) -> DirLock:
    """The lock of a run or results directory: ``<directory>/.lock``."""
    directory = Path(directory)
    return DirLock(directory, directory / LOCK_SUFFIX)


@contextmanager
def held_on_rank0(lock: DirLock, rank: int, world: int) -> Iterator[None]:
    """Hold ``lock`` on rank 0 for the block; with several ranks rank 0's outcome is broadcast, so
    that every rank raises ``LockedError`` alike instead of some waiting forever at a barrier."""
    error = None
    if rank == 0:
        try:
            lock.acquire()
        except LockedError as err:
            error = str(err)
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise LockedError(error)
    try:
        yield
    finally:
        if rank == 0:
            lock.release()
