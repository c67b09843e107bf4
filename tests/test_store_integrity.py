"""Teacher store integrity: every lost, truncated, flipped or inconsistent chunk is found up front and named."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch
import zarr

from pipeline.store import (
    DONE,
    HS,
    ICD_IDS,
    LENGTHS,
    QUERY_IDS,
    TOKEN_IDS,
    TOPK_INDICES,
    TOPK_VALUES,
    SampleRecord,
    StoreError,
    StoreLayout,
    create_store,
    open_store,
    per_layer_mean_norm,
)

N, T_MAX, L, D, SHOTS, S, K = 10, 6, 2, 16, 2, 4, 3
LAYOUT = StoreLayout(N, T_MAX, L, D, SHOTS, shard_size=S, topk=K)
ATTRS = {"model_id": "tiny/llama", "shots": SHOTS, "split": "validation", "support_split": "train"}
SMALL = (DONE, LENGTHS, TOKEN_IDS, ICD_IDS, QUERY_IDS, TOPK_VALUES, TOPK_INDICES)
RECREATE = "pipeline teacher-cache ... --overwrite"
MAX_U64 = 2**64 - 1


def length(i: int) -> int:
    return 1 + (i * 5) % T_MAX  # samples 4..7 (shard 1): 3, 2, 1, 6


def record(i: int, layout: StoreLayout = LAYOUT) -> SampleRecord:
    """Sample i, deterministic: random bf16 states, T varying 1..t_max, 1..shots demonstrations."""
    g = torch.Generator().manual_seed(i)
    t, k = 1 + (i * 5) % layout.t_max, layout.topk
    hs = torch.randn(t, layout.n_layers, layout.hidden, generator=g).bfloat16()
    demos = list(range(1 + i % layout.shots))
    return SampleRecord(hs, torch.randint(0, 500, (t,), generator=g).tolist(), demos, 100 + i,
                        torch.randn(t, k, generator=g) if k else None,
                        torch.randint(0, 1000, (t, k), generator=g) if k else None)


def build(path, layout: StoreLayout = LAYOUT):
    store = create_store(path, layout, ATTRS)
    for s in range(store.n_shards):
        store.write_shard(s, [record(i, layout) for i in store.shard_samples(s)])
    return open_store(path)


@pytest.fixture
def store(tmp_path):
    return build(tmp_path / "t.zarr")


def chunk_file(store, name: str, s: int):
    """The file of chunk (or shard) s of an array: zarr v3's default `c/<s>/0/...` key, rank from zarr.json."""
    ndim = len(json.loads((store.path / name / "zarr.json").read_text())["shape"])
    return store.path.joinpath(name, "c", str(s), *["0"] * (ndim - 1))


def key(store, name: str, s: int) -> str:
    return chunk_file(store, name, s).relative_to(store.path).as_posix()


def shard_index(store, s: int) -> tuple[bytes, np.ndarray]:
    """(file bytes, (S, 2) (offset, nbytes) per sample) of hs shard s, read as the zarr v3 sharding spec lays
    it out: the index at the end, uint64 little-endian pairs, then a 4-byte crc32c."""
    data = chunk_file(store, HS, s).read_bytes()
    return data, np.frombuffer(data[-(16 * S + 4):-4], "<u8").reshape(S, 2)


