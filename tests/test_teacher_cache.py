"""Stage 1 on tiny models: states against a separate forward, kill + resume, two writers (gloo)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny

from pipeline.config import UserError, load_config
from pipeline.prompts import build_prompt
from pipeline.runtime import wrap_model
from pipeline.store import open_store
from pipeline.tasks import load_task
from stages.teacher_cache import TeacherCacheConfig, run

REPO = Path(__file__).resolve().parents[1]
ARRAYS = ("hs", "done", "lengths", "token_ids", "icd_ids", "query_ids")


def cache(tmp_path, loaded, **kw):
    opts = dict(task="shapes_vqa", model=loaded.source.alias, shots=2, n_queries=5, out=str(tmp_path / "s.zarr"),
                shard_size=2, batch_size=1)
    opts.update(kw)
    return run(load_config(TeacherCacheConfig, **opts), loaded=loaded, show_progress=False)


def reference_states(loaded, prompt, target):
    """A separate teacher forward of one prompt; states captured by hooks written here."""
    layers = loaded.model.get_decoder().layers
    got = {}
    mods = [getattr(layer, target) if target != "layer" else layer for layer in layers]
    hooks = [m.register_forward_hook(lambda _m, _a, out, i=i: got.__setitem__(i, out[0] if isinstance(out, tuple) else out))
             for i, m in enumerate(mods)]
    batch = loaded.family.collate([prompt.encoded], loaded.processor, "right")
    with torch.no_grad():
        out = loaded.model(**batch, output_hidden_states=True)
    for h in hooks:
        h.remove()
    states = torch.stack([got[i][0, prompt.span_start :] for i in range(len(mods))], dim=1)
    return states.to(torch.bfloat16), out.hidden_states


@pytest.mark.parametrize("name,task", [("idefics", "shapes_vqa"), ("idefics2", "shapes_caption"), ("llama", "antonyms")])
@pytest.mark.parametrize("target", ["mlp", "layer"])
def test_states_equal_a_separate_forward(tmp_path, name, task, target):
    fam = tiny(name)
    loaded = wrap_model(fam.model, fam.processor, f"tiny-{name}")
    path = cache(tmp_path, loaded, task=task, layer_target=target)
    store = open_store(path)
    store.validate()
    assert store.attrs["layer_target"] == target and store.attrs["shots"] == 2
    t = load_task(task)
    queries, support = t.split("train"), t.split("support")
    for i in range(len(store)):
        rec = store.read(i)
        query = queries[rec.query_id]
        demos = [support[j] for j in rec.icd_ids]
        assert len(demos) == 2 and query.id not in {d.id for d in demos}
        prompt = build_prompt(fam.family, fam.processor, t.spec, query, demos,
                              [t.demo_answer(d) for d in demos], t.demo_answer(query))
        want, hidden = reference_states(loaded, prompt, target)
        assert torch.equal(rec.hs.view(torch.int16), want.view(torch.int16)), f"sample {i}"
        assert rec.token_ids.tolist() == prompt.input_ids[prompt.span_start :]
        if target == "layer":  # and against transformers' own hidden states (all but the normed last)
            for layer in range(want.shape[1] - 1):
                ref = hidden[layer + 1][0, prompt.span_start :].to(torch.bfloat16)
                assert torch.equal(rec.hs[:, layer].view(torch.int16), ref.view(torch.int16))


def test_batched_matches_unbatched_and_topk(tmp_path):
    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    one = open_store(cache(tmp_path / "a", loaded, task="antonyms", batch_size=1, topk=5))
    many = open_store(cache(tmp_path / "b", loaded, task="antonyms", batch_size=4, topk=5))
    for i in range(len(one)):
        a, b = one.read(i), many.read(i)
        torch.testing.assert_close(a.hs.float(), b.hs.float(), rtol=1e-2, atol=1e-3)
        assert a.topk_indices.shape == (a.hs.shape[0], 5)
        assert torch.all(a.topk_values[:, :-1] >= a.topk_values[:, 1:])  # sorted log-probs
        assert torch.all(a.topk_values <= 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_workers_write_the_store_the_main_process_writes(tmp_path, dtype):
    """--num-workers (the CUDA default): whole shards built, cast to a 16-bit model dtype and collated in
    worker processes (ShardData) give the store the main process alone writes, bit for bit; a prompt over
    --max-length stops the run with the one-line error, not a worker traceback."""
    import copy

    fam = tiny("idefics2")
    loaded = wrap_model(copy.deepcopy(fam.model).to(dtype), fam.processor, "tiny-idefics2")
    alone = open_store(cache(tmp_path / "a", loaded, n_queries=6, batch_size=2, num_workers=0))
    workers = open_store(cache(tmp_path / "b", loaded, n_queries=6, batch_size=2, num_workers=2))
    for k in ARRAYS:
        assert np.array_equal(alone.read_array(k), workers.read_array(k)), k
    assert alone.read_array("done").all()
    with pytest.raises(UserError) as err:
        cache(tmp_path / "c", loaded, n_queries=6, batch_size=2, num_workers=2, max_length=20)
    assert "more than the limit 20" in str(err.value) and "Traceback" not in str(err.value)


def test_out_of_memory_with_prompt_workers_rebuilds_the_prompts(tmp_path, monkeypatch):
    """Prompt workers send the prompts without their images (the batches carry the pixels). Out of memory
    on a worker's batch, the runner halves the batch and collates again from the prompts rebuilt with their
    images (those sent would fail to collate), for this shard and the next one, whose batches were made for
    the old size: the store is the one a run at the halved size writes, bit for bit."""
    import copy

    from pipeline.forward import TeacherRunner

    fam = tiny("idefics2")
    loaded = wrap_model(copy.deepcopy(fam.model), fam.processor, "tiny-idefics2")
    alone = open_store(cache(tmp_path / "a", loaded, n_queries=8, shard_size=4, batch_size=2, num_workers=0))
    original, calls = TeacherRunner.launch, []

    def launch(self, prompts, batch=None):
        calls.append((len(prompts), batch is not None))
        if batch is not None and len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, prompts, batch)

    monkeypatch.setattr(TeacherRunner, "launch", launch)
    halved = open_store(cache(tmp_path / "b", loaded, n_queries=8, shard_size=4, batch_size=0, num_workers=2))
    assert calls[0] == (4, True)  # the auto batch of 4 on the CPU, collated by a worker, ran out of memory
    assert calls[1:] == [(2, False)] * 4  # then batches of 2 collated here, in both shards
    for k in ARRAYS:
        assert np.array_equal(alone.read_array(k), halved.read_array(k)), k


def test_warm_up_runs_one_batch_during_planning_and_changes_nothing(tmp_path, monkeypatch):
    """On a device listed in WARM_UP_DEVICES (CUDA; here the CPU, patched in) with prompt workers, one forward
    of a real batch (rows cycling through the first queries' teacher prompts up to two lengths, so padded as
    the run's batches are) runs on a thread while the workers plan, in the first teacher-cache of the process
    only, where the shards wait for the plan (a shard size that depends on t_max); the thread has ended before
    the shard workers fork; the store is bit for bit the one a run without it writes."""
    import copy
    import threading

    import stages.teacher_cache as tc
    from pipeline.forward import TeacherRunner

    fam = tiny("idefics2")
    loaded = wrap_model(copy.deepcopy(fam.model), fam.processor, "tiny-idefics2")
    plain = open_store(cache(tmp_path / "a", loaded, n_queries=6, batch_size=3, num_workers=2, shard_size=None))
    original, calls = TeacherRunner.launch, []

    def launch(self, prompts, batch=None):
        calls.append((threading.current_thread().name, [len(p.encoded) for p in prompts]))
        return original(self, prompts, batch)

    alive_at_shards = []
    original_shards = tc.shard_prompts

    def shard_prompts(*args, **kwargs):
        alive_at_shards.append([t.name for t in threading.enumerate() if t.name == "teacher-warm-up"])
        yield from original_shards(*args, **kwargs)

    monkeypatch.setattr(TeacherRunner, "launch", launch)
    monkeypatch.setattr(tc, "shard_prompts", shard_prompts)
    monkeypatch.setattr(tc, "WARM_UP_DEVICES", ("cpu",))
    monkeypatch.setattr(tc, "WARMED", set())
    warmed = open_store(cache(tmp_path / "b", loaded, n_queries=6, batch_size=3, num_workers=2, shard_size=None))
    name, lengths = calls[0]
    task = load_task("shapes_vqa")
    records = {r.query_id: r for r in (warmed.read(i) for i in range(6))}
    teacher = []
    for q in range(3):  # queries 0-2's 2-shot teacher prompt lengths, with their stored demonstrations
        demos = [task.split("support")[j] for j in records[q].icd_ids]
        query = task.split("train")[q]
        teacher.append(len(build_prompt(fam.family, fam.processor, task.spec, query, demos,
                                        [task.demo_answer(d) for d in demos], task.demo_answer(query)).encoded))
    assert teacher[0] != teacher[1]  # the data this test relies on: queries 0 and 1 differ in length
    assert name == "teacher-warm-up" and lengths == [teacher[0], teacher[1], teacher[0]]  # padded, as real batches
    assert all(n == "MainThread" for n, _ in calls[1:]) and sum(len(x) for _, x in calls[1:]) == 6
    assert alive_at_shards == [[]]
    for k in ARRAYS:
        assert np.array_equal(plain.read_array(k), warmed.read_array(k)), k
    calls.clear()
    cache(tmp_path / "c", loaded, n_queries=6, batch_size=3, num_workers=2, shard_size=None)
    assert calls and all(n == "MainThread" for n, _ in calls)  # once per process: this one is warm
    calls.clear()
    monkeypatch.setattr(tc, "WARMED", set())
    cache(tmp_path / "d", loaded, n_queries=6, batch_size=3, num_workers=0, shard_size=None)
    assert calls and all(n == "MainThread" for n, _ in calls)  # no workers: nothing to overlap, no warm-up
    monkeypatch.setattr(tc, "WARMED", set())  # a prompt over the limit fails the warm-up quietly, then the run
    with pytest.raises(UserError, match="more than the limit 20") as err:
        cache(tmp_path / "e", loaded, n_queries=6, batch_size=3, num_workers=2, shard_size=None, max_length=20)
    assert "Traceback" not in str(err.value) and not tc.WARMED


def _spy_early(monkeypatch):
    """Record what ``start_early`` returned (None: the shards wait for the plan) and the order in which the
    shard workers and the plan workers were started."""
    import stages.teacher_cache as tc

    seen, order = [], []
    original_early, original_plan, original_shards = tc.start_early, tc.plan_queries, tc.shard_prompts
    original_ahead = tc.PlanAhead

    def start_early(*args, **kwargs):
        got = original_early(*args, **kwargs)
        seen.append(got)
        return got

    def plan_queries(*args, **kwargs):
        order.append("plan")
        return original_plan(*args, **kwargs)

    def plan_ahead(*args, **kwargs):  # the plan made while the early shards' forwards run
        order.append("plan")
        return original_ahead(*args, **kwargs)

    def shard_prompts(*args, **kwargs):
        order.append("shards")
        return original_shards(*args, **kwargs)

    monkeypatch.setattr(tc, "start_early", start_early)
    monkeypatch.setattr(tc, "plan_queries", plan_queries)
    monkeypatch.setattr(tc, "PlanAhead", plan_ahead)
    monkeypatch.setattr(tc, "shard_prompts", shard_prompts)
    return seen, order


def test_shard_workers_start_before_the_plan_and_write_the_same_store(tmp_path, monkeypatch):
    """With prompt workers, no store yet and a known shard size, the shard workers start (and plan their own
    queries) before the plan is made; the store is bit for bit the one the main process alone writes. Where the
    shards cannot be known first (a store to resume; a shard size that waits for t_max) they start after."""
    fam = tiny("idefics2")
    loaded = wrap_model(fam.model, fam.processor, "tiny-idefics2")
    alone = open_store(cache(tmp_path / "a", loaded, n_queries=7, shard_size=3, batch_size=2, num_workers=0))
    seen, order = _spy_early(monkeypatch)
    early = open_store(cache(tmp_path / "b", loaded, n_queries=7, shard_size=3, batch_size=2, num_workers=2))
    assert seen[0] is not None and seen[0].rows == [[0, 1, 2], [3, 4, 5], [6]] and order == ["shards", "plan"]
    for k in ARRAYS:
        assert np.array_equal(alone.read_array(k), early.read_array(k)), k
    # resuming: the store exists, so the pending shards are known only once it is opened
    seen.clear(), order.clear()
    done = early.read_array("done")
    assert done.all()
    cache(tmp_path / "b", loaded, n_queries=7, shard_size=3, batch_size=2, num_workers=2)
    assert seen == [None] and order == ["plan", "shards"]
    # the default shard size of a small model depends on t_max: the shards wait for the plan
    seen.clear(), order.clear()
    small = open_store(cache(tmp_path / "c", loaded, n_queries=7, shard_size=None, batch_size=2, num_workers=2))
    assert seen == [None] and order == ["plan", "shards"] and small.layout.shard_size == 7
    # ... unless query 0's span is over the large-sample size already (then so is t_max): 16 a shard
    import pipeline.store as store_mod

    monkeypatch.setattr(store_mod, "LARGE_SAMPLE_BYTES", 1)
    seen.clear(), order.clear()
    large = open_store(cache(tmp_path / "d", loaded, n_queries=7, shard_size=None, batch_size=2, num_workers=2))
    assert seen[0] is not None and seen[0].rows == [list(range(7))] and order == ["shards", "plan"]
    assert large.layout.shard_size == 7
    for k in ARRAYS:
        assert np.array_equal(large.read_array(k), small.read_array(k)), k


def test_collate_thread_copies_on_fewer_intra_op_threads_and_leaves_the_process_as_it_was(monkeypatch):
    """The collate thread's page-locking copies run on at most ``COLLATE_THREADS`` intra-op threads (all cores
    slowed the forward they overlap); the calling thread's count, and the one threads started later get, are the
    same after ``collate_ahead`` as before; the shards come through in order with their own batches."""
    import threading

    import stages.teacher_cache as tc

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(tc, "COLLATE_THREADS", 1)
        seen = []

        class Runner:
            def pin_sorted(self, collated):
                seen.append((threading.current_thread().name, torch.get_num_threads()))
                return ("pinned", collated)

        shards = [(k, ([f"item{k}"], [f"prompt{k}"], f"batches{k}")) for k in range(3)]
        got = list(tc.collate_ahead(Runner(), iter(shards)))
        assert got == [(k, [f"item{k}"], [f"prompt{k}"], ("pinned", f"batches{k}")) for k in range(3)]
        assert len(seen) == 3 and all(name.startswith("teacher-collate") and n == 1 for name, n in seen), seen
        assert torch.get_num_threads() == 2
        later = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start(), t.join()
        assert later == [2]
    finally:
        torch.set_num_threads(before)


def test_early_shards_that_do_not_match_the_store_are_dropped(tmp_path, monkeypatch):
    """If the store made after the plan has other shards than the early workers assumed, the states computed
    from their shards are dropped (nothing written from them) and the shards are built again: the store is still
    the right one."""
    import stages.teacher_cache as tc

    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    alone = open_store(cache(tmp_path / "a", loaded, task="antonyms", n_queries=5, shard_size=2, num_workers=0))
    closed, original = [], tc.start_early

    class Wrong(tc.EarlyShards):
        def close(self):
            closed.append(True)
            super().close()

    def start_early(*args, **kwargs):  # the real workers' shards ([0, 1], [2, 3], [4]), claimed as one of 5
        got = original(*args, **kwargs)
        return Wrong([[0, 1, 2, 3, 4]], got.shards)

    monkeypatch.setattr(tc, "start_early", start_early)
    got = open_store(cache(tmp_path / "b", loaded, task="antonyms", n_queries=5, shard_size=2, num_workers=2))
    assert closed
    for k in ARRAYS:
        assert np.array_equal(alone.read_array(k), got.read_array(k)), k


class _Slow:
    """A ``PlanAhead`` that is not done until ``result`` is called, which records how many shards
    had run their forwards by then (and raises ``error`` instead of returning the plan, when given)."""

    def __init__(self, future, forwards, error=None):
        self.future, self.forwards, self.error, self.at_result = future, forwards, error, None

    def done(self):
        return False

    def cancel(self):
        self.future.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()

    def result(self):
        self.at_result = len(self.forwards)
        plan = self.future.result()
        if self.error is not None:
            raise self.error
        return plan


def test_early_shards_run_their_forwards_while_the_plan_is_made(tmp_path, monkeypatch):
    """Early shards: the forwards start before the plan is in; their states wait in memory, at most
    PLAN_AHEAD_SHARDS shards of them, then the run waits for the plan, makes the store and writes them in order.
    The store is bit for bit the one the main process alone writes, and no warm-up forward runs. A plan that
    fails stops the run with its own one-line error and nothing written."""
    import threading

    import stages.teacher_cache as tc
    from pipeline.forward import TeacherRunner

    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    opts = dict(task="antonyms", n_queries=9, shard_size=2)
    alone = open_store(cache(tmp_path / "a", loaded, num_workers=0, **opts))
    runs, futures = [], []
    original_run, original_ahead = TeacherRunner.launch_sorted, tc.PlanAhead

    def launch_sorted(self, prompts, *args, **kwargs):
        runs.append((threading.current_thread().name, len(prompts)))
        return original_run(self, prompts, *args, **kwargs)

    def plan_ahead(*args, **kwargs):
        futures.append(_Slow(original_ahead(*args, **kwargs), runs))
        return futures[-1]

    monkeypatch.setattr(TeacherRunner, "launch_sorted", launch_sorted)
    monkeypatch.setattr(tc, "PlanAhead", plan_ahead)
    monkeypatch.setattr(tc, "PLAN_AHEAD_SHARDS", 3)
    monkeypatch.setattr(tc, "WARM_UP_DEVICES", ("cpu",))  # a warm-up would run here if the path kept it
    monkeypatch.setattr(tc, "WARMED", set())
    got = open_store(cache(tmp_path / "b", loaded, num_workers=2, **opts))
    # three shards of states waiting, and the fourth's forwards issued, before the plan was waited for
    assert futures[0].at_result == 4
    assert [n for _, n in runs] == [2, 2, 2, 2, 1] and all(t == "MainThread" for t, _ in runs)  # no warm-up
    for k in ARRAYS:
        assert np.array_equal(alone.read_array(k), got.read_array(k)), k
    # planning fails: its one-line error, no store
    runs.clear()
    monkeypatch.setattr(tc, "PlanAhead",
                        lambda *a, **k: _Slow(original_ahead(*a, **k), runs, UserError("the plan failed")))
    with pytest.raises(UserError, match="the plan failed"):
        cache(tmp_path / "c", loaded, num_workers=2, **opts)
    assert not (tmp_path / "c" / "s.zarr").exists()
    monkeypatch.setattr(tc, "PlanAhead", original_ahead)
    again = open_store(cache(tmp_path / "c", loaded, num_workers=2, **opts))  # the lock was released
    assert again.read_array("done").all()


def test_workers_that_plan_differently_stop_the_run(tmp_path, monkeypatch):
    """A plan that is not deterministic across processes (here: other demonstrations in the shard workers) is
    caught when the shard comes back, before anything of it is written: one-line error."""
    import stages.teacher_cache as tc

    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    original = tc.PlanData.__getitem__

    def getitem(self, i):
        got = original(self, i)
        info = torch.utils.data.get_worker_info()
        if info is not None and isinstance(info.dataset, tc.ShardData):  # a shard worker, not a plan worker
            got.demo_indices = list(reversed(got.demo_indices))
        return got

    monkeypatch.setattr(tc.PlanData, "__getitem__", getitem)
    with pytest.raises(UserError, match="planned its queries differently") as err:
        cache(tmp_path, loaded, task="antonyms", n_queries=4, shard_size=2, num_workers=2)
    assert "\n" not in str(err.value)
    assert not open_store(tmp_path / "s.zarr").read_array("done").any()


def test_resume_and_refusals(tmp_path):
    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    path = cache(tmp_path, loaded, task="antonyms")
    before = {k: open_store(path).read_array(k) for k in ARRAYS}
    cache(tmp_path, loaded, task="antonyms")  # same config: nothing pending, nothing changes
    assert all(np.array_equal(before[k], open_store(path).read_array(k)) for k in ARRAYS)
    with pytest.raises(UserError, match="different configuration.*--overwrite"):
        cache(tmp_path, loaded, task="antonyms", shots=3)
    cache(tmp_path, loaded, task="antonyms", shots=3, overwrite=True)
    assert open_store(path).attrs["shots"] == 3
    with pytest.raises(UserError, match=r"more than the limit 20; use fewer --shots or a larger --max-length"):
        cache(tmp_path / "long", loaded, task="antonyms", max_length=20)
    with pytest.raises(UserError, match=r"task shapes_group_vqa \(vqa\) has images but .* is a text-only model"):
        cache(tmp_path / "images", loaded, task="shapes_group_vqa")
    assert not (tmp_path / "images").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, warm_pipeline):
    """The tiny Llama saved to disk, so subprocesses load it by path like a real model."""
    warm_pipeline.prestart(cli()[1], 1)  # the server imports torch while the model is saved
    fam = tiny("llama")
    d = tmp_path_factory.mktemp("tiny-llama")
    fam.model.save_pretrained(d)
    fam.processor.save_pretrained(d)
    return d


def cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200",
           **(env_extra or {})}
    return [sys.executable, "-m", "pipeline", *args], env


def warm_run(warm, args):
    """``python -m pipeline ARGS`` in a process of its own (forked by conftest's ``warm_pipeline`` from a
    server that has imported torch); raises like ``subprocess.run(..., check=True)``."""
    res = warm.run(list(args), cwd=REPO, env=cli()[1])
    if res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)


def store_args(model_dir, out, n=24):
    return ("teacher-cache", "--task", "antonyms", "--model", str(model_dir), "--shots", "3", "--n-queries", str(n),
            "--shard-size", "2", "--batch-size", "1", "--out", str(out), "--device", "cpu")


def assert_same_store(a, b):
    sa, sb = open_store(a), open_store(b)
    sa.validate()
    sb.validate()
    for k in ARRAYS:
        assert np.array_equal(sa.read_array(k), sb.read_array(k)), k


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_and_resume_gives_the_same_store(tmp_path, tiny_dir, warm_pipeline, workers):
    """Killed while writing, twice, then resumed: the store of an uninterrupted run. With 2 prompt workers the
    first run takes the early-shard path (forwards while the plan is made), the resumed ones the other."""
    ref = tmp_path / "ref.zarr"
    warm_run(warm_pipeline, store_args(tiny_dir, ref))
    out = tmp_path / "killed.zarr"
    rng = random.Random(1234)
    args = [*store_args(tiny_dir, out), "--num-workers", str(workers)]
    interrupted = []  # samples done when a kill landed while the store was being written
    for _ in range(8):
        proc = warm_pipeline.popen(args, cwd=REPO, env=cli()[1])  # a process of its own
        while not (out / "done").exists() and proc.poll() is None:  # wait until writing has begun
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))  # writing 24 samples takes ~0.4 s here
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = int(open_store(out).read_array("done").sum()) if (out / "done").exists() else 0
        if done == 24:  # finished before the kill: start again, so that the next kill can land mid-write
            shutil.rmtree(out)
            continue
        interrupted.append(done)
        if len(interrupted) == 2:
            break
    assert interrupted, "no kill landed while the store was being written"
    warm_run(warm_pipeline, args)
    assert_same_store(ref, out)


def test_a_user_error_with_early_shards_exits_2_every_time(tmp_path, tiny_dir, warm_pipeline):
    """A prompt over --max-length, found by an early shard worker while the plan is made: the one-line error and
    exit 2, every time (the plan's thread once stayed inside its loader at exit and the process aborted, in
    about two runs of three)."""
    for i in range(3):
        res = warm_pipeline.run([*store_args(tiny_dir, tmp_path / f"s{i}.zarr"), "--num-workers", "2",
                                 "--max-length", "5"], cwd=REPO, env=cli()[1])
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and last.startswith("error:") and "more than the limit 5" in last, res.stderr
        assert "Traceback" not in res.stderr and "terminate called" not in res.stderr


def test_two_gloo_processes_write_the_same_store(tmp_path, tiny_dir, warm_pipeline):
    one = tmp_path / "one.zarr"
    warm_run(warm_pipeline, store_args(tiny_dir, one, n=8))
    two = tmp_path / "two.zarr"
    args = store_args(tiny_dir, two, n=8)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + os.getpid() % 1000), "-m", "pipeline", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(torchrun, env=env, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "with 2 processes" in res.stdout, "the two processes must really share the work"
    assert_same_store(one, two)


def test_foreign_directory_is_refused_not_wiped(tmp_path):
    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "precious.txt").write_text("user data")
    with pytest.raises(UserError, match="not a usable teacher store.*--overwrite"):
        cache(tmp_path, loaded, task="antonyms")
    assert (tmp_path / "s.zarr" / "precious.txt").read_text() == "user data"


def test_teacher_padding_only_pads_padded_batches_within_the_positions():
    """A batch of one length stays unpadded (no mask, the unmasked kernel); a padded one is rounded up to a
    multiple of 8 tokens unless that passes the model's positions."""
    from pipeline.forward import teacher_padding

    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    positions = loaded.model.config.max_position_embeddings
    assert teacher_padding(loaded, [13, 13, 13]) == 1 and teacher_padding(loaded, [13]) == 1
    assert teacher_padding(loaded, [13, 11]) == 8 and teacher_padding(loaded, [16, 11]) == 8
    assert teacher_padding(loaded, [positions - 8, positions - 9]) == 8
    assert teacher_padding(loaded, [positions - 1, positions - 9]) == (8 if positions % 8 == 0 else 1)
    loaded.model.config.max_position_embeddings = 20
    try:
        assert teacher_padding(loaded, [19, 3]) == 1 and teacher_padding(loaded, [16, 3]) == 8
    finally:
        loaded.model.config.max_position_embeddings = positions


