"""Teacher store: the on-disk format of stage 1; the only module that imports zarr (its integrity check,
`TeacherStore.verify`, lives in pipeline/store_verify.py and reaches storage through this module).

A zarr v3 group, one row per query (N rows, S rows per shard, right-padded to T_max tokens):

    hs           uint16  (N, T_max, L, D)  bf16 bits (zarr has no bf16; float16 is lossy); pad 0
                                           chunk (1, T_max, L, D), shard (S, T_max, L, D)
    done         bool    (N,)              chunk S (one writer per chunk); set after the shard's data
    lengths      int32   (N,)              aligned tokens T of each query
    token_ids    int32   (N, T_max)        pad -1
    icd_ids      int32   (N, k)            demonstrations: indices into attrs["support_split"]; pad -1
    query_ids    int32   (N,)              index of the query in attrs["split"]
    topk_values  float32 (N, T_max, K)     optional teacher top-k logits (KL students); pad 0
    topk_indices int32   (N, T_max, K)     optional; pad -1

Every chunk is blosc(zstd, clevel 1, shuffle) then crc32c: lossless, and a flipped byte fails loudly.
Writers store every chunk of a written shard, even one equal to the fill value, so that a chunk that is
not on disk is always a lost one (zarr would otherwise read it back as the fill value, silently).

A store is a local directory or an fsspec URL (s3://bucket/x.zarr, gs://, memory://, ...; `store_location`).
Local paths keep their pathlib code; a URL is a `StoreURL`, which gives the same few path operations
through fsspec, and zarr reaches it through `zarr.storage.FsspecStore`. Credentials and endpoints come
from the filesystem's own configuration (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_ENDPOINT_URL or ~/.aws; any fsspec option through fsspec's config, e.g. FSSPEC_S3_ENDPOINT_URL).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import math
import posixpath
import queue
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import torch
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from pipeline.config import UserError, changed_keys

if TYPE_CHECKING:
    from pipeline.store_verify import VerifyReport

SCHEMA_VERSION = 1
ENCODING = "bf16-bits-in-uint16"
HS, DONE, LENGTHS, TOKEN_IDS = "hs", "done", "lengths", "token_ids"
ICD_IDS, QUERY_IDS, TOPK_VALUES, TOPK_INDICES = "icd_ids", "query_ids", "topk_values", "topk_indices"
REQUIRED_ARRAYS = (HS, DONE, LENGTHS, TOKEN_IDS, ICD_IDS, QUERY_IDS)
QUERY_SPLIT_ATTR, SUPPORT_SPLIT_ATTR = "split", "support_split"
RESERVED_ATTRS = ("schema_version", "encoding")
VOLATILE_ATTRS = ("created", "code_version")  # left out of fingerprint comparisons
LARGE_SAMPLE_BYTES = 4 * 2**20
SHARD_LARGE, SHARD_SMALL = 16, 64  # samples per shard above / below LARGE_SAMPLE_BYTES
_RESUME = "re-run the same teacher-cache command to resume"
_RECREATE = "re-create it with `pipeline teacher-cache ... --overwrite`"
_DECODE_ERRORS = (ValueError, RuntimeError, OSError)  # crc32c mismatch, blosc failure, unreadable file


class StoreError(UserError):
    """A teacher store is missing, foreign, incomplete, corrupt or unwritable; one line, with the fix."""


class StoreURL:
    """A store behind an fsspec URL (``s3://bucket/x.zarr``): the few pathlib operations the store code
    uses on its location (exists, ``/``, iterdir, is_file, read_text, name), done through fsspec, so that a
    local store keeps its own pathlib code unchanged. (universal_pathlib generalises this; it is not a
    dependency, and the store needs these operations only.) Listings are re-read on every call: the
    filesystem's listing cache would hide objects another process wrote. A failure to reach the storage
    (no credentials, no endpoint, no bucket access) is a one-line StoreError."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __repr__(self) -> str:
        return f"StoreURL({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoreURL) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, key: str) -> StoreURL:
        return StoreURL(f"{self.url}/{key}")

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.split("://", 1)[-1])

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    def _call(self, op: Callable[[Any, str], Any]) -> Any:
        try:
            fs, root = fsspec.core.url_to_fs(self.url)  # fsspec caches the filesystem instance
        except (ImportError, ValueError):  # not checked by store_location(check=False)
            store_location(self.url)  # the one-line error naming the package or the protocol
            raise
        try:
            fs.invalidate_cache()
            return op(fs, root)
        except FileNotFoundError:
            raise
        except Exception as e:  # botocore / aiohttp / auth errors are not OSErrors: name them on one line
            raise StoreError(f"cannot reach {self.url} ({type(e).__name__}: {e}); check the credentials and "
                             "endpoint (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)") from e

    def exists(self) -> bool:
        """Whether anything is stored there. Object storage has no empty directories, but a bucket exists
        with no object in it: an empty bucket (or memory:// directory) counts as absent, as a prefix
        with no objects does, so that a store may be written at a bucket's root."""
        def holds(fs: Any, root: str) -> bool:
            return fs.exists(root) and (not fs.isdir(root) or bool(fs.ls(root, detail=False)))

        return self._call(holds)

    def check_bucket(self) -> None:
        """Before a write: the bucket of an object store exists and is visible (StoreError, one line), so that a
        typo is named before a model loads rather than when the first object is written."""
        def bucket_exists(fs: Any, root: str) -> bool:
            split = getattr(fs, "split_path", None)  # object stores: (bucket, key, version)
            return split is None or fs.exists(split(root)[0])

        if not self._call(bucket_exists):
            raise StoreError(f"cannot write {self.url}: its bucket does not exist or is not visible with these "
                             "credentials; create it first or check the name")

    def is_dir(self) -> bool:
        return self._call(lambda fs, root: fs.isdir(root))

    def is_file(self) -> bool:
        return self._call(lambda fs, root: fs.isfile(root))

    def iterdir(self) -> list[StoreURL]:
        names = self._call(lambda fs, root: fs.ls(root, detail=False))
        return [self / posixpath.basename(n.rstrip("/")) for n in names]

    def read_text(self) -> str:
        return self._call(lambda fs, root: fs.cat_file(root)).decode()

    def rmtree(self) -> None:
        """Delete everything stored there; a store at a bucket's root (s3://bucket) leaves the bucket, which
        fsspec's recursive rm would delete too (and the store could not be made again)."""
        def rm(fs: Any, root: str) -> None:
            split = getattr(fs, "split_path", None)  # object stores: (bucket, key, version)
            if split is not None and not split(root)[1]:
                names = fs.ls(root, detail=False)
                if names:
                    fs.rm(names, recursive=True)
            else:
                fs.rm(root, recursive=True)

        self._call(rm)


