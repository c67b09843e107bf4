"""Teacher stores at fsspec URLs: S3 (moto's server on 127.0.0.1, started and stopped here) and memory://.

The reference for every S3 store is the same run written to a local directory (the established code path):
the objects must be byte for byte the files, the root attributes equal but for the creation time.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file
from test_store import ALL_ARRAYS, ATTRS, LAYOUT, make_record, write_all
from test_teacher_cache import REPO, assert_same_store, cli, store_args, tiny_dir, warm_run  # noqa: F401 (fixture)

from pipeline.config import UserError, load_config
from pipeline.locks import LockedError, remote_lock_file, store_lock
from pipeline.runtime import wrap_model
from pipeline.store import (
    HS,
    LENGTHS,
    StoreError,
    StoreURL,
    bf16_to_bits,
    create_store,
    open_store,
    remove_store,
    store_location,
)
from stages import evaluate, teacher_cache, train_student

BUCKET = "teacher-stores"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clear_s3fs_instances() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances keep the endpoint they were made with


@pytest.fixture(scope="module")
def s3(tmp_path_factory, warm_pipeline):
    """moto's S3 server on a free local port, the AWS_* environment pointing at it, one bucket; an s3fs
    filesystem of the test's own (listing cache off) to look at what the code wrote. A warm pipeline
    server for this environment starts now, importing torch while the first tests run in-process."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": str(nowhere),
           "AWS_SHARED_CREDENTIALS_FILE": str(nowhere)}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                mp.delenv(key, raising=False)
            _clear_s3fs_instances()
            warm_pipeline.prestart(cli()[1], 1)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
            fs.mkdir(BUCKET)
            yield fs
            _clear_s3fs_instances()
    finally:
        server.stop()


def fresh_llama():
    """A deep copy of the cached tiny Llama: training here never touches the shared instance."""
    fam = tiny("llama")
    return wrap_model(copy.deepcopy(fam.model), fam.processor, "tiny-llama")


def cache_to(out, loaded, **kw):
    opts = dict(task="antonyms", model="tiny-llama", shots=2, n_queries=5, out=str(out), shard_size=2,
                batch_size=1, topk=4, device="cpu")
    opts.update(kw)
    return teacher_cache.run(load_config(teacher_cache.TeacherCacheConfig, **opts), loaded=loaded,
                             show_progress=False)