@pytest.mark.parametrize("family", ["llama", "idefics2"])
def test_topk_logits_of_a_batch_equal_a_full_forward_of_each_prompt(family):
    """Top-k log-probs are computed from logits kept only from the earliest span on (logits_to_keep); each
    must equal log_softmax of a plain full forward of that prompt alone, at its own span positions."""
    from pipeline.forward import TeacherRunner, sorted_batches

    fam = tiny(family)
    loaded = wrap_model(fam.model, fam.processor, f"tiny-{family}")
    task = load_task("shapes_vqa" if family == "idefics2" else "antonyms")
    support, queries = task.split("support"), task.split("train")
    # 0, 1 and 2 demonstrations: spans start at very different positions in one right-padded batch
    prompts = [build_prompt(loaded.family, loaded.processor, task.spec, queries[i], support[:i],
                            [task.demo_answer(d) for d in support[:i]], task.demo_answer(queries[i]))
               for i in range(3)]
    runner = TeacherRunner(loaded, "mlp", topk=4)
    got = runner.forward(prompts)
    # the batch was padded to a multiple of 8 tokens beyond the longest prompt (TEACHER_PAD_MULTIPLE)
    longest = max(len(p.encoded) for p in prompts)
    assert longest % 8 != 0
    (_, batch), = sorted_batches(loaded, prompts, len(prompts))[1]
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8
    assert runner.launch_sorted(prompts, sorted_batches(loaded, prompts, 2))()[0][0].shape == got[0][0].shape
    for prompt, (_, values, indices) in zip(prompts, got, strict=True):
        batch = loaded.family.collate([prompt.encoded], loaded.processor, "right")
        with torch.no_grad():
            logits = loaded.model(**batch, use_cache=False).logits[0].float()
        want = torch.log_softmax(logits[prompt.span_start : len(prompt.encoded)], -1).topk(4, dim=-1)
        assert torch.equal(indices, want.indices)
        torch.testing.assert_close(values, want.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_next_shards_forwards_are_issued_before_the_host_waits_for_a_shard(tmp_path, monkeypatch, workers):
    """The device never waits for the host between shards: shard k+1's forwards are issued before the host
    waits for shard k's states (and builds and writes its records); every shard is waited for exactly once,
    in order. With and without prompt workers (early shards, forwards while planning). The store, top-k
    included, is bit for bit the one of a run that waits for each shard as soon as it is issued."""
    from pipeline.forward import TeacherRunner

    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    opts = dict(task="antonyms", n_queries=7, shard_size=2, batch_size=1, topk=3, num_workers=workers)
    original, events = TeacherRunner.launch_sorted, []

    def at_once(self, prompts, *args, **kwargs):
        done = original(self, prompts, *args, **kwargs)()
        return lambda: done

    monkeypatch.setattr(TeacherRunner, "launch_sorted", at_once)
    waited = open_store(cache(tmp_path / "a", loaded, **opts))

    def logged(self, prompts, *args, **kwargs):
        shard = sum(e[0] == "issued" for e in events)
        events.append(("issued", shard))
        finish = original(self, prompts, *args, **kwargs)

        def waited_for():
            events.append(("waited", shard))
            return finish()

        return waited_for

    monkeypatch.setattr(TeacherRunner, "launch_sorted", logged)
    got = open_store(cache(tmp_path / "b", loaded, **opts))
    shards = 4  # 7 queries in shards of 2
    assert [e for e in events if e[0] == "waited"] == [("waited", k) for k in range(shards)]
    for k in range(shards - 1):
        assert events.index(("issued", k + 1)) < events.index(("waited", k)), events
    for k in (*ARRAYS, "topk_values", "topk_indices"):
        assert np.array_equal(waited.read_array(k), got.read_array(k)), k


def test_a_failing_shard_still_lets_the_shard_before_it_be_written(tmp_path, monkeypatch):
    """Shards are written one behind their forwards; when a shard's forwards fail, the shards before it (the
    one whose forwards were issued included) are written, and a resume completes the store: bit for bit a
    clean run's."""
    from pipeline.forward import TeacherRunner

    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama")
    opts = dict(task="antonyms", n_queries=7, shard_size=2, batch_size=1)
    clean = open_store(cache(tmp_path / "a", loaded, **opts))
    original, calls = TeacherRunner.launch_sorted, {"n": 0}

    def failing(self, prompts, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a device fault (simulated)")
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(TeacherRunner, "launch_sorted", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        cache(tmp_path / "b", loaded, **opts)
    partial = open_store(tmp_path / "b" / "s.zarr")
    assert partial.read_array("done").tolist() == [True] * 4 + [False] * 3  # shards 0 and 1 written
    monkeypatch.setattr(TeacherRunner, "launch_sorted", original)
    resumed = open_store(cache(tmp_path / "b", loaded, **opts))
    for k in ARRAYS:
        assert np.array_equal(clean.read_array(k), resumed.read_array(k)), k