StorePath = Path | StoreURL


def _filesystem_class(protocol: str, url: str) -> None:
    """Refuse a protocol fsspec does not know, or whose package is not installed, naming the package."""
    from fsspec.registry import known_implementations

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0] or "its fsspec package"
        raise UserError(f"{url}: the {protocol}:// protocol needs the {package} package ({e}); install it "
                        f"(pip install {package}) or use a local path") from None
    except ValueError:
        raise UserError(f"{url}: unknown protocol {protocol}://; use a local path or an fsspec URL "
                        "(s3://, gs://, az://, memory://, ...)") from None


def store_location(path: str | Path | StoreURL, check: bool = True) -> StorePath:
    """Where a store lives: a local Path (also for file://), or a StoreURL for any other fsspec URL, whose
    protocol is checked here unless not ``check`` (an unknown one, or one whose package is missing, is a
    UserError; unchecked, the first access fails with the same package named). A URL naming no path
    (``s3://``) or with an empty segment (``s3://b//x``) is a UserError either way."""
    if isinstance(path, (Path, StoreURL)):
        return path
    text = str(path)
    protocol, rest = fsspec.core.split_protocol(text)
    if protocol is None or "://" not in text:
        return Path(text)
    if protocol in ("file", "local") and "::" not in text:
        return Path(rest)
    for part in text.split("::") if check else []:
        inner = fsspec.core.split_protocol(part)[0]
        if inner:
            _filesystem_class(inner, text)
    where = rest.split("::")[0].strip("/")
    if not where or "//" in where:  # s3fs reads `b//x` as `b/x` in listings but not in gets: never the same store
        raise UserError(f"{text}: " + ("names no bucket or path" if not where else "has an empty path segment (//)")
                        + "; give the store's full location, e.g. s3://bucket/vqav2.zarr")
    return StoreURL(text)


def _zarr_store(path: StorePath, mode: str) -> Any:
    """What zarr opens: the local path itself, or an FsspecStore for a URL (its filesystem instance is
    shared, and its listing cache may predate a removal or another process's writes: dropped here)."""
    if isinstance(path, Path):
        return path
    store = FsspecStore.from_url(path.url, read_only=mode == "r")
    store.fs.invalidate_cache()
    return store


def default_shard_size(t_max: int, n_layers: int, hidden: int) -> int:
    """Samples per shard: 16 when one sample's bf16 states exceed 4 MiB (Idefics2: 21.5 MB), else 64."""
    return SHARD_LARGE if t_max * n_layers * hidden * 2 > LARGE_SAMPLE_BYTES else SHARD_SMALL