def local_objects(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def remote_objects(fs, root: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {key[len(root) + 1:]: fs.cat_file(key) for key in fs.find(root)}


def assert_same_objects(local: dict[str, bytes], remote: dict[str, bytes]) -> None:
    """The same keys, every chunk, shard and array zarr.json byte for byte; the group's attributes equal
    apart from `created` (the one attribute that records when, not what)."""
    assert sorted(local) == sorted(remote)
    assert len([k for k in local if k.startswith("hs/c/")]) >= 2  # several shards, not an empty store
    for key in local:
        if key != "zarr.json":
            assert local[key] == remote[key], key
    a, b = (json.loads(x["zarr.json"]) for x in (local, remote))
    a["attributes"].pop("created")
    b["attributes"].pop("created")
    assert a == b


def test_teacher_cache_to_s3_writes_the_local_store(tmp_path, s3):
    loaded = fresh_llama()
    local = cache_to(tmp_path / "s.zarr", loaded)
    url = f"s3://{BUCKET}/same.zarr"
    assert cache_to(url, loaded) == StoreURL(url)
    assert_same_objects(local_objects(local), remote_objects(s3, f"{BUCKET}/same.zarr"))
    report = open_store(url).verify(full=True)
    assert (report.samples, report.hs_shards) == (5, 3)
    assert not [k for k in s3.find(BUCKET) if k.endswith(".lock")]  # the lock is local, not in the bucket

    # the same configuration resumes (nothing pending: nothing rewritten), another one is refused, then replaced
    before = remote_objects(s3, f"{BUCKET}/same.zarr")
    cache_to(url, loaded)
    assert remote_objects(s3, f"{BUCKET}/same.zarr") == before
    with pytest.raises(UserError, match="different configuration.*--overwrite"):
        cache_to(url, loaded, shots=3)
    s3.pipe(f"{BUCKET}/same.zarr2/keep", b"a neighbour sharing the name's prefix")
    cache_to(url, loaded, shots=3, overwrite=True)
    assert open_store(url).attrs["shots"] == 3 and open_store(url).read_array("icd_ids").shape == (5, 3)
    assert s3.cat_file(f"{BUCKET}/same.zarr2/keep").startswith(b"a neighbour")

    # what is not a store is never deleted by --overwrite
    s3.pipe(f"{BUCKET}/foreign.zarr/precious.txt", b"user data")
    with pytest.raises(UserError, match="not a usable teacher store.*--overwrite"):
        cache_to(f"s3://{BUCKET}/foreign.zarr", loaded)
    with pytest.raises(StoreError, match="refusing to delete"):
        cache_to(f"s3://{BUCKET}/foreign.zarr", loaded, overwrite=True)
    assert s3.cat_file(f"{BUCKET}/foreign.zarr/precious.txt") == b"user data"


def test_sigkill_on_s3_resumes_to_the_uninterrupted_store(tmp_path, s3, tiny_dir, warm_pipeline):  # noqa: F811
    n, root = 12, f"{BUCKET}/killed.zarr"
    ref = cache_to(tmp_path / "ref.zarr", None, model=str(tiny_dir), shots=3, n_queries=n, topk=20)  # store_args'
    url = f"s3://{root}"
    proc = warm_pipeline.popen(list(store_args(tiny_dir, url, n=n)), cwd=REPO, env=cli()[1])
    deadline = time.monotonic() + 120
    while not s3.exists(f"{root}/done/c/0") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first shard is done: killed in the middle of writing the others
    proc.kill()
    proc.wait()
    done = open_store(url).read_array("done")
    assert 0 < done.sum() < n, f"the kill must land mid-run ({int(done.sum())} of {n} done); {proc.stderr()[-500:]}"
    warm_run(warm_pipeline, store_args(tiny_dir, url, n=n))
    assert_same_store(ref, url)
    assert_same_objects(local_objects(ref), remote_objects(s3, root))


def test_train_and_evaluate_from_s3_equal_the_local_copy(tmp_path, s3):
    loaded = fresh_llama()
    local = cache_to(tmp_path / "train.zarr", loaded, n_queries=6)
    s3.put(str(local), f"{BUCKET}/train.zarr", recursive=True)  # the same store, copied into the bucket
    url = f"s3://{BUCKET}/train.zarr"
    runs = {}
    for where, store in (("local", str(local)), ("s3", url)):
        runs[where] = Path(train_student.run(load_config(
            train_student.TrainConfig, cache=store, max_steps=3, runs_dir=str(tmp_path / where), device="cpu",
            name="tiny-mimic", seed=3407), loaded=loaded, show_progress=False))
    a, b = (load_file(str(runs[w] / "adapter.safetensors")) for w in ("local", "s3"))
    assert sorted(a) == sorted(b) and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    fresh = load_file(str(runs["s3"] / "adapter.safetensors"))
    assert any(t.abs().sum() > 0 for t in fresh.values())  # trained: not all-zero shifts

    results = {}
    for where in ("local", "s3"):  # evaluate reads the run's store (here: at the URL) for the L2 analysis
        out = evaluate.run(evaluate.EvalConfig(
            runs=(str(runs[where]),), modes=("student",), n_queries=2, l2_queries=2, batch_size=2,
            results_dir=str(tmp_path / f"results-{where}"), device="cpu"), loaded=loaded, show_progress=False)
        results[where] = out["results"]["tiny-mimic"]
    assert "skipped" not in results["s3"]["l2"]
    assert results["s3"]["l2"]["student"] == results["local"]["l2"]["student"]
    assert results["s3"]["l2"]["zero-shot"] == results["local"]["l2"]["zero-shot"]


def test_memory_store_round_trip_and_damage_named():
    fs = fsspec.filesystem("memory")
    url = "memory://round-trip.zarr"
    try:
        store = create_store(url, LAYOUT, ATTRS)
        write_all(store)
        back = open_store(url)
        back.validate(ATTRS)
        for i in range(LAYOUT.n_samples):  # bit for bit what was written (records made again here)
            want, got = make_record(i), back.read(i)
            assert np.array_equal(bf16_to_bits(got.hs), bf16_to_bits(want.hs))
            assert got.token_ids.tolist() == list(want.token_ids)
            assert got.icd_ids == list(want.icd_ids) and got.query_id == want.query_id
            assert torch.equal(got.topk_values, want.topk_values.float())
            assert torch.equal(got.topk_indices, want.topk_indices.long())
        assert set(back._arrays) == set(ALL_ARRAYS)
        assert back.verify(full=True).samples == LAYOUT.n_samples

        # a lost chunk and a truncated shard, found through the store's listing and suffix reads
        kept = fs.cat_file("/round-trip.zarr/lengths/c/1")
        fs.rm("/round-trip.zarr/lengths/c/1")
        with pytest.raises(StoreError, match=r"lengths chunk lengths/c/1 \(samples 4\.\.7\) is missing though"):
            open_store(url).verify(full=False)
        fs.pipe("/round-trip.zarr/lengths/c/1", kept)
        assert open_store(url).verify(full=False).samples == LAYOUT.n_samples
        fs.pipe("/round-trip.zarr/hs/c/2/0/0/0", fs.cat_file("/round-trip.zarr/hs/c/2/0/0/0")[:-10])
        with pytest.raises(StoreError, match=r"hs shard hs/c/2/0/0/0 \(samples 8\.\.9\) has a corrupt index"):
            open_store(url).verify(full=False)

        remove_store(url)
        assert not fs.exists("/round-trip.zarr")
    finally:
        if fs.exists("/round-trip.zarr"):
            fs.rm("/round-trip.zarr", recursive=True)


def test_missing_package_unknown_protocol_and_missing_store_are_one_line(warm_pipeline):
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(UserError, match=r"gs:// protocol needs the gcsfs package.*pip install gcsfs"):
            store_location("gs://bucket/x.zarr")
        res = warm_pipeline.run(["inspect", "gs://bucket/x.zarr"], cwd=REPO, env=cli()[1])
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "gcsfs" in res.stderr
    with pytest.raises(UserError, match=r"unknown protocol nosuch://"):
        store_location("nosuch://bucket/x.zarr")
    assert store_location("file:///tmp/x.zarr") == Path("/tmp/x.zarr")
    assert isinstance(store_location("cache/x.zarr"), Path)
    with pytest.raises(StoreError, match="no teacher store at memory://absent.zarr"):
        open_store("memory://absent.zarr")
    from pipeline.inspection import detect

    with pytest.raises(UserError, match="memory://absent.zarr does not exist"):
        detect(store_location("memory://absent.zarr"))


def test_unreachable_endpoint_is_one_line(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _clear_s3fs_instances()
    try:
        with pytest.raises(StoreError, match=r"cannot reach s3://b/x.zarr .*AWS_ENDPOINT_URL"):
            open_store("s3://b/x.zarr")
    finally:
        _clear_s3fs_instances()


def test_remote_store_lock_is_local_and_refuses_a_second_writer_here():
    url = "s3://bucket/locked.zarr"
    lock = store_lock(url)
    assert lock.lock_file == remote_lock_file(url) == remote_lock_file(url + "/")
    assert remote_lock_file("s3a://bucket/locked.zarr") == lock.lock_file  # s3fs's alias: the same store
    assert remote_lock_file("s3://bucket/other.zarr") != lock.lock_file
    assert not str(lock.lock_file).startswith("s3:") and lock.lock_file.parent.name.startswith("mimic-pipeline-locks")
    with lock:
        code = ("import sys; from pipeline.locks import store_lock, LockedError\n"
                f"try:\n    store_lock({url!r}).acquire()\nexcept LockedError as e:\n    print(e); sys.exit(3)\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli()[1], cwd=REPO)
        assert res.returncode == 3 and url in res.stdout, res.stderr
    with pytest.raises(LockedError, match="in use"):  # released above; two holders in one process refused too
        with store_lock(url), store_lock(url):
            pass
    assert issubclass(LockedError, UserError)


def test_inspect_reports_the_same_store_at_a_url(tmp_path):
    """`pipeline inspect` on a memory:// copy of a store: the same sizes, completeness and verify result."""
    from pipeline import inspection
    from pipeline.settings import InspectConfig

    local = create_store(tmp_path / "i.zarr", LAYOUT, ATTRS)
    write_all(local)
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "i.zarr"), "/inspect.zarr", recursive=True)
    try:
        reports = {}
        for where, target in (("local", str(tmp_path / "i.zarr")), ("url", "memory://inspect.zarr")):
            png = tmp_path / f"{where}.png"
            reports[where] = inspection.run(load_config(InspectConfig, target=target, verify=True, png=str(png),
                                                        json=True))
            assert png.stat().st_size > 0
        a, b = reports["local"], reports["url"]
        assert a["size"] == b["size"] and a["completeness"] == b["completeness"]
        assert a["verify"]["status"] == b["verify"]["status"] == "intact"
        assert a["layer_norms"]["values"] == b["layer_norms"]["values"]
        assert inspection.default_png(StoreURL("s3://b/vqa.zarr")) == Path("vqa.layer_norms.png")
        assert b["size"]["arrays"][HS]["files"] == 3 and b["size"]["arrays"][LENGTHS]["files"] == 3
    finally:
        fs.rm("/inspect.zarr", recursive=True)


def test_store_at_a_bucket_root_is_written_and_replaced_keeping_the_bucket(tmp_path, s3):
    """An empty bucket is no existing store, and --overwrite of a store at a bucket's root deletes its objects,
    not the bucket (fsspec's recursive rm would, and the store could not be made again)."""
    loaded = fresh_llama()
    s3.mkdir("whole-bucket")
    url = "s3://whole-bucket"
    assert cache_to(url, loaded) == StoreURL(url)
    assert_same_objects(local_objects(cache_to(tmp_path / "two.zarr", loaded)), remote_objects(s3, "whole-bucket"))
    cache_to(url + "/", loaded, shots=3, overwrite=True)
    assert s3.exists("whole-bucket")
    assert_same_objects(local_objects(cache_to(tmp_path / "three.zarr", loaded, shots=3)),
                        remote_objects(s3, "whole-bucket"))
    assert open_store(url).verify(full=True).samples == 5


def test_an_empty_local_directory_is_replaced_by_overwrite(tmp_path):
    """An empty directory was "not a usable store" without --overwrite and "not a teacher store" with it."""
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(UserError, match="not a usable teacher store.*--overwrite"):
        cache_to(empty, fresh_llama())
    assert cache_to(empty, fresh_llama(), overwrite=True) == empty
    assert open_store(empty).verify(full=True).samples == 5


def test_urls_without_a_path_or_with_an_empty_segment_are_one_line(warm_pipeline):
    for url, why in (("s3://", "names no bucket or path"), ("memory://", "names no bucket or path"),
                     ("s3://bucket//x.zarr", r"has an empty path segment \(//\)")):
        with pytest.raises(UserError, match=f"^{url}: {why}"):
            store_location(url)
    with pytest.raises(UserError, match="names no bucket or path"):  # was a TypeError in the store's lock
        cache_to("s3://", fresh_llama())
    res = warm_pipeline.run(["inspect", "memory://"], cwd=REPO, env=cli()[1])
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["error: memory://: names no bucket or path; "
                                                                       "give the store's full location, e.g. "
                                                                       "s3://bucket/vqav2.zarr"]


def test_a_memory_store_read_by_another_process_is_one_line_naming_why(tmp_path, warm_pipeline):
    fs = fsspec.filesystem("memory")
    create_store("memory://elsewhere.zarr", LAYOUT, ATTRS)  # exists here, not in the process started below
    try:
        res = warm_pipeline.run(["train-student", "--cache", "memory://elsewhere.zarr", "--runs-dir",
                                 str(tmp_path / "runs"), "--device", "cpu"], cwd=REPO, env=cli()[1])
    finally:
        fs.rm("/elsewhere.zarr", recursive=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "no teacher store at memory://elsewhere.zarr (memory:// stores live only in the process" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_bad_out_url_is_named_before_the_model_loads(s3, monkeypatch, warm_pipeline):
    """A typo'd protocol or a missing bucket used to surface only after the (possibly minutes-long) model load."""
    import stages.teacher_cache as tc

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the store URL was checked")

    monkeypatch.setattr(tc, "load_for_stage", no_model)
    with pytest.raises(UserError, match=r"unknown protocol s4://"):
        cache_to("s4://bucket/x.zarr", None)
    with pytest.raises(UserError, match="no-such-bucket"):
        cache_to("s3://no-such-bucket/x.zarr", None)
    res = warm_pipeline.run(["teacher-cache", "--task", "antonyms", "--model", "smollm2-135m", "--out",
                             "memory://lost.zarr"], cwd=REPO, env=cli()[1])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "memory:// store lives only in the process" in lines[0]
