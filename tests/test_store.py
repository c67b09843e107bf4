"""Teacher store: bit-exact round trip, codecs on disk, corruption, ownership, resume after SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

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
    ShardWriter,
    StoreError,
    StoreLayout,
    create_store,
    default_shard_size,
    open_store,
    per_layer_mean_norm,
    remove_store,
)

N, T_MAX, L, D, SHOTS, S, K = 10, 7, 3, 8, 2, 4, 5
LAYOUT = StoreLayout(N, T_MAX, L, D, SHOTS, shard_size=S, topk=K)
ATTRS = {"model_id": "tiny/llama", "revision": "abc", "layer_target": "mlp", "shots": SHOTS,
         "split": "validation", "support_split": "train", "created": "2025-01-01", "code_version": "0.1.0"}
ALL_ARRAYS = (HS, DONE, LENGTHS, TOKEN_IDS, ICD_IDS, QUERY_IDS, TOPK_VALUES, TOPK_INDICES)
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_record(i: int, special: bool = True) -> SampleRecord:
    """Sample i, deterministic; T varies 1..T_MAX; `special`: bf16 values float16 cannot hold."""
    g = torch.Generator().manual_seed(1000 + i)
    t = 1 + (i * 3) % T_MAX
    hs = torch.randn(t, L, D, generator=g) * torch.tensor([1.0, 10.0, 0.1])[:, None]  # layers differ
    if special:
        hs[0, 0, :4] = torch.tensor([1e-8, 3e38, -0.0, float("inf")])
    return SampleRecord(hs.bfloat16(), torch.randint(0, 500, (t,), generator=g).tolist(),
                        list(range(i, i + i % (SHOTS + 1))), 100 + i,
                        torch.randn(t, K, generator=g), torch.randint(0, 30000, (t, K), generator=g))


def shard_records(store, s: int) -> list[SampleRecord]:
    return [make_record(i) for i in store.shard_samples(s)]


def write_all(store) -> None:
    for s in store.pending_shards():
        store.write_shard(s, shard_records(store, s))


@pytest.fixture
def full(tmp_path):
    store = create_store(tmp_path / "t.zarr", LAYOUT, ATTRS)
    write_all(store)
    return open_store(store.path)


def test_round_trip_bit_exact(full):
    full.validate(ATTRS)
    assert len(full) == N and full.n_shards == 3 and full.layout == LAYOUT
    raw_hs, raw_tok, raw_icd = full.read_array(HS), full.read_array(TOKEN_IDS), full.read_array(ICD_IDS)
    for i in range(N):
        want, got = make_record(i), full.read(i)
        t = want.hs.shape[0]
        assert got.hs.dtype == torch.bfloat16 and got.hs.shape == (t, L, D)
        assert torch.equal(got.hs.view(torch.int16), want.hs.view(torch.int16))
        assert got.hs[0, 0, 1].item() == pytest.approx(3e38, rel=1e-2)  # float16 would give inf
        assert 0 < got.hs[0, 0, 0].item() < 1e-7  # float16 would give 0
        assert got.token_ids.tolist() == want.token_ids and got.icd_ids == want.icd_ids
        assert got.query_id == 100 + i
        assert torch.equal(got.topk_values, want.topk_values)
        assert torch.equal(got.topk_indices, want.topk_indices)
        assert not raw_hs[i, t:].any() and (raw_tok[i, t:] == -1).all()
        assert (raw_icd[i, len(want.icd_ids):] == -1).all()
    assert full.read_array(LENGTHS).tolist() == [1 + (i * 3) % T_MAX for i in range(N)]


def test_codecs_on_disk_are_sharded_blosc_zstd_crc32c(full):
    meta = json.loads((full.path / HS / "zarr.json").read_text())
    assert meta["data_type"] == "uint16" and meta["shape"] == [N, T_MAX, L, D]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [S, T_MAX, L, D]
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [1, T_MAX, L, D]
    inner = {c["name"]: c.get("configuration") for c in sharding["configuration"]["codecs"]}
    assert list(inner) == ["bytes", "blosc", "crc32c"]
    assert inner["blosc"] == {"typesize": 2, "cname": "zstd", "clevel": 1, "shuffle": "shuffle",
                              "blocksize": 2**20}
    done = json.loads((full.path / DONE / "zarr.json").read_text())
    assert done["chunk_grid"]["configuration"]["chunk_shape"] == [S]
    root = json.loads((full.path / "zarr.json").read_text())["attributes"]
    assert root["schema_version"] == 1 and root["encoding"] == "bf16-bits-in-uint16"
    assert full.fingerprint == {k: v for k, v in ATTRS.items() if k not in ("created", "code_version")}
    assert json.loads((full.path / QUERY_IDS / "zarr.json").read_text())["attributes"]["split"] == "validation"


def test_flipped_byte_is_reported_as_corruption(full):
    shard0 = full.path / HS / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard0.read_bytes())
    index = np.frombuffer(bytes(data[-(16 * S + 4):-4]), "<u8").reshape(S, 2)  # (offset, nbytes) per chunk
    offset, nbytes = (int(x) for x in index[2])
    data[offset + nbytes // 2] ^= 0x10
    shard0.write_bytes(bytes(data))
    store = open_store(full.path)
    with pytest.raises(StoreError, match=r"sample 2 .*corrupt"):
        store.read(2)
    assert torch.equal(store.read(1).hs, make_record(1).hs)  # the other chunks of the shard still read


def test_pending_shards_ownership(tmp_path):
    store = create_store(tmp_path / "t.zarr", LAYOUT, ATTRS)
    assert [list(store.shard_samples(s)) for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert store.pending_shards() == [0, 1, 2]
    assert (store.pending_shards(0, 2), store.pending_shards(1, 2)) == ([0, 2], [1])
    store.write_shard(2, shard_records(store, 2))
    assert store.pending_shards() == [0, 1] and store.pending_shards(0, 2) == [0]
    store.write_shard(1, shard_records(store, 1))
    store._arrays[DONE][5] = False  # one missing flag keeps the whole shard pending
    assert store.pending_shards(1, 2) == [1] and store.pending_shards() == [0, 1]
    with pytest.raises(ValueError, match="rank"):
        store.pending_shards(2, 2)


def test_one_write_per_array_then_done_flags(tmp_path):
    store = create_store(tmp_path / "t.zarr", LAYOUT, ATTRS)
    calls = []

    class Recorder:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def __setitem__(self, key, value):
            calls.append(self.name)
            self.array[key] = value

    for name in list(store._arrays):
        store._arrays[name] = Recorder(name, store._arrays[name])
    store.write_shard(0, shard_records(store, 0))
    assert calls[-1] == DONE and sorted(calls[:-1]) == sorted(set(ALL_ARRAYS) - {DONE})


def test_out_of_disk_space_names_path_and_shard(tmp_path, monkeypatch):
    store = create_store(tmp_path / "t.zarr", LAYOUT, ATTRS)
    real_open = pathlib.Path.open

    def full_disk(self, mode="r", *args, **kwargs):
        if "w" in mode and self.name.endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", full_disk)
    with pytest.raises(StoreError, match=r"out of disk space writing shard 1 of .*t\.zarr"):
        store.write_shard(1, shard_records(store, 1))
    monkeypatch.undo()
    assert store.pending_shards() == [0, 1, 2] and not list(store.path.rglob("*.partial"))


def test_errors_on_create_open_validate(tmp_path, full):
    with pytest.raises(StoreError, match="already exists"):
        create_store(full.path, LAYOUT, ATTRS)
    with pytest.raises(StoreError, match=r"no teacher store at .*teacher-cache"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a zarr group"):
        open_store(tmp_path / "plain")
    with pytest.raises(StoreError, match="refusing to delete"):
        remove_store(tmp_path / "plain")
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(StoreError, match="not a teacher store"):
        open_store(foreign)
    meta_path = full.path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["schema_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema_version 99.*reads 1"):
        open_store(full.path)
    remove_store(full.path)
    assert not full.path.exists()


def test_validate_fingerprint_and_incomplete(tmp_path):
    store = create_store(tmp_path / "t.zarr", LAYOUT, ATTRS)
    store.write_shard(0, shard_records(store, 0))
    with pytest.raises(StoreError, match="incomplete: 4 of 10 samples done; re-run"):
        store.validate()
    with pytest.raises(StoreError, match="not written"):
        open_store(store.path).read(5)
    write_all(store)
    store.validate({**ATTRS, "created": "another day", "code_version": "9"})  # volatile keys ignored
    with pytest.raises(StoreError, match=r"layer_target: stored 'mlp' vs expected 'attn'; shots: stored 2 vs"):
        store.validate({**ATTRS, "layer_target": "attn", "shots": 8})
    with pytest.raises(ValueError, match="record 0 of shard 0"):
        store.write_shard(0, [SampleRecord(torch.zeros(2, L, D), [1, 2], [], 0)] * 4)


@pytest.mark.parametrize("writers", [1, 3])
def test_shard_writer_surfaces_thread_exception(tmp_path, writers):
    store = create_store(tmp_path / "t.zarr", LAYOUT, ATTRS)
    with ShardWriter(store, writers=writers) as writer:
        for s in (0, 1, 2):
            writer.submit(s, shard_records(store, s))
    store.validate()
    for i in range(N):  # every sample where it belongs, whichever thread wrote its shard
        want = make_record(i)
        got = store.read(i)
        assert torch.equal(got.hs, want.hs) and list(got.token_ids) == list(want.token_ids)
    store2 = create_store(tmp_path / "u.zarr", LAYOUT, ATTRS)
    writer = ShardWriter(store2, depth=1, writers=writers)
    writer.submit(0, shard_records(store2, 1)[:2])  # wrong count: fails in the thread
    with pytest.raises(ValueError, match="expected 4 records"):
        for _ in range(20):  # must surface on a later submit (or at the latest close), never hang
            writer.submit(1, shard_records(store2, 1))
        writer.close()
    with pytest.raises(ValueError, match="expected 4 records"):
        writer.close()


def test_per_layer_mean_norm_matches_numpy(tmp_path):
    store = create_store(tmp_path / "t.zarr", LAYOUT, ATTRS)
    for s in range(store.n_shards):
        store.write_shard(s, [make_record(i, special=False) for i in store.shard_samples(s)])
    states = [make_record(i, special=False).hs.float().numpy().astype(np.float64) for i in range(N)]
    want = np.linalg.norm(np.concatenate(states), axis=-1).mean(axis=0)  # (L,) over every valid token
    np.testing.assert_allclose(per_layer_mean_norm(store.path), want, rtol=1e-9)


def test_pickle_and_forked_dataloader_workers_read(full):
    clone = pickle.loads(pickle.dumps(full))
    assert torch.equal(clone.read(3).hs, full.read(3).hs)
    full.read(0)  # the parent has used zarr's event loop before the fork
    loader = torch.utils.data.DataLoader(range(N), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork", collate_fn=lambda i: full.read(i).hs)
    for i, hs in enumerate(loader):
        assert torch.equal(hs.view(torch.int16), make_record(i).hs.view(torch.int16))


def test_layout_defaults_and_checks():
    assert default_shard_size(82, 32, 4096) == 16 and default_shard_size(64, 30, 576) == 64
    assert StoreLayout(10, 4, 2, 8, 1).shard_size == 10
    with pytest.raises(ValueError, match="hidden=0"):
        StoreLayout(10, 4, 2, 0, 1)


# --- resume after SIGKILL -------------------------------------------------------------------------

def child_write(path: str, slow_done: bool) -> None:
    """Run in a subprocess: create the store, then write shards slowly, announcing each step."""
    store = create_store(path, LAYOUT, ATTRS)
    if slow_done:  # a window between a shard's data and its done flags
        real = store._arrays[DONE]

        class SlowDone:
            def __getitem__(self, key):
                return real[key]

            def __setitem__(self, key, value):
                print(f"data-written {key.start}", flush=True)
                time.sleep(30)
                real[key] = value

        store._arrays[DONE] = SlowDone()
    print("ready", flush=True)
    for s in store.pending_shards():
        store.write_shard(s, shard_records(store, s))
        time.sleep(0.2)  # shard 2 lands >= 0.4 s after 'ready'


def spawn_child(path, slow_done: bool) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import test_store; "
            f"test_store.child_write({str(path)!r}, {slow_done})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"child exited (rc {proc.wait()}) before printing {prefix!r}")


@pytest.mark.parametrize("kill_point", ["after-data-before-done", "random-1", "random-2"])
def test_resume_after_sigkill_matches_uninterrupted(tmp_path, full, kill_point):
    path = tmp_path / "killed.zarr"
    proc = spawn_child(path, slow_done=kill_point.startswith("after"))
    try:
        wait_for(proc, "ready")
        if kill_point.startswith("after"):
            wait_for(proc, "data-written 0")
        else:
            time.sleep(random.Random(kill_point).uniform(0.0, 0.35))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (path / HS / "c" / "orphan.abc123.partial").write_bytes(b"torn")  # as a mid-rename kill leaves
    store = open_store(path, "r+")
    assert store.pending_shards(), "the kill must leave work to resume"
    if kill_point.startswith("after"):
        assert store.pending_shards() == [0, 1, 2] and store.read_array(LENGTHS)[0] > 0
    assert [p.name for p in store.cleanup_partials()] == ["orphan.abc123.partial"]
    write_all(store)
    resumed = open_store(path)
    resumed.validate(ATTRS)
    for name in ALL_ARRAYS:
        np.testing.assert_array_equal(resumed.read_array(name), full.read_array(name), err_msg=name)