@dataclass(frozen=True)
class StoreLayout:
    """Shapes of a teacher store.

    n_samples: N queries. t_max: most aligned (query + answer) tokens of any query. n_layers: L.
    hidden: D. shots: k demonstrations per query. shard_size: S samples per shard file (None: by
    bytes, see `default_shard_size`). topk: K teacher logits kept per token (None: not stored).
    """

    n_samples: int
    t_max: int
    n_layers: int
    hidden: int
    shots: int
    shard_size: int | None = None
    topk: int | None = None

    def __post_init__(self) -> None:
        def ok(v: Any, least: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= least

        bad = [f"{k}={getattr(self, k)!r}" for k in ("n_samples", "t_max", "n_layers", "hidden")
               if not ok(getattr(self, k), 1)]
        bad += [] if ok(self.shots, 0) else [f"shots={self.shots!r}"]
        bad += [f"{k}={getattr(self, k)!r}" for k in ("shard_size", "topk")
                if getattr(self, k) is not None and not ok(getattr(self, k), 1)]
        if bad:
            raise ValueError(f"invalid StoreLayout: {', '.join(bad)}; expected positive ints (shots >= 0, "
                             "shard_size/topk may be None)")
        if self.shard_size is None:
            size = min(self.n_samples, default_shard_size(self.t_max, self.n_layers, self.hidden))
            object.__setattr__(self, "shard_size", size)


@dataclass
class SampleRecord:
    """One query's teacher states. hs: bfloat16 (T, L, D); token_ids: (T,) ints; icd_ids: <= k
    demonstration indices; query_id: index in its split; topk_values / topk_indices: (T, K) or None."""

    hs: torch.Tensor
    token_ids: Sequence[int] | torch.Tensor
    icd_ids: Sequence[int]
    query_id: int
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None


def bf16_to_bits(t: torch.Tensor) -> np.ndarray:
    """bfloat16 tensor -> uint16 numpy array of the same bits, same shape."""
    return t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def bits_to_bf16(a: np.ndarray) -> torch.Tensor:
    """uint16 bits -> bfloat16 tensor, bit-exact inverse of `bf16_to_bits`."""
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


def _bits_to_f64(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # float64: no overflow on squaring


def _compressors(typesize: int | None = None) -> list:
    blosc = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=typesize, blocksize=2**20)
    return [blosc, Crc32cCodec()]


def _array_specs(layout: StoreLayout) -> dict[str, tuple]:
    """name -> (shape, dtype, fill_value, chunks, shards) of every array `create_store` makes."""
    n, t, s, k = layout.n_samples, layout.t_max, layout.shard_size, layout.topk
    ld = (layout.n_layers, layout.hidden)
    specs = {HS: ((n, t, *ld), "uint16", 0, (1, t, *ld), (s, t, *ld))}
    small = {DONE: ((n,), "bool", False), LENGTHS: ((n,), "int32", 0), TOKEN_IDS: ((n, t), "int32", -1),
             ICD_IDS: ((n, layout.shots), "int32", -1), QUERY_IDS: ((n,), "int32", -1)}
    if k is not None:
        small |= {TOPK_VALUES: ((n, t, k), "float32", 0.0), TOPK_INDICES: ((n, t, k), "int32", -1)}
    return specs | {name: (shape, dtype, fill, (s, *shape[1:]), None)
                    for name, (shape, dtype, fill) in small.items()}


def _fmt_samples(rows: Sequence[int]) -> str:
    """'sample 3', 'samples 4..7' or 'samples 1, 5, 9'."""
    rows = sorted(int(r) for r in rows)
    if len(rows) == 1:
        return f"sample {rows[0]}"
    if rows[-1] - rows[0] == len(rows) - 1:
        return f"samples {rows[0]}..{rows[-1]}"
    more = f", ... ({len(rows)} in all)" if len(rows) > 6 else ""
    return f"samples {', '.join(map(str, rows[:6]))}{more}"


async def _sizes(store: Any) -> dict[str, int]:
    if isinstance(store, FsspecStore):  # one listing with sizes, not a request per object
        store.fs.invalidate_cache()  # objects written since the last listing must be seen
        prefix = store.path.rstrip("/") + "/"
        found = await store.fs._find(store.path, detail=True, withdirs=False)
        return {k[len(prefix):]: int(v["size"]) for k, v in found.items() if k.startswith(prefix)}
    keys = [k async for k in store.list_prefix("")]
    return dict(zip(keys, await asyncio.gather(*(store.getsize(k) for k in keys)), strict=True))


async def _suffixes(store: Any, keys: Sequence[str], nbytes: int) -> list[bytes | None]:
    proto = default_buffer_prototype()
    bufs = await asyncio.gather(*(store.get(k, proto, SuffixByteRequest(nbytes)) for k in keys))
    return [None if b is None else b.to_bytes() for b in bufs]


def _jsonable(attrs: dict) -> dict:
    return json.loads(json.dumps(attrs, default=str))


def _fingerprint(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k not in RESERVED_ATTRS + VOLATILE_ATTRS}


RUN_UNRECORDED_ATTRS = ("created", "query_example_ids")
"""Store attributes a student's adapter does not copy (``store_settings``): the creation time, and one id
per query (long; the identity below covers both)."""


def store_settings(attrs: dict) -> dict:
    """The store's attributes a student records in its adapter (what made the store, for messages)."""
    return {k: v for k, v in attrs.items() if k not in RUN_UNRECORDED_ATTRS}


def store_identity(attrs: dict) -> dict | None:
    """What identifies the store a run trains on: its creation time and a digest of every attribute. A store
    rebuilt (removed, or ``--overwrite`` with other settings) differs even with the same settings, and a
    run's checkpoint must not be resumed against it. None for no store (``--online`` without one)."""
    if not attrs:
        return None
    digest = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"created": attrs.get("created"), "attrs_sha256": digest}


