"""One writer per store and run directory, with real processes: the second is refused while the
first runs; after a SIGKILL of the first, the second takes over and its result equals an
uninterrupted run. Plus: --overwrite never deletes a file the project did not write, and a kill
between the two renames of a checkpoint save resumes from that checkpoint, not from step 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import tiny
from safetensors.torch import load_file

from pipeline.config import UserError
from pipeline.locks import LockedError, dir_lock, store_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}

# runs the real CLI in a process that stops after its first teacher forwards / optimiser steps for as
# long as the file named by HOLD exists, so that a second process meets it holding its lock (and the
# test decides when it dies)
SLOW = """
import os, sys, time
import stages.teacher_cache as tc, stages.trainer as tr
hold, calls = HOLD, {"n": 0}
def held(fn, free):
    def wrapper(self, *a, **k):
        calls["n"] += 1
        while calls["n"] > free and os.path.exists(hold):
            time.sleep(0.05)
        return fn(self, *a, **k)
    return wrapper
tc.TeacherRunner.launch = held(tc.TeacherRunner.launch, 2)  # the first shard is written once the second is issued
tr.Trainer.step = held(tr.Trainer.step, 2)
from pipeline.cli import app
app(args=sys.argv[1:], prog_name="pipeline")
"""


def start(warm, *args, hold):
    """``python -c SLOW ARGS`` in a process of its own (forked by conftest's ``warm_pipeline`` from a
    server that has imported torch), holding while the file ``hold`` exists."""
    return warm.popen(list(args), cwd=REPO, env=ENV, code=SLOW.replace("HOLD", repr(str(hold)), 1))


def run(warm, *args):
    """``python -m pipeline ARGS`` in a process of its own, to its end."""
    return warm.run(list(args), cwd=REPO, env=ENV, timeout=300)


def run_here(*args):
    """The same command in this process (for set-up and reference runs, which need no process of
    their own); raises on failure."""
    from pipeline.cli import app

    code = app(args=[str(a) for a in args], prog_name="pipeline", standalone_mode=False)  # returns the exit code
    assert code in (0, None), f"pipeline {' '.join(map(str, args))} exited {code}"


def wait_for(predicate, proc, what, timeout=120):
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the first process ended before {what}: {proc.stderr()[-2000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, warm_pipeline):
    warm_pipeline.prestart(ENV, 2)  # the servers import torch while the model is saved
    d = tmp_path_factory.mktemp("lock-model")
    fam = tiny("llama")
    fam.model.save_pretrained(d)
    fam.processor.save_pretrained(d)
    return d


def tc_args(model_dir, out):
    return ["teacher-cache", "--task", "antonyms", "--model", model_dir, "--shots", 2, "--n-queries", 6,
            "--shard-size", 2, "--batch-size", 2, "--out", out, "--device", "cpu"]


def store_arrays(path):
    group = zarr.open_group(path, mode="r")
    return {name: group[name][:] for name in group.array_keys()}


def test_second_store_writer_is_refused_and_takes_over_after_sigkill(tmp_path, model_dir, warm_pipeline):
    warm = warm_pipeline
    store = tmp_path / "s.zarr"
    hold = tmp_path / "hold"
    hold.touch()
    first = start(warm, *tc_args(model_dir, store), hold=hold)
    try:
        done = store / "done"
        wait_for(lambda: any(done.rglob("c/*")), first, "the first shard was written")
        second = run(warm, *tc_args(model_dir, store))
        assert second.returncode == 2, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert f"pid {first.pid}" in second.stderr and "in use by another process" in second.stderr
        # --overwrite is no way around a running writer either
        assert run(warm, *tc_args(model_dir, store), "--overwrite", "--seed", 1).returncode == 2
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = run(warm, *tc_args(model_dir, store))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean = tmp_path / "clean.zarr"
    run_here(*tc_args(model_dir, clean))
    got, want = store_arrays(store), store_arrays(clean)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_second_run_writer_is_refused_and_takes_over_after_sigkill(tmp_path, model_dir, warm_pipeline):
    warm = warm_pipeline
    store = tmp_path / "s.zarr"
    run_here(*tc_args(model_dir, store))
    train = ["train-student", "--cache", store, "--epochs", 4, "--batch-size", 1, "--grad-accum", 1,
             "--checkpoint-every", 2, "--device", "cpu", "--name", "r"]
    hold = tmp_path / "hold"
    hold.touch()
    first = start(warm, *train, "--runs-dir", tmp_path / "a", hold=hold)
    try:
        ckpt = tmp_path / "a" / "r" / "checkpoint" / "state.pt"
        wait_for(ckpt.exists, first, "the first checkpoint")
        second = run(warm, *train, "--runs-dir", tmp_path / "a")
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps_at_kill = len((tmp_path / "a" / "r" / "train_log.jsonl").read_text().splitlines())
    assert steps_at_kill == 2, "the first run must be killed while it holds its run directory, after a checkpoint"
    assert run(warm, *train, "--runs-dir", tmp_path / "a").returncode == 0
    run_here(*train, "--runs-dir", tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "r" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "r" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "a" / "r" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "b" / "r" / "train_log.jsonl").read_text().splitlines()]
    assert log_a == log_b


def test_overwrite_keeps_foreign_files_and_a_rebuilt_store_is_not_resumed(tmp_path, model_dir, warm_pipeline):
    warm = warm_pipeline
    store = tmp_path / "s.zarr"
    run_here(*tc_args(model_dir, store))
    train = ["train-student", "--cache", store, "--max-steps", 2, "--device", "cpu", "--runs-dir", tmp_path / "runs",
             "--name", "r"]
    assert run(warm, *train).returncode == 0
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "notes.txt").write_text("mine\n")
    # the same command again: already trained, and it says so with the loss it reached
    again = run(warm, *train)
    assert again.returncode == 0 and "already trained" in again.stdout, again.stdout + again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # not nan
    # the store rebuilt: the run is stale and refused, naming why
    run_here(*tc_args(model_dir, store), "--overwrite", "--seed", 7)
    stale = run(warm, *train)
    assert stale.returncode == 2 and "store" in stale.stderr and "--overwrite" in stale.stderr, stale.stderr
    retrained = run(warm, *train, "--overwrite")
    assert retrained.returncode == 0, retrained.stderr[-2000:]
    assert "wrote" in retrained.stdout
    assert (run_dir / "notes.txt").read_text() == "mine\n"
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["store_fingerprint"]["demo_seed"] == 7


def test_checkpoint_killed_between_renames_resumes_from_it(tmp_path, monkeypatch):
    from pipeline.rundir import Checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = Checkpoint(tmp_path / "run" / "checkpoint", {"lr": 1})
    ckpt.save(model.state_dict(), opt, sched, 1)
    renames = []
    real = Path.rename

    def killed_after_first_rename(self, target):
        renames.append(target)
        if len(renames) == 2:
            raise KeyboardInterrupt  # stands for the SIGKILL between the two renames
        return real(self, target)

    monkeypatch.setattr(Path, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(model.state_dict(), opt, sched, 2)
    monkeypatch.setattr(Path, "rename", real)
    assert not (tmp_path / "run" / "checkpoint").exists(), "the kill must fall between the renames"
    assert Checkpoint(tmp_path / "run" / "checkpoint", {"lr": 1}).load()["step"] == 2


def test_torn_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    from pipeline.rundir import Checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = Checkpoint(tmp_path / "checkpoint", {})
    ckpt.save(model.state_dict(), opt, sched, 1)
    real = torch.save

    def torn(obj, path, *a, **k):
        real(obj, path, *a, **k)
        raise KeyboardInterrupt  # killed after state.pt, before the COMPLETE mark

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(model.state_dict(), opt, sched, 2)
    monkeypatch.setattr(torch, "save", real)
    assert Checkpoint(tmp_path / "checkpoint", {}).load()["step"] == 1


def test_lock_names_holder_and_is_released(tmp_path):
    lock = store_lock(tmp_path / "s.zarr")
    with lock:
        code = ("import sys; from pipeline.locks import store_lock, LockedError\n"
                f"try:\n    store_lock({str(tmp_path / 's.zarr')!r}).acquire()\n"
                "except LockedError as e:\n    print(e); sys.exit(3)\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO)
        assert res.returncode == 3 and f"pid {os.getpid()}" in res.stdout
    with dir_lock(tmp_path / "run"):  # released: another lock object of the same path takes it
        pass
    with store_lock(tmp_path / "s.zarr"):
        pass
    assert issubclass(LockedError, UserError)
