"""Stage 2's experiment trackers (--report-to) and mixed precision (--mixed-precision), through accelerate."""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_student import llama, make_store, train_cfg  # noqa: F401 (llama: a fixture)

from pipeline.config import UserError
from pipeline.runtime import wrap_model
from stages.train_student import run as train_run
from stages.train_student import setup
from stages.trainer import TENSORBOARD_DIR, TRACKED, Trainer


class Killed(Exception):
    """Stands for a kill in the middle of a step."""


def killed_in_step(monkeypatch, step: int, cfg, loaded) -> None:
    """Train ``cfg`` until its ``step``-th micro-batch (one per step here) raises ``Killed``, as a kill would stop
    it; then put ``Trainer.micro_loss`` back for the resume."""
    real, calls = Trainer.micro_loss, {"n": 0}

    def dies(self, items, epoch):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed
        return real(self, items, epoch)

    monkeypatch.setattr(Trainer, "micro_loss", dies)
    with pytest.raises(Killed):
        train_run(cfg, loaded=loaded, show_progress=False)
    monkeypatch.setattr(Trainer, "micro_loss", real)


def log_rows(run_dir):
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_logged_values_step_by_step_across_a_resume(tmp_path, llama, monkeypatch):  # noqa: F811
    store = make_store(tmp_path, llama, n=6)
    cfg = train_cfg(tmp_path, store, batch_size=1, grad_accum=1, checkpoint_every=2, report_to="tensorboard")
    killed_in_step(monkeypatch, 4, cfg, llama)  # steps 1-3 logged, the checkpoint of step 2 kept
    run_dir = train_run(cfg, loaded=llama, show_progress=False)  # resumes at step 2: steps 3-6 again
    rows = log_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]

    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    for key in TRACKED:
        scalars = events.Scalars(f"train/{key}")
        # every step once: what the first invocation logged from step 3 on was dropped (purge_step)
        assert [s.step for s in scalars] == [r["step"] for r in rows], key
        # TensorBoard stores float32: the log's value rounded so, exactly
        assert [s.value for s in scalars] == [float(np.float32(r[key])) for r in rows], key

    # the tracker watches, it does not make another run: a finished run with no tracker is not refused
    again = train_run(train_cfg(tmp_path, store, batch_size=1, grad_accum=1, checkpoint_every=2),
                      loaded=llama, show_progress=False)
    assert log_rows(again) == rows
    # the precision is part of the run: resuming it with another is refused, naming it
    with pytest.raises(UserError, match=r"other settings \(mixed_precision: the run's 'no' vs now 'bf16'\)"):
        train_run(train_cfg(tmp_path, store, batch_size=1, grad_accum=1, checkpoint_every=2,
                            mixed_precision="bf16"), loaded=llama, show_progress=False)


def test_a_missing_tracker_package_is_one_error_naming_pip_install(tmp_path, llama, monkeypatch):  # noqa: F811
    store = make_store(tmp_path, llama, n=2)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed
    with pytest.raises(UserError, match=r"^--report-to wandb needs the wandb package: pip install wandb$"):
        setup(train_cfg(tmp_path, store, report_to="wandb"), llama)
    # refused before a student was attached: the model can take one
    setup(train_cfg(tmp_path, store), llama).student.detach()


def test_bf16_autocast_on_cpu_changes_the_numbers_a_little_and_fp16_is_refused(tmp_path, llama):  # noqa: F811
    """bf16 really autocasts (the loss moves by about bf16's precision, not by nothing and not by much);
    fp16, which accelerate does not autocast on a CPU, is refused instead of silently training in fp32."""
    store = make_store(tmp_path, llama, n=4)
    losses = {}
    for precision in ("no", "bf16"):
        cfg = train_cfg(tmp_path, store, max_steps=1, mixed_precision=precision, name=precision)
        losses[precision] = log_rows(train_run(cfg, loaded=llama, show_progress=False))[0]["loss"]
    assert losses["bf16"] != losses["no"]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=3e-2)
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        setup(train_cfg(tmp_path, store, mixed_precision="fp16"), llama)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast and its loss scaler need a GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_kill_and_resume_is_bit_identical_on_a_gpu(tmp_path, precision, monkeypatch):
    """Killed in step 4 after the checkpoint of step 2, then resumed: the same log and adapter as a run never
    killed (fp16: the loss scaler's state travels in the checkpoint)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    fam = tiny("llama")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llama", device="cuda")
    store = make_store(tmp_path, loaded, n=6)

    def cfg(name):
        return train_cfg(tmp_path, store, batch_size=1, grad_accum=1, checkpoint_every=2, mixed_precision=precision,
                         name=name)

    try:
        whole = train_run(cfg("whole"), loaded=loaded, show_progress=False)
        killed_in_step(monkeypatch, 4, cfg("resumed"), loaded)
        state = torch.load(tmp_path / "runs" / "resumed" / "checkpoint" / "state.pt", weights_only=True)
        assert state["step"] == 2 and ("scaler" in state) == (precision == "fp16")
        resumed = train_run(cfg("resumed"), loaded=loaded, show_progress=False)
    finally:
        torch.use_deterministic_algorithms(False)
    drop = [{k: v for k, v in r.items() if k != "samples_per_s"} for r in log_rows(whole)]
    assert drop == [{k: v for k, v in r.items() if k != "samples_per_s"} for r in log_rows(resumed)]
    a, b = load_file(str(whole / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unwritable_tensorboard_directory_is_one_error_without_a_thread_traceback(tmp_path, llama,  # noqa: F811
                                                                                     monkeypatch):
    """TensorBoard opens its event file in a thread of its own, which printed a traceback before the error reached
    the command. Its directory here is a link into /proc, where no file can be made (by root neither)."""
    store = make_store(tmp_path, llama, n=2)
    events = tmp_path / "runs" / "tb" / TENSORBOARD_DIR
    events.parent.mkdir(parents=True)
    events.symlink_to("/proc", target_is_directory=True)
    in_threads = []
    monkeypatch.setattr(threading, "excepthook", in_threads.append)
    cfg = train_cfg(tmp_path, store, name="tb", max_steps=1, report_to="tensorboard")
    with pytest.raises(UserError, match=rf"^--report-to tensorboard cannot write its event files in {events} "):
        train_run(cfg, loaded=llama, show_progress=False)
    assert in_threads == []
    events.unlink()  # the same run in a directory that takes files: trained, its step in the event file
    run_dir = train_run(cfg, loaded=llama, show_progress=False)
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss")] == [r["step"] for r in log_rows(run_dir)] == [1]


def test_a_launch_precision_train_student_lacks_is_refused_without_suggesting_it(tmp_path, llama, monkeypatch):  # noqa: F811
    """`accelerate launch --mixed_precision fp8`: the refusal named `--mixed-precision fp8` as the fix, an
    option value train-student itself refuses."""
    store = make_store(tmp_path, llama, n=2)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UserError, match=r"asks for mixed precision fp8 but train-student has --mixed-precision no: "
                                        r"train-student autocasts in no, fp16 or bf16 only$"):
        setup(train_cfg(tmp_path, store), llama)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(UserError, match=r"give --mixed-precision bf16 to train-student"):
        setup(train_cfg(tmp_path, store), llama)
    setup(train_cfg(tmp_path, store, mixed_precision="bf16"), llama).student.detach()