def create_store(path: str | Path | StoreURL, layout: StoreLayout, attrs: dict) -> TeacherStore:
    """Create an empty store (mode 'w-': an existing path is an error, never wiped); returns it open r+."""
    path = store_location(path)
    clash = sorted(set(attrs) & set(RESERVED_ATTRS))
    if clash:
        raise ValueError(f"attrs may not set {clash}: the store writes them itself")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreError(f"{path} already exists; pass --overwrite to replace it or choose another path")
    meta = {"schema_version": SCHEMA_VERSION, "encoding": ENCODING, **_jsonable(attrs)}
    try:
        group = zarr.open_group(_zarr_store(path, "w-"), mode="w-", attributes=meta)
    except FileExistsError as e:
        raise StoreError(f"{path} already exists; pass --overwrite to replace it or choose another path") from e
    except OSError as e:
        if isinstance(path, Path):
            raise
        raise StoreError(f"cannot create {path} ({type(e).__name__}: {e}); check that the bucket exists and "
                         "is writable with these credentials") from e
    splits = {QUERY_IDS: attrs.get(QUERY_SPLIT_ATTR), ICD_IDS: attrs.get(SUPPORT_SPLIT_ATTR)}
    for name, (shape, dtype, fill, chunks, shards) in _array_specs(layout).items():
        extra = {"shards": shards, "compressors": _compressors(2)} if name == HS else \
            {"compressors": _compressors(), "attributes": _jsonable({"split": splits.get(name)})}
        group.create_array(name, shape=shape, dtype=dtype, fill_value=fill, chunks=chunks, **extra)
    return TeacherStore(path, "r+")


def open_store(path: str | Path | StoreURL, mode: str = "r") -> TeacherStore:
    """Open an existing store, mode 'r' (readers) or 'r+' (resuming writers); checks schema, not completeness."""
    if mode not in ("r", "r+"):
        raise ValueError(f"mode {mode!r}: expected 'r' or 'r+'")
    return TeacherStore(path, mode)


def remove_store(path: str | Path | StoreURL) -> None:
    """Delete a teacher store (for --overwrite); refuses any directory that is not one."""
    path = store_location(path)
    if not path.exists():
        return
    if isinstance(path, Path) and path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty directory holds nothing to lose; create_store makes it again
        return
    try:
        is_store = "schema_version" in json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        is_store = False
    if not is_store:
        raise StoreError(f"refusing to delete {path}: it is not a teacher store (no zarr.json with "
                         "schema_version); remove it by hand if you mean it")
    ours = {"zarr.json", *REQUIRED_ARRAYS, TOPK_VALUES, TOPK_INDICES}
    foreign = sorted(p.name for p in path.iterdir() if p.name not in ours)
    if foreign:  # never delete what teacher-cache did not write
        raise StoreError(f"refusing to replace {path}: it holds files teacher-cache did not write "
                         f"({', '.join(foreign[:5])}); move them out, or write elsewhere with --out")
    if isinstance(path, Path):
        shutil.rmtree(path)
    else:
        path.rmtree()


def _check_schema(path: StorePath, attrs: dict) -> None:
    if "schema_version" not in attrs:
        raise StoreError(f"{path} is a zarr group but not a teacher store (no schema_version attribute); "
                         "point --cache at a store written by `pipeline teacher-cache`")
    if attrs["schema_version"] != SCHEMA_VERSION or attrs.get("encoding") != ENCODING:
        raise StoreError(f"{path} has schema_version {attrs['schema_version']!r} / encoding "
                         f"{attrs.get('encoding')!r}, this code reads {SCHEMA_VERSION} / {ENCODING!r}; "
                         f"{_RECREATE} or use the code version that wrote it")