def flip(path, offset: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def refused(check, *parts: str) -> str:
    """Run check(); it must raise a one-line StoreError naming every part."""
    with pytest.raises(StoreError) as err:
        check()
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def all_store_files(store) -> int:
    return sum(p.stat().st_size for name in (HS, *SMALL) for p in (store.path / name / "c").rglob("*")
               if p.is_file())


# --- intact -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("full", [True, False])
def test_intact_store_passes_and_reports(store, full):
    report = store.verify(full=full)
    assert (report.samples, report.hs_shards) == (N, 3)
    files = sum(1 for name in (HS, *SMALL) for p in (store.path / name / "c").rglob("*") if p.is_file())
    assert report.files == files == 3 * 8
    if full:  # every byte of every chunk file was read and checked
        assert report.bytes_read == all_store_files(store)
    else:  # every small chunk, and only the index of each hs shard
        small = all_store_files(store) - sum(chunk_file(store, HS, s).stat().st_size for s in range(3))
        assert report.bytes_read == small + 3 * (16 * S + 4)
    assert "intact" in str(report) and str(store.path) in str(report)
    store.validate(ATTRS)


def test_all_zero_sample_is_stored_and_passes(tmp_path):
    """A sample equal to the fill value must still be written (else it is indistinguishable from a lost one)."""
    store = create_store(tmp_path / "z.zarr", LAYOUT, ATTRS)
    for s in range(store.n_shards):
        recs = [record(i) for i in store.shard_samples(s)]
        if s == 1:
            recs[1].hs = torch.zeros_like(recs[1].hs)
        store.write_shard(s, recs)
    _, index = shard_index(store, 1)
    assert index[1, 0] != MAX_U64 and index[1, 1] > 0
    store.verify()
    assert not open_store(store.path).read(5).hs.view(torch.int16).any()


def test_incomplete_store(tmp_path):
    store = create_store(tmp_path / "t.zarr", LAYOUT, ATTRS)
    store.write_shard(1, [record(i) for i in store.shard_samples(1)])
    refused(store.verify, "incomplete: 4 of 10 samples done", "re-run the same teacher-cache command")
    report = store.verify(allow_incomplete=True)
    assert report.samples == 4 and report.hs_shards == 1


# --- (a) deleted, (b) truncated hs shard -----------------------------------------------------------

@pytest.mark.parametrize("full", [True, False])
def test_deleted_hs_shard(store, full):
    chunk_file(store, HS, 1).unlink()
    refused(lambda: store.verify(full=full), str(store.path), "hs shard hs/c/1/0/0/0", "samples 4..7",
            "missing", RECREATE)


def test_validate_refuses_a_deleted_hs_shard(store):
    """It used to pass, and the student trained against all-zero teacher states (zarr's fill value)."""
    chunk_file(store, HS, 2).unlink()
    refused(store.validate, "hs shard hs/c/2/0/0/0", "samples 8..9", "missing")
    refused(open_store(store.path).validate, "hs shard hs/c/2/0/0/0")
    refused(lambda: per_layer_mean_norm(store.path), "hs shard hs/c/2/0/0/0")


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("keep", [0.5, 0.9, 10])
def test_truncated_hs_shard(store, full, keep):
    path = chunk_file(store, HS, 1)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    refused(lambda: store.verify(full=full), "hs shard hs/c/1/0/0/0", "samples 4..7", RECREATE)


# --- (c) flipped bytes inside an hs shard ------------------------------------------------------------

def test_every_flipped_byte_in_shard_data_is_found(store):
    path = chunk_file(store, HS, 1)
    original, index = shard_index(store, 1)
    for j, (offset, nbytes) in enumerate(index.tolist()):
        assert offset + nbytes <= len(original) - (16 * S + 4)  # compressed data, not the index
        for at in (offset, offset + 1, offset + 17, offset + nbytes // 2, offset + nbytes - 5, offset + nbytes - 1):
            path.write_bytes(original)
            flip(path, at)
            refused(store.verify, "hs shard hs/c/1/0/0/0", f"sample {4 + j}", "checksum", RECREATE)
    path.write_bytes(original)
    store.verify()


def test_every_flipped_byte_in_shard_index_is_found(store):
    path = chunk_file(store, HS, 0)
    original, _ = shard_index(store, 0)
    for at in range(len(original) - (16 * S + 4), len(original), 7):
        path.write_bytes(original)
        flip(path, at, 0x01)
        refused(lambda: store.verify(full=False), "hs shard hs/c/0/0/0/0", "samples 0..3", "index")


def test_a_sample_missing_from_its_shard_index_is_found(store):
    """A shard whose index (valid checksum) lists no data for a done sample: zarr would read zeros."""
    a = zarr.open_array(store.path / HS, mode="r+")  # default config: an all-zero chunk is left out
    a[6] = 0
    _, index = shard_index(store, 1)
    assert index[2, 0] == MAX_U64  # the premise: zarr dropped it
    refused(lambda: store.verify(full=False), "hs shard hs/c/1/0/0/0", "sample 6", "no data")


# --- (d) flipped byte in a small array's chunk, (e) deleted chunk ------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_flipped_byte_in_small_chunk(store, name):
    path = chunk_file(store, name, 1)
    flip(path, path.stat().st_size // 2)
    refused(lambda: store.verify(full=False), str(store.path), f"{name} chunk {key(store, name, 1)}",
            "samples 4..7", "checksum", RECREATE)
    refused(store.validate, f"{name} chunk {key(store, name, 1)}")


@pytest.mark.parametrize("name", [LENGTHS, TOKEN_IDS, ICD_IDS, QUERY_IDS, TOPK_VALUES, TOPK_INDICES])
def test_deleted_small_chunk(store, name):
    chunk_file(store, name, 2).unlink()
    refused(store.validate, str(store.path), f"{name} chunk {key(store, name, 2)}", "samples 8..9", "missing",
            RECREATE)


def test_deleted_done_chunk_reads_as_not_done_and_resume_redoes_it(store):
    chunk_file(store, DONE, 1).unlink()
    refused(store.validate, "incomplete: 6 of 10 samples done", "re-run")
    assert open_store(store.path, "r+").pending_shards() == [1]


# --- values that decode fine but disagree -------------------------------------------------------------

@pytest.mark.parametrize("name,i,value,parts", [
    (LENGTHS, 6, 0, ["lengths chunk lengths/c/1", "sample 6", "outside 1..6"]),
    (LENGTHS, 7, 99, ["lengths chunk lengths/c/1", "sample 7"]),
    (LENGTHS, 4, 2, ["token_ids chunk token_ids/c/1/0", "sample 4"]),  # shorter than its tokens (3)
    (LENGTHS, 5, 4, ["token_ids chunk token_ids/c/1/0", "sample 5"]),  # longer than its tokens (2)
    (QUERY_IDS, 9, -1, ["query_ids chunk query_ids/c/2", "sample 9"]),
])
def test_inconsistent_values_name_the_sample(store, name, i, value, parts):
    assert length(4) == 3 and length(5) == 2
    zarr.open_array(store.path / name, mode="r+")[i] = value  # a valid chunk, checksum and all
    refused(lambda: store.verify(full=False), *parts, RECREATE)


def test_inconsistent_rows_name_the_sample(store):
    tok = zarr.open_array(store.path / TOKEN_IDS, mode="r+")
    tok[1, 0] = -1
    refused(store.validate, "token_ids chunk token_ids/c/0/0", "sample 1")
    tok[1, 0] = 7
    icd = zarr.open_array(store.path / ICD_IDS, mode="r+")
    icd[8] = [-1, 3]  # padding before an id
    refused(store.validate, "icd_ids chunk icd_ids/c/2/0", "sample 8")
    icd[8] = [0, -1]
    topk = zarr.open_array(store.path / TOPK_VALUES, mode="r+")
    topk[6, 3] = 1.5  # sample 6 has one token: row 3 is padding
    refused(store.validate, "topk_values chunk topk_values/c/1/0/0", "sample 6")
    topk[6, 3] = 0
    store.validate()


def test_hs_padding_against_lengths_is_checked_in_full(store):
    hs = zarr.open_array(store.path / HS, mode="r+")
    row = hs[6]
    row[length(6)] = 1
    hs[6] = row
    store.verify(full=False)  # a cheap check does not decode hs
    refused(store.verify, "hs shard hs/c/1/0/0/0", "sample 6", "padding")


# --- (f) edited metadata -------------------------------------------------------------------------------

@pytest.mark.parametrize("where,edit,parts", [
    ("zarr.json", lambda m: m["attributes"].__setitem__("schema_version", 99), ["schema_version 99"]),
    ("zarr.json", lambda m: m["attributes"].__setitem__("encoding", "float16"), ["encoding 'float16'"]),
    ("lengths/zarr.json", lambda m: m.__setitem__("fill_value", 3), ["lengths", "fill_value"]),
    ("token_ids/zarr.json", lambda m: m.__setitem__("shape", [N, T_MAX + 1]), ["token_ids", "shape"]),
    ("query_ids/zarr.json", lambda m: m.__setitem__("codecs", m["codecs"][:-1]), ["query_ids", "crc32c"]),
])
def test_edited_metadata(store, where, edit, parts):
    meta = json.loads((store.path / where).read_text())
    edit(meta)
    (store.path / where).write_text(json.dumps(meta))
    refused(lambda: store.verify(full=False), str(store.path), *parts)  # the open store re-reads its metadata
    refused(store.validate, *parts)


# --- read(i) --------------------------------------------------------------------------------------------

def test_read_names_sample_array_and_shard(store):
    original, index = shard_index(store, 1)
    offset, nbytes = (int(x) for x in index[2])
    flip(chunk_file(store, HS, 1), offset + nbytes // 2)
    refused(lambda: store.read(6), "sample 6", "hs shard hs/c/1/0/0/0", "checksum", RECREATE)
    assert torch.equal(store.read(5).hs, record(5).hs)  # the shard's other samples still read
    flip(chunk_file(store, TOPK_VALUES, 2), 30)
    refused(lambda: store.read(9), "sample 9", "topk_values chunk topk_values/c/2/0/0", "checksum")
    fresh = open_store(store.path)
    flip(chunk_file(store, LENGTHS, 2), chunk_file(store, LENGTHS, 2).stat().st_size // 2)
    # sample 1's own chunk is fine; the whole-array read of lengths is not, and names the chunk that failed
    refused(lambda: fresh.read(1), "lengths chunk lengths/c/2", "samples 8..9", "checksum")


# --- bounded memory ------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_full_verify_reads_everything_in_bounded_memory(tmp_path, workers):
    layout = StoreLayout(64, 32, 4, 1024, 1, shard_size=8)
    store = build(tmp_path / "big.zarr", layout)
    shard_bytes = 8 * 32 * 4 * 1024 * 2  # 2 MiB decoded; the whole hs array is 8 shards, 16 MiB
    store.verify(workers=workers)  # imports (dask, ...) out of the measurement
    tracemalloc.start()
    try:
        report = store.verify(workers=workers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.bytes_read == all_store_files(store) and report.hs_shards == 8
    # Decoding one whole shard peaks near 3x its size (compressed bytes, decode buffers, output), so this
    # bound fails for anything coarser than a few samples in flight, let alone the whole array.
    assert peak < 2 * shard_bytes, f"peak {peak} bytes: verify holds more than a few samples at once"
    last = chunk_file(store, HS, 7)  # and it did read through to the last sample
    flip(last, last.stat().st_size - (16 * 8 + 4) - 1)
    refused(lambda: store.verify(workers=workers), "hs shard hs/c/7/0/0/0", "sample 63")


@pytest.mark.parametrize("name", [LENGTHS, HS])
def test_unreadable_array_metadata_names_the_array(store, name):
    (store.path / name / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"')
    refused(store.verify, f"{name}/zarr.json", RECREATE)
    refused(lambda: open_store(store.path), f"{name}/zarr.json", RECREATE)