class TeacherStore:
    """An open teacher store. Readers: `validate()`, then `read(i)` one sample at a time. Writers:
    `pending_shards(rank, world)`, then `write_shard(s, records)` per owned shard (or a ShardWriter).
    Survives fork (zarr resets its event loop) and pickles as (path, mode), reopening on unpickle."""

    def __init__(self, path: str | Path | StoreURL, mode: str = "r") -> None:
        self.path, self.mode = store_location(path), mode
        if not self.path.exists():
            gone = " (memory:// stores live only in the process that wrote them)" \
                if str(self.path).startswith("memory:") else ""
            raise StoreError(f"no teacher store at {self.path}{gone}; run `pipeline teacher-cache ...` first")
        try:
            self._group = zarr.open_group(_zarr_store(self.path, mode), mode=mode)
        except (zarr.errors.BaseZarrError, OSError, ValueError) as e:
            raise StoreError(f"{self.path} is not a zarr group ({type(e).__name__}); point --cache at a "
                             "store written by `pipeline teacher-cache`") from e
        _check_schema(self.path, dict(self._group.attrs))
        local = isinstance(self.path, Path)
        if local:
            members = sorted(p.name for p in self.path.iterdir() if (p / "zarr.json").is_file())
        else:  # one listing, not a request per member: a prefix without zarr.json is skipped below
            members = sorted(p.name for p in self.path.iterdir() if p.name != "zarr.json")
        self._arrays = {}
        for name in members:  # one by one, to name the array whose metadata is damaged
            try:
                node = self._group[name]
            except KeyError:
                if local:
                    raise
                continue
            except (zarr.errors.BaseZarrError, OSError, ValueError) as e:
                raise StoreError(f"{self.path}: {name}/zarr.json cannot be read ({type(e).__name__}: {e}); the "
                                 f"store is corrupt: {_RECREATE}") from e
            if isinstance(node, zarr.Array):  # see the module docstring: r+ writes chunks equal to the fill value
                self._arrays[name] = node.with_config({"write_empty_chunks": True}) if mode == "r+" else node
        missing = [n for n in REQUIRED_ARRAYS if n not in self._arrays]
        if missing:
            raise StoreError(f"{self.path} lacks arrays {missing}; it is corrupt: {_RECREATE}")
        hs = self._arrays[HS]
        topk = self._arrays[TOPK_VALUES].shape[-1] if TOPK_VALUES in self._arrays else None
        try:  # unsharded or mis-shaped arrays are named by verify's metadata check
            shots, per_shard = self._arrays[ICD_IDS].shape[-1], (hs.shards or hs.chunks)[0]
            self.layout = StoreLayout(*hs.shape, shots, per_shard, topk)
        except (TypeError, ValueError) as e:
            raise StoreError(f"{self.path}: hs/zarr.json has shape {hs.shape}, expected (N, T_max, L, D) ({e}); "
                             f"the store is corrupt: {_RECREATE}") from e
        self._cache: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"path": self.path, "mode": self.mode}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["mode"])

    def __len__(self) -> int:
        return self.layout.n_samples

    @property
    def attrs(self) -> dict:
        """Every group attribute: schema_version, encoding and the creator's attrs."""
        return dict(self._group.attrs)

    @property
    def fingerprint(self) -> dict:
        """The creator's attrs minus volatile keys (created, code_version): what must match to reuse."""
        return _fingerprint(self.attrs)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.layout.n_samples / self.layout.shard_size)

    def shard_samples(self, s: int) -> range:
        """Sample indices of shard s."""
        if not 0 <= s < self.n_shards:
            raise IndexError(f"shard {s} out of range: the store has {self.n_shards} shards")
        size = self.layout.shard_size
        return range(s * size, min((s + 1) * size, self.layout.n_samples))

    def pending_shards(self, rank: int = 0, world: int = 1) -> list[int]:
        """Shards owned by `rank` of `world` writers (r, r+W, ...) whose done flags are not all set."""
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"rank {rank} of world {world}: expected 0 <= rank < world")
        done = self.read_array(DONE)
        return [s for s in range(rank, self.n_shards, world)
                if not done[self.shard_samples(s).start:self.shard_samples(s).stop].all()]

    def write_shard(self, s: int, records: Sequence[SampleRecord]) -> None:
        """Write a whole shard, one call per array, then its done flags (a crash in between redoes it)."""
        if self.mode != "r+":
            raise StoreError(f"{self.path} is open read-only; use open_store(path, mode='r+') to write")
        rows = self.shard_samples(s)
        if len(records) != len(rows):
            raise ValueError(f"shard {s} holds samples {rows.start}..{rows.stop - 1}: expected "
                             f"{len(rows)} records, got {len(records)}")
        data = self._pack(s, records)
        try:
            for name, buf in data.items():
                self._arrays[name][rows.start:rows.stop] = buf
            self._arrays[DONE][rows.start:rows.stop] = True  # only once every data array is on disk
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise StoreError(f"out of disk space writing shard {s} of {self.path}; free space and {_RESUME} "
                             "(or write the store elsewhere with teacher-cache --out)") from e

    def _pack(self, s: int, records: Sequence[SampleRecord]) -> dict[str, np.ndarray]:
        lay, n = self.layout, len(records)
        out = {HS: self._buffer(HS, (n, lay.t_max, lay.n_layers, lay.hidden), np.uint16, 0),
               LENGTHS: np.zeros(n, np.int32), TOKEN_IDS: np.full((n, lay.t_max), -1, np.int32),
               ICD_IDS: np.full((n, lay.shots), -1, np.int32), QUERY_IDS: np.zeros(n, np.int32)}
        if lay.topk is not None:
            out[TOPK_VALUES] = np.zeros((n, lay.t_max, lay.topk), np.float32)
            out[TOPK_INDICES] = np.full((n, lay.t_max, lay.topk), -1, np.int32)
        for j, r in enumerate(records):
            tokens = torch.as_tensor(r.token_ids).cpu().numpy()
            t = self._check_record(s, j, r, len(tokens))
            out[HS][j, :t], out[LENGTHS][j], out[TOKEN_IDS][j, :t] = bf16_to_bits(r.hs), t, tokens
            out[ICD_IDS][j, :len(r.icd_ids)], out[QUERY_IDS][j] = list(r.icd_ids), r.query_id
            if lay.topk is not None:
                out[TOPK_VALUES][j, :t] = r.topk_values.detach().float().cpu().numpy()
                out[TOPK_INDICES][j, :t] = r.topk_indices.detach().cpu().numpy()
        return out

    def _buffer(self, name: str, shape: tuple, dtype: Any, fill: int) -> np.ndarray:
        """A packing buffer of this thread, reused shard after shard (filled with ``fill``): a fresh one
        per shard (344 MB for 16 Idefics2 samples) is page-faulted in anew each time, which on the
        benchmark VM also stalls the other threads' page faults. Zarr has encoded it when the write
        returns, so the next shard of the same thread may overwrite it."""
        cached = getattr(_PACKING, name, None)
        if cached is None or cached.shape != shape or cached.dtype != dtype:
            cached = np.empty(shape, dtype)
            setattr(_PACKING, name, cached)
        cached.fill(fill)
        return cached

    def _check_record(self, s: int, j: int, r: SampleRecord, n_tokens: int) -> int:
        lay, t = self.layout, r.hs.shape[0] if r.hs.ndim == 3 else -1
        bad = []
        if r.hs.dtype != torch.bfloat16 or r.hs.ndim != 3 or tuple(r.hs.shape[1:]) != (lay.n_layers, lay.hidden):
            bad.append(f"hs {r.hs.dtype} {tuple(r.hs.shape)}, expected bfloat16 (T, {lay.n_layers}, {lay.hidden})")
        if not 1 <= t <= lay.t_max:
            bad.append(f"T={t}, expected 1..t_max={lay.t_max}")
        if n_tokens != t:
            bad.append(f"{n_tokens} token_ids for T={t} states")
        if len(r.icd_ids) > lay.shots:
            bad.append(f"{len(r.icd_ids)} icd_ids, expected at most shots={lay.shots}")
        topk = [r.topk_values, r.topk_indices]
        if lay.topk is None and any(x is not None for x in topk):
            bad.append("topk given but the store has no topk arrays (layout.topk=None)")
        if lay.topk is not None and any(x is None or tuple(x.shape) != (t, lay.topk) for x in topk):
            bad.append(f"topk_values/topk_indices must both be ({t}, {lay.topk})")
        if bad:
            raise ValueError(f"record {j} of shard {s}: {'; '.join(bad)}")
        return t

    def read_array(self, name: str) -> np.ndarray:
        """A whole array (meant for the small ones: lengths, token_ids, ...); cached in mode 'r'."""
        if name in self._cache:
            return self._cache[name]
        if name not in self._arrays:
            raise KeyError(f"no array {name!r} in {self.path}; valid: {sorted(self._arrays)}")
        value, bad = self._read_files(name)
        if bad:
            key, rows, err = bad[0]
            raise StoreError(f"{self.path} is corrupt: {name} chunk {key} ({_fmt_samples(rows)}) failed its "
                             f"checksum or decode ({err}); {_RECREATE}")
        if self.mode == "r":
            self._cache[name] = value
        return value

    def read(self, i: int) -> SampleRecord:
        """Sample i: hs bfloat16 (T, L, D) bit-exact, token_ids int64 (T,), topk (T, K) if stored."""
        n = self.layout.n_samples
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for a store of {n} samples")
        done = self.read_array(DONE)
        if not done[i]:
            raise StoreError(f"sample {i} of {self.path} is not written ({int(done.sum())} of {n} "
                             f"samples done); {_RESUME}")
        t = int(self.read_array(LENGTHS)[i])
        hs = bits_to_bf16(self._read_sample(HS, i, t))
        icd = self.read_array(ICD_IDS)[i]
        rec = SampleRecord(hs, torch.from_numpy(self.read_array(TOKEN_IDS)[i, :t].astype(np.int64)),
                           [int(x) for x in icd if x >= 0], int(self.read_array(QUERY_IDS)[i]))
        if self.layout.topk is not None:
            rec.topk_values = torch.from_numpy(self._read_sample(TOPK_VALUES, i, t))
            rec.topk_indices = torch.from_numpy(self._read_sample(TOPK_INDICES, i, t).astype(np.int64))
        return rec

    def _read_sample(self, name: str, i: int, t: int) -> np.ndarray:
        try:
            return self._arrays[name][i, :t]  # a plain slice: fancy indexing is ~100x slower
        except _DECODE_ERRORS as e:
            kind = "shard" if name == HS else "chunk"
            raise StoreError(f"sample {i} of {self.path}: {name} {kind} {self._file_key(name, i)} failed its "
                             f"checksum or decode ({e}); the store is corrupt: {_RECREATE}") from e

    def validate(self, expected: dict | None = None) -> None:
        """Check schema, integrity (the cheap checks of `verify(full=False)`: metadata, every chunk file of
        every done sample on disk, the small arrays read and consistent), that every sample is done and
        (if given) that `expected` attrs match. Raises StoreError naming what is wrong and the fix."""
        self.verify(full=False)
        if expected is None:
            return
        diff = self.differences(expected)
        if diff:
            raise StoreError(f"{self.path} was made by a different teacher setup ({'; '.join(diff)}); "
                             f"{_RECREATE} or point --cache at the matching store")

    def differences(self, expected: dict) -> list[str]:
        """``"key: stored X vs expected Y"`` for each fingerprint attribute that differs from ``expected``
        (long values shortened); empty when the store was made by that setup."""
        return changed_keys(self.fingerprint, _fingerprint(_jsonable(expected)), "stored", "expected")

    def verify(self, full: bool = True, progress: bool = False, *, allow_incomplete: bool = False,
               workers: int | None = None) -> VerifyReport:
        """Prove the store intact before anything trusts it; raise a one-line StoreError naming the store,
        the array, the chunk or shard file, the samples affected and the fix, listing every problem found.

        Always (cheap, for every open): metadata re-read from disk (schema, shapes, codecs); every chunk and
        shard file that a done sample needs is on disk; each hs shard's index (checksum, an entry for every
        done sample, within the file); every small array read and checksummed; lengths in 1..T_max,
        token_ids / topk_indices >= 0 before each length and -1 after, topk_values 0 after, query_ids >= 0,
        icd_ids ids then -1 padding. full=True also decodes every hs sample (checksums) and checks its
        padding, one sample at a time per dask worker thread (`workers`, default min(8, CPUs)), so memory
        stays at a few samples however large the store. progress: a dask progress bar for that read.
        An incomplete store raises (resume it) unless allow_incomplete, which checks the done samples only.
        Returns a VerifyReport (samples, files, shards, bytes read, seconds; str() is one line).
        """
        from pipeline.store_verify import verify_store  # it imports this module

        return verify_store(self, full=full, progress=progress, allow_incomplete=allow_incomplete, workers=workers)

    # --- storage primitives for pipeline/store_verify.py (kept here: the only module that imports zarr) ---

    def _objects(self, name: str) -> list[tuple[tuple[slice, ...], str, range]]:
        """(region, key, samples) of every object the array stores (shards for hs), keys relative to the
        store root as zarr names them (`hs/c/0/0/0/0`), in order; none for an array with a zero-length axis."""
        a = self._arrays[name]
        per_file = a.shards or a.chunks
        grid = [0 if n == 0 else math.ceil(n / c) for n, c in zip(a.shape, per_file, strict=True)]
        return [(tuple(slice(c * w, (c + 1) * w) for c, w in zip(coords, per_file, strict=True)),
                 f"{a.path}/{a.metadata.encode_chunk_key(coords)}",
                 range(coords[0] * per_file[0], min((coords[0] + 1) * per_file[0], a.shape[0])))
                for coords in np.ndindex(*grid)]

    def _files(self, name: str) -> list[tuple[str, range]]:
        """(key, samples) of every object the array stores; see `_objects`."""
        return [(key, rows) for _, key, rows in self._objects(name)]

    def _file_key(self, name: str, i: int) -> str:
        """Key of the object holding sample i (every array is one object wide past axis 0)."""
        a = self._arrays[name]
        return f"{a.path}/{a.metadata.encode_chunk_key((i // (a.shards or a.chunks)[0],) + (0,) * (a.ndim - 1))}"

    def _read_files(self, name: str) -> tuple[np.ndarray, list[tuple[str, range, Exception]]]:
        """The whole array, and (key, samples, error) of each object that failed to decode; their samples
        hold the fill value. One read when all is well, object by object only to find the culprits."""
        a = self._arrays[name]
        try:
            return a[:], []
        except _DECODE_ERRORS:
            pass
        out, bad = np.full(a.shape, a.fill_value, dtype=a.dtype), []
        for region, key, rows in self._objects(name):
            try:
                out[region] = a[region]
            except _DECODE_ERRORS as e:
                bad.append((key, rows, e))
        return out, bad

    def _read_rows(self, name: str, rows: range) -> np.ndarray:
        return self._arrays[name][rows.start:rows.stop]

    def _stored_sizes(self) -> dict[str, int]:
        """Size in bytes of every object in the store, by key, as zarr's store lists them."""
        return sync(_sizes(self._group.store))

    def _read_suffixes(self, keys: Sequence[str], nbytes: int) -> list[bytes | None]:
        """The last `nbytes` of each object (a shard's index), None for an object not there."""
        return sync(_suffixes(self._group.store, keys, nbytes))

    def _hs_index_nbytes(self) -> int:
        """Bytes of an hs shard's index: (offset, nbytes) uint64 per inner chunk, then crc32c (the zarr v3
        sharding spec's layout for the index codecs `_metadata_problems` requires)."""
        a = self._arrays[HS]
        return 16 * math.prod(s // c for s, c in zip(a.shards, a.chunks, strict=True)) + 4

    def _metadata_problems(self) -> list[str]:
        """How the arrays' metadata differs from what `create_store` makes for this layout."""
        problems = []
        for name, want in _array_specs(self.layout).items():
            a = self._arrays.get(name)
            if a is None:
                problems.append(f"array {name} is missing")
                continue
            got = (a.shape, str(a.dtype), a.fill_value, a.chunks, a.shards)
            fields = ("shape", "dtype", "fill_value", "chunks", "shards")
            problems += [f"{name}/zarr.json has {field} {g}, expected {w}"
                         for field, g, w in zip(fields, got, want, strict=True) if g != w]
            if not a.compressors or not isinstance(a.compressors[-1], Crc32cCodec):
                problems.append(f"{name}/zarr.json has no crc32c checksum codec")
        if TOPK_INDICES in self._arrays and self.layout.topk is None:
            problems.append("array topk_values is missing")
        sharding = self._arrays[HS].metadata.codecs[0]
        if not (isinstance(sharding, ShardingCodec) and sharding.index_location == ShardingCodecIndexLocation.end
                and sharding.index_codecs == (BytesCodec(endian="little"), Crc32cCodec())):
            problems.append("hs/zarr.json does not shard with a crc32c-checked index at the end of each file")
        return problems

    def cleanup_partials(self) -> list[Path]:
        """Delete orphan `*.partial` files a SIGKILLed writer left; call only while no writer runs. None on
        object storage: an object is written whole or not at all (zarr's LocalStore writes `*.partial`)."""
        if not isinstance(self.path, Path):
            return []
        orphans = sorted(self.path.rglob("*.partial"))
        for p in orphans:
            p.unlink(missing_ok=True)
        return orphans


_PACKING = threading.local()  # TeacherStore._buffer's buffers, one set per writing thread


def default_writers() -> int:
    """Writer threads by default: 1. One thread compresses ~360 MiB/s (blosc zstd level 1, without the GIL),
    about what an 8B model's teacher produces at stock-forward speed on an H200 (~420 MB/s); but on the
    H200 host 2 and 4 writers made the first teacher-cache of a process slower (6.9-7.3 against 9.2
    samples/s: its forwards took 11.6-12.8 s instead of 7.5) while stage 1 is bound by its collate thread
    anyway (docs/benchmarks.md, third round). ``--writers`` raises it."""
    return 1


class ShardWriter:
    """Writes shards on ``writers`` background threads so the producer (the GPU loop) never waits on
    compression or disk. Shards are independent files with their own done flags, so they may finish
    in any order (resume reads the flags). `submit` blocks once `depth` shards wait; an exception in a
    thread is re-raised by the next `submit` or by `close`, never lost. Use as a context manager."""

    def __init__(self, store: TeacherStore, depth: int = 2, writers: int | None = None) -> None:
        self._store, self._error, self._closed = store, None, False
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        n = writers if writers is not None else default_writers()
        if n < 1:
            raise ValueError(f"writers must be >= 1, got {n}")
        self._threads = [threading.Thread(target=self._run, name=f"teacher-store-writer-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after a failure keep draining, so submit() never blocks forever
                try:
                    self._store.write_shard(*item)
                except BaseException as e:  # handed to the caller (the first one; later ones follow from it)
                    with self._lock:
                        self._error = self._error or e

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, shard_id: int, records: Sequence[SampleRecord]) -> None:
        self._raise_pending()
        if self._closed:
            raise RuntimeError("ShardWriter.submit after close()")
        self._queue.put((shard_id, list(records)))

    def close(self) -> None:
        """Finish queued shards, stop the threads, re-raise the first exception if any."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
            for t in self._threads:
                t.join()
        self._raise_pending()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as err:  # keep the body's exception primary, show both
            exc.__context__ = err


def per_layer_mean_norm(path: str | Path | StoreURL) -> np.ndarray:
    """(L,) float64: mean over every valid (non-padding) token of ||h_l||_2 over D, via dask."""
    import dask.array as da  # only statistics need dask; keep imports of readers light

    store = open_store(path)
    store.validate()
    hs = store._arrays[HS]
    x = da.from_zarr(hs, chunks=hs.chunks).map_blocks(_bits_to_f64, dtype=np.float64)  # one sample a task
    norms = da.sqrt((x * x).sum(axis=-1))  # (N, T, L)
    lengths = store.read_array(LENGTHS)
    mask = np.arange(store.layout.t_max)[None, :] < lengths[:, None]  # (N, T)
    total = (norms * da.from_array(mask[..., None], chunks=(1, -1, 1))).sum(axis=(0, 1)).compute()
    return total / mask.sum()
